"""Percentile bootstrap intervals: over items (:func:`bootstrap_ci`), the resampled distribution
itself (:func:`bootstrap_distribution`), and a paired difference (:func:`paired_difference_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medshield.errors import InputError
from medshield.eval.metrics.metric import Metric
from medshield.eval.metrics.point import check_lengths

# Bootstrap chunks hold at most this many resampled cells, which bounds memory for big groups.
_CHUNK_CELLS = 2_000_000


def bootstrap_distribution(
    statistic: Callable[..., Any],
    *arrays: Sequence[Any] | np.ndarray,
    n_resamples: int = 1000,
    seed: int | Sequence[int] = 0,
    vectorized: bool = False,
) -> np.ndarray:
    """The statistic on ``n_resamples`` bootstrap resamples of the rows of ``arrays``.

    Args:
        statistic: ``statistic(*resampled_arrays) -> float``. With ``vectorized=True`` it gets
            arrays with an extra leading resample axis, (B, N, ...), and returns (B,).
        arrays: one or more arrays with the same first dimension N (the rows); row i of every
            array is resampled together.
        n_resamples: number of resamples.
        seed: seed (or seed sequence) of ``numpy.random.default_rng``.
        vectorized: see ``statistic``. Vectorised resamples are processed in chunks that bound
            memory.

    Returns:
        (n_resamples,) float array; a resample where the statistic is undefined holds nan.
    """
    if not arrays:
        raise InputError("bootstrap needs at least one array")
    arrays_np = [np.asarray(a) for a in arrays]
    n = len(arrays_np[0])
    check_lengths(*arrays_np)
    if n == 0:
        raise InputError("cannot bootstrap zero rows")
    if n_resamples < 1:
        raise InputError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    if not vectorized:
        return np.array(
            [statistic(*(a[idx] for a in arrays_np)) for idx in indices], dtype=np.float64
        )
    cells_per_resample = n * max(int(np.prod(a.shape[1:])) for a in arrays_np)
    chunk = max(1, _CHUNK_CELLS // cells_per_resample)
    parts = [
        np.asarray(statistic(*(a[indices[i : i + chunk]] for a in arrays_np)), dtype=np.float64)
        for i in range(0, n_resamples, chunk)
    ]
    return np.concatenate(parts)


def bootstrap_ci(
    statistic: Callable[..., Any],
    *arrays: Sequence[Any] | np.ndarray,
    n_resamples: int = 1000,
    seed: int | Sequence[int] = 0,
    confidence: float = 0.95,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over the rows of ``arrays``.

    Resamples where the statistic is undefined (nan, e.g. an AUC whose resample lacks a class)
    are left out; when every resample is undefined the interval is (nan, nan).

    Example::

        lo, hi = bootstrap_ci(lambda c: c.mean(-1), correct, vectorized=True)

    See :func:`bootstrap_distribution` for the arguments.
    """
    samples = bootstrap_distribution(
        statistic, *arrays, n_resamples=n_resamples, seed=seed, vectorized=vectorized
    )
    return percentile_interval(samples, confidence)


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentiles of a bootstrap distribution, ignoring nan resamples."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    finite = samples[~np.isnan(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    seed: int | Sequence[int] = 0,
    confidence: float = 0.95,
) -> Metric:
    """``mean(a) - mean(b)`` with its paired percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are two methods' scores (e.g. hit indicators) on the same unit ``i``
    (e.g. one test image of one seed); the units are resampled as pairs, so what both methods
    share (easy and hard images) cancels and the interval is narrower than resampling each
    method on its own whenever their hits are positively correlated.

    Raises:
        InputError: ``a`` and ``b`` differ in length, or are empty.
    """
    a_np, b_np = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    check_lengths(a_np, b_np)
    diff = a_np - b_np
    low, high = bootstrap_ci(
        mean_last_axis,
        diff,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        vectorized=True,
    )
    return Metric(float(diff.mean()), low, high, len(diff))


def mean_last_axis(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)
