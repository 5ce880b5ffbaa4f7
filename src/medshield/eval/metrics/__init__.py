"""Metrics with 95% bootstrap confidence intervals, and the sample-row summariser.

Every evaluation task writes one JSON-serialisable *row* per evaluated item (see docs/design.md,
"Conventions"); :func:`summarize` derives every aggregate from those rows alone, so the
rows reloaded from ``samples.jsonl`` give exactly the same table.

Confidence intervals are percentile bootstraps over rows. Within one (task, modality) group all
metrics share the same resamples, and the rows are put in a canonical order (by ``index`` or
``qid``) first, so a resumed run whose rows come back in another order gets the same intervals.

The parts: :mod:`~medshield.eval.metrics.metric` (:class:`Metric`, :func:`format_metric`),
:mod:`~medshield.eval.metrics.point` (accuracy, ROC AUC, recall@k),
:mod:`~medshield.eval.metrics.bootstrap` (the intervals) and
:mod:`~medshield.eval.metrics.summary` (:func:`summarize`).
"""

from medshield.eval.metrics.bootstrap import (
    bootstrap_ci,
    bootstrap_distribution,
    paired_difference_ci,
    percentile_interval,
)
from medshield.eval.metrics.metric import Interval, Metric, format_metric
from medshield.eval.metrics.point import accuracy, macro_auc, recall_at_k
from medshield.eval.metrics.summary import (
    RECALL_KS,
    TASK_FIELDS,
    image_use_flag,
    majority_hits,
    summarize,
)

__all__ = [
    "RECALL_KS",
    "TASK_FIELDS",
    "Interval",
    "Metric",
    "accuracy",
    "bootstrap_ci",
    "bootstrap_distribution",
    "format_metric",
    "image_use_flag",
    "macro_auc",
    "majority_hits",
    "paired_difference_ci",
    "percentile_interval",
    "recall_at_k",
    "summarize",
]
