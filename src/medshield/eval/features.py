"""Batched, gradient-free forward passes for evaluation: embeddings and classifier logits.

Every helper puts the module in eval mode for the pass and restores its previous mode afterwards,
moves each batch to the module's device and returns float32 tensors on the CPU. A tqdm progress
bar appears only for inputs of at least :data:`PROGRESS_MIN_ITEMS` items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from medshield.errors import InputError, NonFiniteError
from medshield.models.base import DualEncoder, check_images, check_texts, evaluating

PROGRESS_MIN_ITEMS = 2048

Batch = TypeVar("Batch", torch.Tensor, list[str])


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _run_batched(
    module: nn.Module,
    fn: Callable[[Batch], torch.Tensor],
    items: Batch,
    batch_size: int,
    desc: str,
) -> torch.Tensor:
    """``fn`` over ``items`` in batches, without gradients, with ``module`` in eval mode."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    outputs = []
    with evaluating(module):
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc=desc, disable=len(items) < PROGRESS_MIN_ITEMS):
            outputs.append(fn(items[start : start + batch_size]).float().cpu())
    return check_finite_outputs(torch.cat(outputs), desc)


def check_finite_outputs(outputs: torch.Tensor, desc: str) -> torch.Tensor:
    """``outputs`` (embeddings or logits) when every value is finite; a NonFiniteError naming
    the likely cause otherwise, before NaN scores become predictions."""
    if not torch.isfinite(outputs).all():
        raise NonFiniteError(
            f"{desc}: the model gave NaN or infinite outputs, so its weights are probably not "
            "finite (a training run that diverged, e.g. with a too high learning rate); "
            "retrain it with a lower lr or evaluate another checkpoint"
        )
    return outputs


def _run_on_images(
    module: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    desc: str,
) -> torch.Tensor:
    images = check_images(images)
    if len(images) == 0:
        raise InputError(f"{desc}: got zero images")
    device = _module_device(module)
    return _run_batched(module, lambda batch: forward(batch.to(device)), images, batch_size, desc)


def embed_images(model: DualEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings.

    Args:
        model: the dual encoder.
        images: float (N, C, H, W) in [0, 1], C = 1 or 3.
        batch_size: images per forward pass.

    Returns:
        float32 (N, D) tensor on the CPU.
    """
    return _run_on_images(model, model.encode_image, images, batch_size, "embedding images")


def embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings of a non-empty list of non-empty strings -> (N, D), CPU.

    Identical strings are embedded once (captions built from templates repeat a lot).
    """
    texts = check_texts(texts)
    unique = list(dict.fromkeys(texts))
    embeddings = _run_batched(model, model.encode_text, unique, batch_size, "embedding texts")
    position = {text: i for i, text in enumerate(unique)}
    return embeddings[[position[text] for text in texts]]


def classify_images(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Logits of an images -> logits module (e.g. a ZeroShotClassifier) -> (N, K), CPU."""
    return _run_on_images(classifier, classifier, images, batch_size, "classifying images")
