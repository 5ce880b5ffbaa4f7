"""The sample-row summariser: :func:`summarize` derives every metric of a run, with its 95%
bootstrap interval, from its ``samples.jsonl`` rows alone, so the rows reloaded give exactly the
same table.

Within one (task, modality) group all metrics share the same resamples, and the rows are put in
a canonical order (by ``index`` or ``qid``) first, so a resumed run whose rows come back in
another order gets the same intervals.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medshield.errors import InputError
from medshield.eval.metrics.bootstrap import (
    bootstrap_distribution,
    mean_last_axis,
    percentile_interval,
)
from medshield.eval.metrics.metric import Metric
from medshield.eval.metrics.point import check_scores, macro_auc, macro_auc_batched
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
        mean_last_axis, indicator, n_resamples=n_resamples, seed=seed, vectorized=True
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
        scores, labels = check_scores([r["scores"] for r in rows], labels)
        auc_samples = bootstrap_distribution(
            macro_auc_batched,
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
      :func:`medshield.commands.finetune.finetuned_eval_rows`, which carry ``label``), plus
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
