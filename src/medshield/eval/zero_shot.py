"""Zero-shot classification of a MedMNIST split with a dual encoder and prompt ensembling.

Each class is represented by the mean embedding of its caption templates
(:meth:`Modality.prompts`); an image is assigned the class whose prompt embedding is most similar.
One sample row per image::

    {"task": "zero_shot", "modality": "chest_xray", "index": 17, "label": 1, "pred": 1,
     "scores": [0.0123, 0.9877]}

``index`` is the row in the split, ``scores`` the softmax probabilities (6 significant digits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medshield import data
from medshield.eval.features import classify_images
from medshield.models.base import DualEncoder, ZeroShotClassifier, evaluating

SCORE_DIGITS = 6


def balanced_subset(
    labels: np.ndarray, num_classes: int, max_items: int | None, seed: int
) -> np.ndarray:
    """Sorted row indices: all rows, or a class-balanced subsample of about ``max_items``.

    Each class keeps at most ``max(1, max_items // num_classes)`` rows (fewer when the class is
    smaller), so the result never exceeds ``max(max_items, num_classes)`` rows.
    """
    cap = None if max_items is None else max(1, max_items // num_classes)
    return data.class_balanced_indices(labels, cap, seed)


def classification_rows(
    task: str, modality: str, indices: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> list[dict[str, Any]]:
    """Sample rows of a classification task from (N,) indices and labels and (N, C) probabilities.

    ``pred`` is the arg-max of the unrounded probabilities; ``scores`` keeps
    :data:`SCORE_DIGITS` significant digits, so tiny probabilities still rank items for the AUC.
    """
    preds = probs.argmax(axis=1)
    return [
        {
            "task": task,
            "modality": modality,
            "index": int(index),
            "label": int(label),
            "pred": int(pred),
            "scores": [float(f"{p:.{SCORE_DIGITS}g}") for p in row],
        }
        for index, label, pred, row in zip(indices, labels, preds, probs, strict=True)
    ]


def zero_shot_rows(
    model: DualEncoder,
    modality: str,
    split: str = "test",
    max_items: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Zero-shot classify one split of a modality; one sample row per image.

    Args:
        model: the dual encoder (left in the train/eval mode it was in).
        modality: modality name, e.g. ``"chest_xray"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        max_items: evaluate a class-balanced subsample of about this many images (see
            :func:`balanced_subset`); None evaluates every image.
        seed: seed of the subsample.
        data_dir: data root (see :func:`medshield.data.load_split`).
        batch_size: images per forward pass.

    Raises:
        DataError: the split cannot be loaded.
    """
    samples = data.load_split(modality, split, data_dir)
    mod = samples.modality
    indices = balanced_subset(samples.labels, mod.num_classes, max_items, seed)
    with evaluating(model):
        classifier = ZeroShotClassifier(model, mod.prompts())
    logits = classify_images(classifier, samples.tensor(indices), batch_size)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    return classification_rows("zero_shot", mod.name, indices, samples.labels[indices], probs)
