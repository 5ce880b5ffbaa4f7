"""Metrics, bootstrap intervals and summarize() against hand-computed values."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medshield.errors import InputError
from medshield.eval.metrics import (
    Metric,
    accuracy,
    bootstrap_ci,
    bootstrap_distribution,
    format_metric,
    macro_auc,
    paired_difference_ci,
    percentile_interval,
    recall_at_k,
    summarize,
)
from medshield.eval.metrics.point import macro_auc_batched
from medshield.eval.retrieval import first_correct_rank


def mean_last(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


# --- point metrics ---------------------------------------------------------------------------


def test_accuracy_hand_computed() -> None:
    assert accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    with pytest.raises(InputError, match="same number of rows"):
        accuracy([0, 1], [0])


def test_binary_auc_uses_positive_column() -> None:
    # The classic example: positives 0.35 and 0.8 against negatives 0.1 and 0.4 -> 3 of 4 pairs.
    scores = [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]
    assert macro_auc(scores, [0, 0, 1, 1]) == pytest.approx(0.75)


def test_multiclass_macro_auc_hand_computed_with_ties() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    scores = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.2, 0.5],
            [0.4, 0.6, 0.0],
            [0.1, 0.6, 0.3],
            [0.2, 0.3, 0.5],
            [0.5, 0.6, 0.9],
        ]
    )
    # class 0: 6 of 8 pairs; class 1: 2 x (3 wins + 1 tie) = 7 of 8; class 2: 3.5 + 4 = 7.5 of 8
    expected = (6 / 8 + 7 / 8 + 7.5 / 8) / 3
    assert macro_auc(scores, labels) == pytest.approx(expected)


def test_macro_auc_is_nan_when_a_class_is_absent() -> None:
    scores = np.eye(3)[[0, 1, 0, 1]]
    assert math.isnan(macro_auc(scores, [0, 1, 0, 1]))
    with pytest.raises(InputError, match="labels must lie"):
        macro_auc(scores, [0, 1, 3, 1])


def test_recall_at_k_hand_computed() -> None:
    ranks = [0, 3, 1, 10]
    assert recall_at_k(ranks, 1) == 0.25
    assert recall_at_k(ranks, 5) == 0.75
    assert recall_at_k(ranks, 10) == 0.75
    assert recall_at_k(ranks, 11) == 1.0
    with pytest.raises(InputError):
        recall_at_k(ranks, 0)


def test_first_correct_rank_hand_made_with_ties() -> None:
    similarity = np.array(
        [
            [0.9, 0.5, 0.9, 0.1],  # best correct 0.9 (col 2) ties an incorrect one (col 0): 1
            [0.2, 0.8, 0.8, 0.3],  # two correct tie at the top, nothing incorrect above: 0
            [0.4, 0.4, 0.1, 0.4],  # correct col 3 ties two incorrect ones: 2
        ]
    )
    ranks = first_correct_rank(similarity, ["A", "A", "C"], ["B", "A", "A", "C"])
    assert ranks.tolist() == [1, 0, 2]
    assert ranks.dtype == np.int64
    # deterministic: a permutation of the candidates gives the same ranks
    perm = [3, 1, 0, 2]
    keys = np.array(["B", "A", "A", "C"])
    permuted = first_correct_rank(similarity[:, perm], ["A", "A", "C"], keys[perm])
    assert permuted.tolist() == [1, 0, 2]


def test_first_correct_rank_without_correct_candidate_is_k() -> None:
    assert first_correct_rank(np.zeros((1, 4)), [9], [0, 1, 2, 3]).tolist() == [4]
    with pytest.raises(InputError, match="shape"):
        first_correct_rank(np.zeros((2, 4)), [0], [0, 1, 2, 3])


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    correct = np.random.default_rng(0).random(200) < 0.7
    lo, hi = bootstrap_ci(np.mean, correct, seed=3)
    assert lo <= correct.mean() <= hi
    assert lo < hi
    assert bootstrap_ci(np.mean, correct, seed=3) == (lo, hi)
    assert bootstrap_ci(np.mean, correct, seed=4) != (lo, hi)
    # the vectorised path draws the same resamples, so it gives the same interval
    assert bootstrap_ci(mean_last, correct, seed=3, vectorized=True) == pytest.approx((lo, hi))


def test_bootstrap_ci_narrows_with_more_data() -> None:
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.5
    large = rng.random(5000) < 0.5
    width_small = np.subtract(*bootstrap_ci(mean_last, small, vectorized=True)[::-1])
    width_large = np.subtract(*bootstrap_ci(mean_last, large, vectorized=True)[::-1])
    assert width_large < width_small / 5


def test_bootstrap_ci_of_constant_column_has_zero_width() -> None:
    lo, hi = bootstrap_ci(mean_last, np.ones(40), vectorized=True)
    assert lo == hi == 1.0


def test_bootstrap_confidence_level_widens_interval() -> None:
    x = np.random.default_rng(2).normal(size=300)
    lo90, hi90 = bootstrap_ci(mean_last, x, vectorized=True, confidence=0.90)
    lo99, hi99 = bootstrap_ci(mean_last, x, vectorized=True, confidence=0.99)
    assert lo99 < lo90 < hi90 < hi99


def test_vectorised_auc_bootstrap_matches_sklearn_resample_by_resample() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 30)
    scores = np.round(rng.random((30, 3)), 1)  # coarse scores: many ties
    slow = bootstrap_distribution(macro_auc, scores, labels, n_resamples=60, seed=7)
    fast = bootstrap_distribution(
        macro_auc_batched, scores, labels, n_resamples=60, seed=7, vectorized=True
    )
    np.testing.assert_allclose(fast, slow, equal_nan=True)
    assert np.isfinite(slow).sum() > 30


def test_auc_bootstrap_skips_degenerate_resamples() -> None:
    # one positive among 20 rows: many resamples lack it and are undefined
    labels = np.zeros(20, dtype=int)
    labels[0] = 1
    scores = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], axis=1)[::-1]
    samples = bootstrap_distribution(
        macro_auc_batched, scores, labels, n_resamples=200, vectorized=True
    )
    assert np.isnan(samples).any() and np.isfinite(samples).any()
    lo, hi = bootstrap_ci(macro_auc_batched, scores, labels, n_resamples=200, vectorized=True)
    assert lo == hi == roc_auc_score(labels, scores[:, 1]) == 1.0


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="zero rows"):
        bootstrap_ci(np.mean, np.array([]))
    with pytest.raises(InputError, match="same number of rows"):
        bootstrap_ci(accuracy, [0, 1], [0, 1, 1])
    with pytest.raises(InputError, match="confidence"):
        bootstrap_ci(np.mean, [1.0, 2.0], confidence=95)


def test_paired_difference_ci_is_narrower_than_unpaired_on_correlated_hits() -> None:
    """Two methods that mostly hit and miss the same images: the paired interval of their gap
    is narrower than resampling each on its own, and holds the gap's point estimate."""
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.6
    b = a.copy()
    b[rng.choice(400, 40, replace=False)] ^= True  # b differs from a on 10% of the images
    paired = paired_difference_ci(a, b, n_resamples=500)
    assert paired.value == pytest.approx(a.mean() - b.mean())
    assert paired.ci_low <= paired.value <= paired.ci_high and paired.n == 400
    each = [
        bootstrap_distribution(mean_last, x.astype(float), n_resamples=500, seed=s, vectorized=True)
        for s, x in ((1, a), (2, b))
    ]
    low, high = percentile_interval(each[0] - each[1])
    assert paired.ci_high - paired.ci_low < 0.6 * (high - low)
    with pytest.raises(InputError, match="same number of rows"):
        paired_difference_ci(a, b[:-1])


def test_metric_to_dict_is_strict_json() -> None:
    assert Metric(math.nan, math.nan, math.nan, 3).to_dict() == {
        "value": None,
        "ci_low": None,
        "ci_high": None,
        "n": 3,
    }
    json.dumps(Metric(0.5, 0.25, 0.75, 4).to_dict(), allow_nan=False)


# --- summarize -------------------------------------------------------------------------------


def classification_row(task: str, modality: str, index: int, label: int, probs: list[float]):
    return {
        "task": task,
        "modality": modality,
        "index": index,
        "label": label,
        "pred": int(np.argmax(probs)),
        "scores": probs,
    }


def hand_made_rows() -> list[dict]:
    rows = [
        # chest: accuracy 3/4, AUC of column 1 = 3/4 (see test_binary_auc_uses_positive_column)
        classification_row("zero_shot", "chest_xray", 0, 0, [0.9, 0.1]),
        classification_row("zero_shot", "chest_xray", 1, 0, [0.6, 0.4]),
        classification_row("zero_shot", "chest_xray", 2, 1, [0.65, 0.35]),
        classification_row("zero_shot", "chest_xray", 3, 1, [0.2, 0.8]),
        # blood: all right, perfectly ranked
        classification_row("zero_shot", "blood_cell", 5, 0, [0.7, 0.2, 0.1]),
        classification_row("zero_shot", "blood_cell", 6, 1, [0.1, 0.8, 0.1]),
        classification_row("zero_shot", "blood_cell", 7, 2, [0.1, 0.1, 0.8]),
        classification_row("linear_probe", "chest_xray", 0, 1, [0.3, 0.7]),
        classification_row("linear_probe", "chest_xray", 1, 0, [0.4, 0.6]),
        {
            "task": "vqa_closed",
            "modality": "radiology",
            "qid": 1,
            "correct": True,
            "majority_correct": False,
        },
        {
            "task": "vqa_closed",
            "modality": "radiology",
            "qid": 2,
            "correct": True,
            "majority_correct": True,
        },
        {
            "task": "vqa_closed",
            "modality": "radiology",
            "qid": 3,
            "correct": False,
            "majority_correct": True,
        },
        {
            "task": "vqa_closed",
            "modality": "radiology",
            "qid": 4,
            "correct": True,
            "majority_correct": True,
        },
    ]
    for modality, ranks in (("chest_xray", [0, 2, 7, 12]), ("blood_cell", [0, 0])):
        for direction in ("i2t", "t2i"):
            rows += [
                {"task": f"retrieval_{direction}", "modality": modality, "index": i, "rank": r}
                for i, r in enumerate(ranks)
            ]
    return rows


def values(table: dict) -> dict:
    return {name: metric["value"] for name, metric in table.items()}


def test_metric_round_trips_its_dict_and_formats_itself() -> None:
    m = Metric(0.5, 0.25, 0.75, 8)
    assert Metric.from_dict(m.to_dict()) == m and m.interval == "bootstrap"
    assert m.format() == "0.500 [0.250, 0.750]" and m.format(2) == "0.50 [0.25, 0.75]"
    assert Metric(0.1, -0.05, 0.2, 4).format(signed=True) == "+0.100 [-0.050, +0.200]"
    # a dict that names its value (VQA accuracies, paired differences) reads the same
    named = {"difference": -0.125, "ci_low": -0.25, "ci_high": 0.0}
    assert Metric.from_dict(named).format(signed=True) == "-0.125 [-0.250, +0.000]"
    # one seed: no interval, the value alone; no value, or no rows: "-"
    assert Metric.from_dict({"value": 0.4, "ci_low": None, "ci_high": None, "n": 1}).format() == (
        "0.400"
    )
    assert Metric(math.nan, math.nan, math.nan, 3).format() == "-"
    assert Metric(0.0, 0.0, 0.0, 0).format() == "-"


def test_format_metric_says_missing_for_what_is_not_a_metric() -> None:
    assert format_metric({"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}, 2) == "0.50 [0.25, 0.75]"
    assert format_metric({"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}) == "0.500 [0.400, 0.600]"
    for odd in (None, {}, {"value": None}, {"score": 0.5}, {"value": "high"}, [0.5], 0.5):
        assert format_metric(odd) == "-" and format_metric(odd, missing="n/a") == "n/a"
    with pytest.raises(InputError, match="not a metric"):
        Metric.from_dict({"score": 0.5})


def test_summarize_hand_made_rows_exact_values() -> None:
    summary = summarize(hand_made_rows(), n_resamples=200)
    assert list(summary) == [
        "zero_shot",
        "linear_probe",
        "retrieval_i2t",
        "retrieval_t2i",
        "vqa_closed",
    ]

    zero_shot = summary["zero_shot"]
    assert list(zero_shot) == ["blood_cell", "chest_xray", "mean"]
    assert values(zero_shot["chest_xray"]) == {"accuracy": 0.75, "macro_auc": 0.75}
    assert values(zero_shot["blood_cell"]) == {"accuracy": 1.0, "macro_auc": 1.0}
    assert values(zero_shot["mean"]) == {"accuracy": 0.875, "macro_auc": 0.875}
    assert zero_shot["chest_xray"]["accuracy"]["n"] == 4
    assert zero_shot["mean"]["accuracy"]["n"] == 7
    # a group where every row is right has a zero-width interval
    assert zero_shot["blood_cell"]["accuracy"]["ci_low"] == 1.0
    acc = zero_shot["chest_xray"]["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]

    # linear probe: one row of each class, both predicted 1 -> accuracy 1/2, AUC 1
    assert values(summary["linear_probe"]["chest_xray"]) == {"accuracy": 0.5, "macro_auc": 1.0}

    i2t = summary["retrieval_i2t"]
    assert list(i2t) == ["blood_cell", "chest_xray", "mean", "all"]
    assert values(i2t["chest_xray"]) == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75}
    assert values(i2t["blood_cell"]) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert values(i2t["mean"]) == {"R@1": 0.625, "R@5": 0.75, "R@10": 0.875}
    assert values(i2t["all"]) == pytest.approx({"R@1": 3 / 6, "R@5": 4 / 6, "R@10": 5 / 6})
    assert i2t["all"]["R@1"]["n"] == 6
    t2i = summary["retrieval_t2i"]
    assert {g: values(t2i[g]) for g in t2i} == {g: values(i2t[g]) for g in i2t}

    vqa = summary["vqa_closed"]
    assert values(vqa["radiology"]) == {"accuracy": 0.75, "majority_baseline": 0.75}
    assert vqa["mean"] == vqa["radiology"]


def test_summarize_is_identical_after_json_round_trip_and_shuffle() -> None:
    rows = hand_made_rows()
    summary = summarize(rows, n_resamples=300, seed=1)
    reloaded = [json.loads(line) for line in "\n".join(json.dumps(r) for r in rows).splitlines()]
    random.Random(0).shuffle(reloaded)
    assert summarize(reloaded, n_resamples=300, seed=1) == summary
    json.dumps(summary, allow_nan=False)
    assert summarize(rows, n_resamples=300, seed=2) != summary


def test_summarize_group_interval_does_not_depend_on_other_groups() -> None:
    rows = hand_made_rows()
    chest_only = [r for r in rows if r["modality"] == "chest_xray"]
    assert (
        summarize(chest_only)["zero_shot"]["chest_xray"]
        == summarize(rows)["zero_shot"]["chest_xray"]
    )


def test_summarize_mean_skips_undefined_auc() -> None:
    rows = hand_made_rows()[:7] + [
        classification_row("zero_shot", "fundus", 0, 0, [0.6, 0.4]),  # one class only: AUC nan
    ]
    table = summarize(rows, n_resamples=100)["zero_shot"]
    assert table["fundus"]["macro_auc"]["value"] is None
    assert table["fundus"]["accuracy"]["value"] == 1.0
    assert table["mean"]["macro_auc"]["value"] == 0.875  # chest and blood only
    assert table["mean"]["accuracy"]["value"] == pytest.approx((0.75 + 1 + 1) / 3)


def test_summarize_rejects_bad_rows() -> None:
    with pytest.raises(InputError, match="unknown task 'safety'"):
        summarize([{"task": "safety", "modality": "x"}])
    with pytest.raises(InputError, match="lacks scores"):
        summarize([{"task": "zero_shot", "modality": "x", "label": 0, "pred": 0}])
    with pytest.raises(InputError, match="'task' and 'modality'"):
        summarize([{"modality": "x"}])
    assert summarize([]) == {}
