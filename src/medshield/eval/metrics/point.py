"""Point metrics of one sample (accuracy, ROC AUC, recall@k), the batched ROC AUC over bootstrap
resamples, and the checks of their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medshield.errors import InputError


def accuracy(pred: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    check_lengths(pred, labels)
    return float(np.mean(pred == labels))


def macro_auc(
    scores: np.ndarray | Sequence[Sequence[float]], labels: Sequence[int] | np.ndarray
) -> float:
    """Area under the ROC curve: binary, or one-vs-rest macro average over classes.

    Args:
        scores: (N, C) class scores (probabilities or logits), column c for class c.
        labels: (N,) integer labels in 0..C-1.

    Returns:
        For C = 2 the AUC of the positive column ``scores[:, 1]``; for C > 2 the unweighted mean
        of the one-vs-rest AUCs of every class. nan when some class of 0..C-1 is absent from
        ``labels`` (its AUC is undefined).
    """
    from sklearn.metrics import roc_auc_score  # a heavy import, when needed

    scores, labels = check_scores(scores, labels)
    num_classes = scores.shape[1]
    if not np.all(np.isin(np.arange(num_classes), labels)):
        return math.nan
    if num_classes == 2:
        return float(roc_auc_score(labels == 1, scores[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, scores[:, c]) for c in range(num_classes)]))


def recall_at_k(ranks: Sequence[int] | np.ndarray, k: int) -> float:
    """Fraction of queries whose first correct candidate is among the top ``k``.

    Args:
        ranks: 0-based position of the first correct candidate of each query.
        k: cut-off (k >= 1).
    """
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise InputError("recall_at_k needs at least one rank")
    return float(np.mean(ranks < k))


def _binary_auc_batched(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of every row of (B, N) ``scores`` against (B, N) bool ``positive``.

    Mann-Whitney form with ties counting 1/2, which equals sklearn's ``roc_auc_score``; no
    per-row sort: scores become dense ranks shared by all rows, and per-rank counts are binned.
    Rows without positives or without negatives give nan.
    """
    batch = scores.shape[0]
    _, ranks = np.unique(scores, return_inverse=True)
    num_ranks = int(ranks.max()) + 1
    flat = (ranks.reshape(scores.shape) + num_ranks * np.arange(batch)[:, None]).ravel()
    size = batch * num_ranks
    pos = np.bincount(flat, weights=positive.ravel(), minlength=size).reshape(batch, num_ranks)
    neg = np.bincount(flat, weights=(~positive).ravel(), minlength=size).reshape(batch, num_ranks)
    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def macro_auc_batched(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`macro_auc` of each resample: (B, N, C) scores, (B, N) labels -> (B,)."""
    num_classes = scores.shape[-1]
    if num_classes == 2:
        return _binary_auc_batched(scores[..., 1], labels == 1)
    per_class = [_binary_auc_batched(scores[..., c], labels == c) for c in range(num_classes)]
    return np.mean(per_class, axis=0)


def check_lengths(*arrays: np.ndarray) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise InputError(f"arrays must have the same number of rows, got lengths {sorted(lengths)}")


def check_scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except ValueError as exc:  # ragged lists
        raise InputError(f"scores must be an (N, C) array of numbers: {exc}") from exc
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise InputError(f"scores must have shape (N, C) with C >= 2, got {scores.shape}")
    check_lengths(scores, labels)
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise InputError(
            f"labels must lie in 0..{scores.shape[1] - 1} for {scores.shape[1]} score columns, "
            f"got [{labels.min()}, {labels.max()}]"
        )
    return scores, labels
