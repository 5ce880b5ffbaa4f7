"""Robust evaluation: zero-shot under PGD with sanity flags, retrieval under a multimodal attack,
VQA-RAD under attack, and their aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medshield.attacks import CoAttack
from medshield.errors import InputError
from medshield.eval.metrics import summarize
from medshield.eval.retrieval import adversarial_retrieval_rows, retrieval_rows
from medshield.eval.robust import check_eps_values, robust_flags, robust_zero_shot_rows
from medshield.eval.vqa import vqa_closed_rows
from medshield.models.mini_clip import MiniClip


@pytest.fixture(scope="module")
def model() -> MiniClip:
    torch.manual_seed(0)
    return MiniClip(embed_dim=32, image_size=32, pretrained=False).eval()


def test_robust_zero_shot_rows_respect_budgets_and_summarize(
    model: MiniClip, data_dir: Path
) -> None:
    rows = robust_zero_shot_rows(
        model, "breast_ultrasound", eps_values=[4, 1], steps=3, max_items=6, data_dir=data_dir
    )
    assert len(rows) == 6 and {r["task"] for r in rows} == {"robust_zero_shot"}
    for r in rows:
        assert list(r["linf"]) == ["1", "4"]  # sorted budgets
        for key in ("1", "4"):
            assert r["linf"][key] <= float(key) + 1e-3
            assert 0 <= r["adv_min"][key] <= r["adv_max"][key] <= 1
            assert r["robust_correct"][key] == (r["clean_correct"] and r["adv_correct"][key])
    metrics = summarize(rows, n_resamples=50)["robust_zero_shot"]["breast_ultrasound"]
    assert set(metrics) == {"clean_accuracy", "robust_accuracy@1", "robust_accuracy@4"}
    clean = sum(r["clean_correct"] for r in rows) / 6
    assert metrics["clean_accuracy"]["value"] == pytest.approx(clean)
    assert metrics["robust_accuracy@4"]["value"] <= metrics["clean_accuracy"]["value"]
    flags = {f.name: f for f in robust_flags(rows)}
    assert {
        "budget@1",
        "range@4",
        "robust<=clean@1",
        "stronger<=weaker@1->4",
        "zero-gradients",
    } <= set(flags)
    assert flags["budget@1"].passed and flags["budget@4"].passed and flags["range@1"].passed


def test_robust_rows_leave_the_model_as_it_was(model: MiniClip, data_dir: Path) -> None:
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    robust_zero_shot_rows(
        model, "breast_ultrasound", eps_values=[1], steps=1, max_items=2, data_dir=data_dir
    )
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    model.eval()


def _row(clean: bool, robust: dict[str, bool], linf: dict[str, float], zero: bool = False) -> dict:
    return {
        "task": "robust_zero_shot",
        "modality": "m",
        "index": 0,
        "clean_correct": clean,
        "adv_correct": robust,
        "robust_correct": {k: clean and v for k, v in robust.items()},
        "linf": linf,
        "adv_min": dict.fromkeys(linf, 0.0),
        "adv_max": dict.fromkeys(linf, 1.0),
        "size": 12,
        "zero_gradient": zero,
    }


def test_robust_flags_catch_broken_evaluations() -> None:
    ok = [_row(True, {"1": True, "2": False}, {"1": 1.0, "2": 2.0})]
    assert all(f.passed for f in robust_flags(ok))
    over = [_row(True, {"1": True, "2": False}, {"1": 1.5, "2": 2.0})]
    assert not {f.name: f for f in robust_flags(over)}["budget@1"].passed
    weaker = [_row(True, {"1": False, "2": True}, {"1": 1.0, "2": 2.0})]
    assert not {f.name: f for f in robust_flags(weaker)}["stronger<=weaker@1->2"].passed
    masked = [_row(True, {"1": True, "2": True}, {"1": 1.0, "2": 2.0}, zero=True)]
    assert not {f.name: f for f in robust_flags(masked)}["zero-gradients"].passed


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
