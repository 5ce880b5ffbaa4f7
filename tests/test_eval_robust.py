"""Robust evaluation: zero-shot under PGD with sanity flags, retrieval under a multimodal attack,
VQA-RAD under attack, and their aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medshield.attacks import CoAttack
from medshield.commands.finetune.config import RobustEvalConfig
from medshield.config import AttackEntry, attack_labels
from medshield.errors import InputError
from medshield.eval.metrics import summarize
from medshield.eval.retrieval import adversarial_retrieval_rows, retrieval_rows
from medshield.eval.robust import (
    attacked_rows,
    build_attack,
    check_eps_values,
    robust_flags,
    robust_rows,
    robust_zero_shot_rows,
    worst_case,
)
from medshield.eval.vqa import vqa_closed_rows
from medshield.models.mini_clip import MiniClip


@pytest.fixture(scope="module")
def model() -> MiniClip:
    torch.manual_seed(0)
    return MiniClip(embed_dim=32, image_size=32, pretrained=False).eval()


def test_robust_zero_shot_rows_respect_budgets_and_summarize(
    model: MiniClip, data_dir: Path
) -> None:
    attacks = [AttackEntry(name="pgd", steps=3), AttackEntry(name="fgsm", restarts=2)]
    rows = robust_zero_shot_rows(
        model, "breast_ultrasound", [4, 1], attacks, max_items=6, data_dir=data_dir
    )
    # one flat row per image, budget, attack and restart: 6 x 2 x (1 + 2)
    assert len(rows) == 36 and {r["task"] for r in rows} == {"robust_zero_shot"}
    assert {(r["attack"], r["eps"], r["restart"]) for r in rows} == {
        (a, e, k) for e in (1.0, 4.0) for a, k in (("pgd", 0), ("fgsm", 0), ("fgsm", 1))
    }
    for r in rows:
        assert r["linf"] <= r["eps"] + 1e-3 and 0 <= r["adv_min"] <= r["adv_max"] <= 1
        assert r["robust_correct"] == (r["clean_correct"] and r["adv_correct"])
    metrics = summarize(rows, n_resamples=50)["robust_zero_shot"]["breast_ultrasound"]
    assert set(metrics) == {
        "clean_accuracy",
        "robust_accuracy@1",
        "robust_accuracy@4",
        "robust_accuracy/pgd@1",
        "robust_accuracy/pgd@4",
        "robust_accuracy/fgsm@1",
        "robust_accuracy/fgsm@4",
    }
    indices = sorted({r["index"] for r in rows})
    clean = {r["index"]: r["clean_correct"] for r in rows}
    assert metrics["clean_accuracy"]["value"] == pytest.approx(sum(clean.values()) / 6)
    worst = [
        all(r["robust_correct"] for r in rows if r["index"] == i and r["eps"] == 4) for i in indices
    ]
    assert worst_case(rows, 4) == worst
    assert metrics["robust_accuracy@4"]["value"] == pytest.approx(sum(worst) / 6)
    assert metrics["robust_accuracy@4"]["value"] <= metrics["robust_accuracy/fgsm@4"]["value"]
    flags = {(f["name"], f["group"]): f for f in robust_flags(rows, attacks)}
    assert {
        ("budget", "pgd@1"),
        ("range", "fgsm@4"),
        ("robust<=clean", "pgd@1"),
        ("stronger<=weaker", "pgd@1->4"),
        ("zero-gradients", "inputs"),
    } <= set(flags)
    assert flags[("budget", "pgd@1")]["passed"] and flags[("budget", "fgsm@4")]["passed"]


def test_robust_rows_leave_the_model_as_it_was(model: MiniClip, data_dir: Path) -> None:
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    robust_zero_shot_rows(
        model,
        "breast_ultrasound",
        [1],
        [AttackEntry(name="pgd", steps=1)],
        max_items=2,
        data_dir=data_dir,
    )
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()


def _rows(
    robust: dict[float, bool], linf: dict[float, float], zero: bool = False, attack: str = "pgd"
) -> list[dict]:
    return [
        {
            "attack": attack,
            "eps": eps,
            "restart": 0,
            "index": 0,
            "label": 0,
            "clean_correct": True,
            "adv_correct": hit,
            "robust_correct": hit,
            "linf": linf[eps],
            "adv_min": 0.0,
            "adv_max": 1.0,
            "size": 12,
            "zero_gradient": zero,
        }
        for eps, hit in robust.items()
    ]


def _flags(rows: list[dict], attacks: list[AttackEntry] | None = None) -> dict:
    return {(f["name"], f["group"]): f["passed"] for f in robust_flags(rows, attacks)}


def test_robust_flags_catch_broken_evaluations() -> None:
    ok = _rows({1.0: True, 2.0: False}, {1.0: 1.0, 2.0: 2.0})
    assert all(_flags(ok).values())
    assert not _flags(_rows({1.0: True, 2.0: False}, {1.0: 1.5, 2.0: 2.0}))[("budget", "pgd@1")]
    weaker = _rows({1.0: False, 2.0: True}, {1.0: 1.0, 2.0: 2.0})
    assert not _flags(weaker)[("stronger<=weaker", "pgd@1->2")]
    masked = _rows({1.0: True, 2.0: True}, {1.0: 1.0, 2.0: 2.0}, zero=True)
    assert not _flags(masked)[("zero-gradients", "inputs")]
    # more steps of the same attack leaving more robust accuracy: the attack does not optimise
    entries = [AttackEntry(name="pgd", steps=10), AttackEntry(name="pgd", steps=50)]
    steps = _rows({1.0: False}, {1.0: 1.0}, attack="pgd10") + _rows(
        {1.0: True}, {1.0: 1.0}, attack="pgd50"
    )
    assert not _flags(steps, entries)[("stronger<=weaker", "pgd10->pgd50@1")]
    # a restart that breaks the image counts: the worst case folds restarts per image
    restarts = ok + [{**ok[0], "restart": 1, "adv_correct": False, "robust_correct": False}]
    assert worst_case(restarts, 1.0) == [False] and worst_case(ok, 1.0) == [True]


@pytest.mark.parametrize("bad", [[], [0], [1, 1], [-2], "2"])
def test_bad_budgets_are_clear_errors(bad: object) -> None:
    with pytest.raises(InputError):
        check_eps_values(bad)  # type: ignore[arg-type]


def test_retrieval_under_a_null_attack_equals_clean_retrieval(
    model: MiniClip, data_dir: Path
) -> None:
    null = CoAttack(eps=0, steps=1, max_edits=0)
    kwargs = dict(per_class_cap=3, seed=1, data_dir=data_dir)
    pooled = ["breast_ultrasound", "fundus"]  # grey and RGB images in one pool
    clean = retrieval_rows(model, pooled, **kwargs)
    adv = adversarial_retrieval_rows(model, pooled, null, batch_size=5, **kwargs)
    assert {r["task"] for r in adv} == {"retrieval_i2t_adv", "retrieval_t2i_adv"}
    assert [r["rank"] for r in adv] == [r["rank"] for r in clean]
    assert all(r["adv_caption"] == r["caption"] for r in adv if r["task"] == "retrieval_t2i_adv")
    table = summarize(adv, n_resamples=20)
    assert set(table["retrieval_i2t_adv"]) == {"breast_ultrasound", "fundus", "mean", "all"}


def test_retrieval_under_attack_does_not_beat_clean(model: MiniClip, data_dir: Path) -> None:
    attack = CoAttack(eps=16, alpha=4, steps=5, max_edits=1)
    kwargs = dict(per_class_cap=4, seed=0, data_dir=data_dir)
    clean = retrieval_rows(model, ["chest_xray"], **kwargs)
    adv = adversarial_retrieval_rows(model, ["chest_xray"], attack, **kwargs)
    i2t = [r["rank"] for r in clean if r["task"] == "retrieval_i2t"]
    adv_i2t = [r["rank"] for r in adv if r["task"] == "retrieval_i2t_adv"]
    assert sum(adv_i2t) >= sum(i2t)


def test_vqa_under_attack_adds_robust_fields(model: MiniClip, data_dir: Path) -> None:
    rows = vqa_closed_rows(model, epochs=1, data_dir=data_dir, attack_eps=8, attack_steps=2)
    assert all(r["attack_eps"] == 8.0 for r in rows)
    assert all(r["robust_correct"] == (r["correct"] and r["adv_correct"]) for r in rows)
    metrics = summarize(rows, n_resamples=20)["vqa_closed"]["radiology"]
    assert metrics["robust_accuracy"]["value"] <= metrics["accuracy"]["value"]
    clean_only = vqa_closed_rows(model, epochs=1, data_dir=data_dir)
    assert "adv_correct" not in clean_only[0]
    assert [r["pred"] for r in clean_only] == [r["pred"] for r in rows]  # attack adds, not alters


# --- the defaults reproduce the evaluation before the one-path refactor (issue 24) -----------
# Computed on main before the refactor (attacks.sanity.robust_accuracy with fine-tuning's
# PGD-10/50 x 2 restarts, APGD-CE-50 and APGD-DLR-50 after torch.manual_seed(1), at 8 and 16
# /255; eval.robust.pgd_rows with PGD-3 and seed 5): per image the adversarial prediction,
# robust_correct and the perturbation's L2 size (/255, 4 decimals; rows keep 6) of the best
# restart.
FINETUNE_BEFORE = {
    "pgd10@8": (
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [50.5846, 54.1012, 53.0653, 54.7822, 55.0047, 54.0602, 54.2572, 55.0878, 54.6838, 55.4256],
    ),
    "pgd50@8": (
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [50.5251, 54.3039, 53.0653, 54.7822, 55.0047, 54.0602, 54.2572, 55.0878, 54.6838, 55.4256],
    ),
    "apgd-ce@8": (
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [50.3061, 54.3039, 53.0653, 54.7822, 55.0047, 54.0602, 54.2572, 55.0878, 54.6838, 55.4256],
    ),
    "apgd-dlr@8": (
        [0, 0, 0, 0, 0, 2, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 1, 1, 1, 1],
        [33.2703, 32.9539, 52.9035, 54.7822, 54.6202, 54.0602, 54.584, 48.8248, 54.8923, 54.8501],
    ),
    "pgd10@16": (
        [0, 0, 1, 1, 0, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 1, 1, 1],
        [
            99.4077,
            106.1306,
            103.3116,
            108.78,
            108.2729,
            105.4695,
            104.4854,
            107.1674,
            107.9127,
            109.6901,
        ],
    ),
    "pgd50@16": (
        [0, 0, 1, 1, 0, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 1, 1, 1],
        [
            100.1941,
            106.1306,
            103.3116,
            108.78,
            108.2729,
            105.4695,
            104.4854,
            107.1674,
            107.9127,
            109.6901,
        ],
    ),
    "apgd-ce@16": (
        [0, 0, 1, 1, 0, 2, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 1, 1, 1, 1],
        [
            99.7368,
            106.1306,
            103.3116,
            108.78,
            108.2729,
            105.4695,
            105.6473,
            107.1674,
            107.9127,
            109.6901,
        ],
    ),
    "apgd-dlr@16": (
        [0, 0, 1, 1, 0, 2, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 1, 1, 1],
        [
            63.5902,
            66.9906,
            102.0676,
            108.78,
            86.0671,
            105.4997,
            102.49,
            103.2432,
            108.5472,
            101.6284,
        ],
    ),
}
EVALUATE_BEFORE = {
    8.0: (
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        [51.5702, 53.719, 53.0653, 54.7822, 55.0047, 54.0602, 54.2572, 54.1267, 54.6838, 55.4256],
    ),
    16.0: (
        [0, 0, 0, 0, 1, 0, 1, 1, 1, 1],
        [
            98.505,
            106.1306,
            103.3116,
            108.78,
            108.2729,
            105.4695,
            106.7326,
            104.7399,
            107.9127,
            109.4134,
        ],
    ),
}


def _tiny_classifier() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).eval()
    images = torch.rand(10, 3, 4, 4)
    labels = model(images).argmax(1)
    labels[:2] = (labels[:2] + 1) % 3
    return model, images, labels


def test_finetune_default_attacks_reproduce_the_rows_before_the_refactor() -> None:
    model, images, labels = _tiny_classifier()
    ev = RobustEvalConfig(eps=[8, 16], retrieval=False)
    names = attack_labels(ev.attacks)
    torch.manual_seed(1)
    rows = []
    for eps in ev.eps:  # as run_finetune runs its groups: budget by budget, attack by attack
        for name, entry in zip(names, ev.attacks, strict=True):
            rows += robust_rows(model, images, labels, [entry], [eps], None, 4, [name])
    assert {(r["attack"], r["restart"]) for r in rows} == {
        ("pgd10", 0),
        ("pgd10", 1),
        ("pgd50", 0),
        ("pgd50", 1),
        ("apgd-ce", 0),
        ("apgd-dlr", 0),
    }
    for group, (preds, robust, l2) in FINETUNE_BEFORE.items():
        name, eps = group.split("@")
        assert worst_case(rows, float(eps), name) == [bool(v) for v in robust], group
        runs = [
            [
                r
                for r in rows
                if r["attack"] == name and r["eps"] == float(eps) and r["restart"] == k
            ]
            for k in range(2 if name.startswith("pgd") else 1)
        ]
        for i in range(len(images)):
            # the old row held the best restart's adversarial image: one of the new rows
            assert any(
                run[i]["adv_pred"] == preds[i] and abs(run[i]["l2"] - l2[i]) <= 1e-4 for run in runs
            ), (group, i)


def test_evaluate_default_attack_reproduces_the_rows_before_the_refactor() -> None:
    model, images, labels = _tiny_classifier()
    rows = robust_rows(model, images, labels, [AttackEntry(name="pgd", steps=3)], [16, 8], 5, 4)
    for eps, (robust, l2) in EVALUATE_BEFORE.items():
        at = [r for r in rows if r["eps"] == eps]
        assert [r["robust_correct"] for r in at] == [bool(v) for v in robust]
        assert [r["l2"] for r in at] == pytest.approx(l2, abs=1e-4)


class _Counting(torch.nn.Module):
    """The tiny classifier, counting its forward passes on clean images (input gradient on or
    off) apart from those on any other input."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.model, self.images = model, images
        self.clean_calls = {"grad": 0, "no_grad": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(x, self.images[i : i + len(x)]) for i in range(len(self.images))):
            self.clean_calls["grad" if x.requires_grad else "no_grad"] += 1
        return self.model(x)


def test_robust_rows_share_clean_predictions_and_zero_gradient_flags() -> None:
    """The clean predictions are computed once and each attack's zero-gradient flags once for
    all budgets, within one call and across calls given the same ``memo`` (one call per attack
    and budget, as ``medshield finetune`` makes them); the rows are those of one attack and
    budget at a time, each recomputing both."""
    model, images, labels = _tiny_classifier()
    attacks = [AttackEntry(name="pgd", steps=3), AttackEntry(name="apgd-dlr", steps=3)]
    names, budgets = ["pgd", "apgd-dlr"], (4, 8, 16)
    batches = 3  # 10 images, 4 at a time
    counting = _Counting(model, images)
    one_call = robust_rows(counting, images, labels, attacks, budgets, 5, 4, early_stop=True)
    assert counting.clean_calls == {"grad": 2 * batches, "no_grad": batches}

    counting = _Counting(model, images)
    memo: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng():
        torch.manual_seed(5)
        per_group, alone = [], []
        for eps in budgets:
            for name, entry in zip(names, attacks, strict=True):
                per_group += robust_rows(
                    counting, images, labels, [entry], [eps], None, 4, [name], True, memo
                )
    assert counting.clean_calls == {"grad": 2 * batches, "no_grad": batches}
    assert set(memo) == {"clean_pred", "zero_gradient/pgd", "zero_gradient/apgd-dlr"}
    with torch.random.fork_rng():
        torch.manual_seed(5)
        for eps in budgets:
            for name, entry in zip(names, attacks, strict=True):
                attack = build_attack(entry, model, eps, early_stop=True)
                alone += [
                    {"attack": name, "eps": eps, **row}
                    for row in attacked_rows(model, attack, images, labels, 4)
                ]
    assert one_call == per_group == alone
    assert any(r["zero_gradient"] is False for r in alone)
    assert {r["clean_correct"] for r in alone} == {True, False}
