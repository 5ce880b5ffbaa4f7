"""The dual-encoder (CLIP-style) interface every backend implements.

Conventions (see docs/design.md): images enter as float tensors in [0, 1], shape (N, C, H, W) with
C = 1 (grayscale) or 3. The wrapper owns resizing, grayscale-to-RGB and mean/std normalisation,
so attacks and training code never normalise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medshield.errors import InputError


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; afterwards every submodule gets back its *own* mode.

    ``module.train(was_training)`` would not do: it is recursive, so it would undo a frozen
    tower's eval mode inside a training model, or switch a model that was in eval mode to train
    mode when it sits inside a fresh wrapper (e.g. a :class:`ZeroShotClassifier`).
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (each submodule's own mode restored afterwards) and no gradients."""
    with eval_mode(module), torch.no_grad():
        yield module


def check_images(images: Any) -> torch.Tensor:
    """Validate an image batch against the input convention and return it.

    Raises:
        InputError: not a float tensor, not 4-D NCHW, not 1 or 3 channels, or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise InputError(
            f"images must be float in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.ndim != 4:
        raise InputError(
            f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0)"
        )
    if images.shape[1] not in (1, 3):
        raise InputError(
            f"images must have 1 or 3 channels in dim 1 (NCHW), got shape {tuple(images.shape)}; "
            "NHWC input needs images.permute(0, 3, 1, 2)"
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        lo, hi = images.min().item(), images.max().item()
        raise InputError(
            f"image values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
            "do not normalise before the model, the wrapper does it"
        )
    return images


def check_texts(texts: Any) -> list[str]:
    """Validate a batch of texts: a non-empty list of non-empty strings."""
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, got one string; wrap it in a list")
    if not isinstance(texts, Sequence) or len(texts) == 0:
        raise InputError("texts must be a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"texts[{i}] is {type(t).__name__}, expected str")
        if not t.strip():
            raise InputError(f"texts[{i}] is empty")
    return list(texts)


class DualEncoder(nn.Module, ABC):
    """A CLIP-style model: an image tower and a text tower embedding into one space.

    Subclasses set ``embed_dim``, ``image_size``, ``image_mean`` and ``image_std`` and implement
    ``_encode_pixels`` (normalised pixels -> unnormalised embeddings) and ``_encode_texts``.
    ``init_kwargs`` must hold the JSON-serialisable constructor arguments, so that
    :func:`medshield.models.save_model` / :func:`medshield.models.load_model` can rebuild it.
    """

    backend: str = ""  # set by MODELS.register
    embed_dim: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    init_kwargs: dict[str, Any]

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    # --- what subclasses implement -------------------------------------------------------
    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, image_size, image_size) pixels -> (N, D) embeddings."""

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        """A list of strings -> (N, D) embeddings."""

    def image_blocks(self) -> list[nn.Module]:
        """Image-tower stages from input to output; pretraining unfreezes the last ones."""
        return []

    def text_blocks(self) -> list[nn.Module]:
        """Text-tower stages from input to output; pretraining unfreezes the last ones."""
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that always train (projections, logit scale)."""
        return [self.logit_scale]

    # --- public API ------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] NCHW images (1 or 3 channels, any size) -> normalised model input."""
        images = check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = images.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, C, H, W) -> L2-normalised (N, D) embeddings."""
        return F.normalize(self._encode_pixels(self.preprocess(images)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """A list of N strings -> L2-normalised (N, D) embeddings."""
        return F.normalize(self._encode_texts(check_texts(texts)), dim=-1)

    def forward(
        self, images: torch.Tensor, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (image embeddings, text embeddings, logit scale as a positive number)."""
        return self.encode_image(images), self.encode_text(texts), self.logit_scale.exp()


class ZeroShotClassifier(nn.Module):
    """Turn a :class:`DualEncoder` into an ``nn.Module`` classifier: images -> logits.

    Args:
        model: the dual encoder.
        class_prompts: one entry per class, either a string or a list of strings whose
            embeddings are averaged (prompt ensembling).

    ``forward(images)`` takes [0, 1] NCHW images and returns (N, num_classes) logits, scaled
    by the model's logit scale, so attacks treat it like any classifier. Class embeddings are
    computed once, without gradients, at construction.
    """

    def __init__(self, model: DualEncoder, class_prompts: Sequence[str | Sequence[str]]) -> None:
        super().__init__()
        if len(class_prompts) < 2:
            raise InputError("a zero-shot classifier needs prompts for at least two classes")
        self.model = model
        with torch.no_grad():
            rows = []
            for prompts in class_prompts:
                texts = [prompts] if isinstance(prompts, str) else list(prompts)
                rows.append(F.normalize(model.encode_text(texts).mean(0), dim=-1))
        self.register_buffer("class_embeddings", torch.stack(rows))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images)
        return self.model.logit_scale.exp() * features @ self.class_embeddings.T
