"""Metrics with 95% bootstrap confidence intervals, and the sample-row summariser.

Every evaluation task writes one JSON-serialisable *row* per evaluated item (see docs/design.md,
"Conventions"); :func:`summarize` derives every aggregate from those rows alone, so the
rows reloaded from ``samples.jsonl`` give exactly the same table.

Confidence intervals are percentile bootstraps over rows. Within one (task, modality) group all
metrics share the same resamples, and the rows are put in a canonical order (by ``index`` or
``qid``) first, so a resumed run whose rows come back in another order gets the same intervals.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import roc_auc_score

from medshield.errors import InputError
from medshield.eval.robust import eps_key, per_image, worst_case

# Row fields each task needs; the order of TASK_FIELDS is the order of the summary.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "zero_shot": ("label", "pred", "scores"),
    "linear_probe": ("label", "pred", "scores"),
    "robust_zero_shot": ("attack", "eps", "index", "clean_correct", "robust_correct"),
    "finetuned": ("attack", "eps", "index", "label", "clean_correct", "robust_correct"),
    "retrieval_i2t": ("rank",),
    "retrieval_t2i": ("rank",),
    "retrieval_i2t_adv": ("rank",),
    "retrieval_t2i_adv": ("rank",),
    "vqa_closed": ("correct",),
}
RECALL_KS = (1, 5, 10)
# Bootstrap chunks hold at most this many resampled cells, which bounds memory for big groups.
_CHUNK_CELLS = 2_000_000


Interval = Literal["bootstrap", "student-t", "mover"]
"""How a metric's 95% interval was made (see docs/concepts.md, "Confidence intervals"): a
percentile bootstrap over items (:func:`bootstrap_ci`, every metric of a run), a Student-t
interval over seeds (the noise study's means,
:func:`medshield.commands.studies.noise.mean_t_ci`), or a MOVER interval combining two bootstrap
intervals (the defense study's balanced error,
:func:`medshield.commands.studies.defense.analysis.balanced_error`)."""


@dataclass(frozen=True)
class Metric:
    """A point estimate with its 95% confidence interval: the one metric type, in memory, in
    ``results.json`` (:meth:`to_dict`, :meth:`from_dict`) and as text (:meth:`format`).

    Attributes:
        value: the metric on all rows (nan when undefined, e.g. AUC with a class absent).
        ci_low: lower end of the confidence interval (nan when undefined).
        ci_high: upper end of the confidence interval (nan when undefined).
        n: number of rows (or seeds) it was computed from; None when a dict did not say.
        interval: how the interval was made (not written to ``results.json``).
    """

    value: float
    ci_low: float
    ci_high: float
    n: int | None
    interval: Interval = "bootstrap"

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready dict; nan becomes None so the output is strict JSON."""
        return {
            "value": _json_float(self.value),
            "ci_low": _json_float(self.ci_low),
            "ci_high": _json_float(self.ci_high),
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], interval: Interval = "bootstrap") -> Metric:
        """A metric dict as :meth:`to_dict` writes it, or one that names its value instead
        (``{"accuracy": v, "ci_low": l, "ci_high": h}``); a None number becomes nan.

        Raises:
            InputError: the dict holds no value, or its value or bounds are not numbers.
        """
        if "value" in data:
            value = data["value"]
        else:
            named = [k for k in data if k not in ("ci_low", "ci_high", "n")]
            if len(named) != 1 or "ci_low" not in data or "ci_high" not in data:
                raise InputError(f"not a metric: {dict(data)!r} has no single value and interval")
            value = data[named[0]]
        n = data.get("n")
        return cls(
            _nan_float(value),
            _nan_float(data.get("ci_low")),
            _nan_float(data.get("ci_high")),
            None if n is None else int(n),
            interval,
        )

    @property
    def defined(self) -> bool:
        """Whether there is a value: finite, from at least one row."""
        return math.isfinite(self.value) and self.n != 0

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``value [low, high]`` to ``digits`` decimals (with a sign when ``signed``); the value
        alone when the interval is undefined (one seed); ``-`` when the value is."""
        if not self.defined:
            return "-"
        spec = f"{'+' if signed else ''}.{digits}f"
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return format(self.value, spec)
        return f"{self.value:{spec}} [{self.ci_low:{spec}}, {self.ci_high:{spec}}]"


def format_metric(data: Any, digits: int = 3, missing: str = "-") -> str:
    """A metric dict of ``results.json`` as text (:meth:`Metric.format`); ``missing`` when
    ``data`` is not a metric dict or its value is undefined."""
    if not isinstance(data, Mapping):
        return missing
    try:
        metric = Metric.from_dict(data)
    except (InputError, TypeError, ValueError):
        return missing
    return metric.format(digits) if metric.defined else missing


def _nan_float(x: Any) -> float:
    """A number of a metric dict as a float (None is nan).

    Raises:
        InputError: ``x`` is not a number.
    """
    if x is None:
        return math.nan
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise InputError(f"not a metric: {x!r} is not a number")
    return float(x)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# --- point metrics ---------------------------------------------------------------------------


def accuracy(pred: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    _check_lengths(pred, labels)
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
    scores, labels = _check_scores(scores, labels)
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


# --- bootstrap -------------------------------------------------------------------------------


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
    _check_lengths(*arrays_np)
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
    _check_lengths(a_np, b_np)
    diff = a_np - b_np
    low, high = bootstrap_ci(
        _mean_last_axis,
        diff,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
        vectorized=True,
    )
    return Metric(float(diff.mean()), low, high, len(diff))


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


def _macro_auc_batched(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`macro_auc` of each resample: (B, N, C) scores, (B, N) labels -> (B,)."""
    num_classes = scores.shape[-1]
    if num_classes == 2:
        return _binary_auc_batched(scores[..., 1], labels == 1)
    per_class = [_binary_auc_batched(scores[..., c], labels == c) for c in range(num_classes)]
    return np.mean(per_class, axis=0)


def _mean_last_axis(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


# --- summaries of sample rows ----------------------------------------------------------------


@dataclass(frozen=True)
class _Estimate:
    """A point estimate and its bootstrap distribution, before it becomes a :class:`Metric`."""

    value: float
    samples: np.ndarray
    n: int

    def metric(self, confidence: float) -> Metric:
        return Metric(self.value, *percentile_interval(self.samples, confidence), self.n)


def _indicator_estimate(indicator: np.ndarray, n_resamples: int, seed: Sequence[int]) -> _Estimate:
    indicator = indicator.astype(np.float64)
    samples = bootstrap_distribution(
        _mean_last_axis, indicator, n_resamples=n_resamples, seed=seed, vectorized=True
    )
    return _Estimate(float(indicator.mean()), samples, len(indicator))


def majority_hits(rows: list[dict[str, Any]]) -> list[bool]:
    """Per test row, whether its label is the most frequent one: what a classifier that
    always answers the majority class gets right, clean and under any image attack."""
    counts = Counter(r["label"] for r in rows)
    if not counts:
        return []
    majority = counts.most_common(1)[0][0]
    return [r["label"] == majority for r in rows]


def image_use_flag(own: Sequence[bool], other: Sequence[bool]) -> dict[str, Any]:
    """The ``uses image`` sanity flag (JSON-ready): accuracy with each item's own image
    (``own``, one hit per item) is above the accuracy with another item's image (``other``, the
    shuffled control). Where it is not, the classifier answers from the prompts or class priors
    alone, and its robust accuracy against image attacks says little about robustness."""
    own_rate, other_rate = float(np.mean(own)), float(np.mean(other))
    return {
        "name": "uses image",
        "passed": own_rate > other_rate,
        "detail": f"accuracy with each item's own image {own_rate:.4f}, with another item's "
        f"{other_rate:.4f} (n={len(own)})",
    }


def _group_estimates(
    task: str, rows: list[dict[str, Any]], n_resamples: int, seed: Sequence[int]
) -> dict[str, _Estimate]:
    """Every metric of ``task`` on one group of rows (all metrics share the resamples)."""
    if task in ("zero_shot", "linear_probe"):
        labels = np.array([r["label"] for r in rows], dtype=np.int64)
        pred = np.array([r["pred"] for r in rows], dtype=np.int64)
        scores, labels = _check_scores([r["scores"] for r in rows], labels)
        auc_samples = bootstrap_distribution(
            _macro_auc_batched,
            scores,
            labels,
            n_resamples=n_resamples,
            seed=seed,
            vectorized=True,
        )
        return {
            "accuracy": _indicator_estimate(pred == labels, n_resamples, seed),
            "macro_auc": _Estimate(macro_auc(scores, labels), auc_samples, len(rows)),
        }
    if task in ("robust_zero_shot", "finetuned"):
        images = per_image(rows)
        estimates = {
            "clean_accuracy": _indicator_estimate(
                np.array([bool(r["clean_correct"]) for r in images]), n_resamples, seed
            )
        }
        if task == "finetuned":
            majority = np.array(majority_hits(images))
            estimates["majority_accuracy"] = _indicator_estimate(majority, n_resamples, seed)
            if all("shuffled_correct" in r for r in images):
                shuffled = np.array([bool(r["shuffled_correct"]) for r in images])
                estimates["shuffled_image_accuracy"] = _indicator_estimate(
                    shuffled, n_resamples, seed
                )
        budgets = sorted({float(r["eps"]) for r in rows})
        attacks = list(dict.fromkeys(r["attack"] for r in rows))
        for eps in budgets:
            robust = np.array(worst_case(rows, eps))
            estimates[f"robust_accuracy@{eps_key(eps)}"] = _indicator_estimate(
                robust, n_resamples, seed
            )
            for attack in attacks if len(attacks) > 1 else ():
                robust = np.array(worst_case(rows, eps, attack))
                estimates[f"robust_accuracy/{attack}@{eps_key(eps)}"] = _indicator_estimate(
                    robust, n_resamples, seed
                )
        return estimates
    if task.startswith("retrieval_"):
        ranks = np.array([r["rank"] for r in rows], dtype=np.int64)
        return {f"R@{k}": _indicator_estimate(ranks < k, n_resamples, seed) for k in RECALL_KS}
    # vqa_closed
    estimates = {
        "accuracy": _indicator_estimate(
            np.array([bool(r["correct"]) for r in rows]), n_resamples, seed
        )
    }
    if all("majority_correct" in r for r in rows):
        majority = np.array([bool(r["majority_correct"]) for r in rows])
        estimates["majority_baseline"] = _indicator_estimate(majority, n_resamples, seed)
    if all("robust_correct" in r for r in rows):
        robust = np.array([bool(r["robust_correct"]) for r in rows])
        estimates["robust_accuracy"] = _indicator_estimate(robust, n_resamples, seed)
    return estimates


def _mean_estimate(estimates: list[_Estimate]) -> _Estimate:
    """Unweighted mean over groups; its distribution is the stratified bootstrap (groups are
    resampled independently). Groups whose point estimate is undefined are left out."""
    defined = [e for e in estimates if not math.isnan(e.value)]
    if not defined:
        return _Estimate(math.nan, np.full(1, np.nan), 0)
    samples = np.mean([e.samples for e in defined], axis=0)
    value = float(np.mean([e.value for e in defined]))
    return _Estimate(value, samples, sum(e.n for e in defined))


def _seed(seed: int, task: str, group: str) -> list[int]:
    """A per-group seed that depends only on the names, not on which other groups exist."""
    return [seed, zlib.crc32(f"{task}/{group}".encode())]


def _row_order(row: dict[str, Any]) -> tuple[int, int, str]:
    """Canonical position of a row in its group: integer ids numerically, then others as text."""
    key = row.get("index", row.get("qid"))
    return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


def _check_rows(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Validate rows and group them: task -> modality -> rows in canonical order."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "task" not in row or "modality" not in row:
            raise InputError(f"sample row {i} needs 'task' and 'modality' keys, got {row!r:.200}")
        task = row["task"]
        if task not in TASK_FIELDS:
            raise InputError(
                f"sample row {i} has unknown task {task!r}; summarize knows "
                f"{', '.join(TASK_FIELDS)} (filter other rows out first)"
            )
        missing = [f for f in TASK_FIELDS[task] if f not in row]
        if missing:
            raise InputError(
                f"sample row {i} (task {task!r}) lacks {', '.join(missing)}; rows of this task "
                f"need {', '.join(TASK_FIELDS[task])}"
            )
        groups.setdefault(task, {}).setdefault(str(row["modality"]), []).append(row)
    for by_modality in groups.values():
        for group in by_modality.values():
            group.sort(key=_row_order)
    return groups


def summarize(
    rows: Sequence[dict[str, Any]],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, dict[str, dict[str, float | int | None]]]]:
    """Aggregate sample rows into metrics with bootstrap confidence intervals.

    Rows are grouped by ``task`` and ``modality``. Metrics per task:

    - ``zero_shot``, ``linear_probe``: ``accuracy`` and ``macro_auc`` (rows need ``label``,
      ``pred``, ``scores``);
    - ``robust_zero_shot``: ``clean_accuracy`` and ``robust_accuracy@<eps>`` per budget, the
      per-image worst case over the attacks and restarts, and with several attacks
      ``robust_accuracy/<attack>@<eps>`` per attack (the flat rows of
      :mod:`medshield.eval.robust`: ``attack``, ``eps``, ``index``, ``clean_correct``,
      ``robust_correct``);
    - ``finetuned``: the same, for a fine-tuned classifier on its own task (rows from
      :func:`medshield.train.finetune.workflow.finetuned_eval_rows`, which carry ``label``), plus
      ``majority_accuracy`` (:func:`majority_hits`) and, when every row has
      ``shuffled_correct`` (the prediction with another test item's image), the control
      ``shuffled_image_accuracy``;
    - ``retrieval_i2t``, ``retrieval_t2i`` and their ``_adv`` versions (queries under a
      multimodal attack): ``R@1``, ``R@5``, ``R@10`` (rows need ``rank``);
    - ``vqa_closed``: ``accuracy`` (rows need ``correct``) and, when every row has
      ``majority_correct``, ``majority_baseline``; when every row has ``robust_correct``,
      ``robust_accuracy``.

    Each task also gets ``"mean"``: the unweighted mean over its modalities (modalities where a
    metric is undefined are left out of that metric's mean; the interval is a stratified
    bootstrap), and retrieval tasks get ``"all"``: every query pooled.

    Args:
        rows: sample rows, e.g. read back from ``samples.jsonl``.
        n_resamples: bootstrap resamples per group.
        seed: bootstrap seed; each group derives its own from it and its name.
        confidence: confidence level of the intervals.

    Returns:
        ``{task: {modality | "mean" | "all": {metric: Metric.to_dict()}}}`` with tasks in the
        order of :data:`TASK_FIELDS`, modalities sorted, then ``"mean"``, then ``"all"``.

    Raises:
        InputError: a row without ``task``/``modality``, of an unknown task, or missing a field.
    """
    groups = _check_rows(rows)
    summary: dict[str, dict[str, dict[str, dict[str, float | int | None]]]] = {}
    for task in TASK_FIELDS:
        if task not in groups:
            continue
        per_modality = {
            modality: _group_estimates(
                task, groups[task][modality], n_resamples, _seed(seed, task, modality)
            )
            for modality in sorted(groups[task])
        }
        table = {
            modality: {name: e.metric(confidence).to_dict() for name, e in estimates.items()}
            for modality, estimates in per_modality.items()
        }
        metric_names = list(dict.fromkeys(name for est in per_modality.values() for name in est))
        table["mean"] = {
            name: _mean_estimate([est[name] for est in per_modality.values() if name in est])
            .metric(confidence)
            .to_dict()
            for name in metric_names
        }
        if task.startswith("retrieval_"):
            pooled = sorted(
                (r for group in groups[task].values() for r in group),
                key=lambda r: (str(r["modality"]), _row_order(r)),
            )
            table["all"] = {
                name: e.metric(confidence).to_dict()
                for name, e in _group_estimates(
                    task, pooled, n_resamples, _seed(seed, task, "all")
                ).items()
            }
        summary[task] = table
    return summary


# --- input checks ------------------------------------------------------------------------------


def _check_lengths(*arrays: np.ndarray) -> None:
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise InputError(f"arrays must have the same number of rows, got lengths {sorted(lengths)}")


def _check_scores(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except ValueError as exc:  # ragged lists
        raise InputError(f"scores must be an (N, C) array of numbers: {exc}") from exc
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise InputError(f"scores must have shape (N, C) with C >= 2, got {scores.shape}")
    _check_lengths(scores, labels)
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise InputError(
            f"labels must lie in 0..{scores.shape[1] - 1} for {scores.shape[1]} score columns, "
            f"got [{labels.min()}, {labels.max()}]"
        )
    return scores, labels
