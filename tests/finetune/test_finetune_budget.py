"""The fine-tuning budget: optimiser steps, the schedule, learning-rate selection on validation
(also across a study's seeds) and the counted training compute."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from finetune_support import TINY_EVAL, run_method, write_study_config

from medshield.attacks.pgd import PGD
from medshield.commands.studies.finetune import load_study_config, run_study_finetune
from medshield.errors import ConfigError
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune.config import parse_finetune_config
from medshield.train.finetune.data import (
    VQA_TASK,
    TrainData,
    load_train_data,
    split_validation,
    validation_accuracy,
)
from medshield.train.finetune.loop import lr_factor, robust_validation_accuracy
from medshield.train.finetune.select import finetune_grid, is_degenerate, pick_at_edge


@pytest.fixture(scope="module")
def train16(data_dir: Path) -> TrainData:
    return load_train_data("chest_xray", 16, seed=0, data_dir=data_dir)


def test_the_step_budget_counts_optimiser_steps_across_reshuffles(
    base: MiniClip, train: TrainData
) -> None:
    # 8 items in batches of 3: 2 full batches and a 2-item tail, 3 steps a pass; 7 steps end
    # one step into the third pass
    _, result = run_method(base, train, "linear-probe", epochs=None, steps=7, batch_size=3)
    report = result.report
    assert report["steps"] == 7 and report["steps_per_pass"] == 3
    history = report["history"]
    assert [h["step"] for h in history] == [3, 6, 7]  # one entry a pass, and the last step
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # the linear probe passes each batch through the tower once: 3 + 3 + 2 images a pass
    assert report["compute"]["image_forward"] == 8 + 8 + 3
    assert report["compute"]["image_backward"] == 0  # the tower is frozen
    _, result = run_method(base, train, "linear-probe", epochs=2, batch_size=4, log_every=1)
    assert [h["step"] for h in result.report["history"]] == [1, 2, 3, 4]


def test_steps_and_epochs_are_one_budget() -> None:
    assert parse_finetune_config({"method": "lora"}).epochs == 10  # the default budget
    assert parse_finetune_config({"method": "lora", "steps": 5}).epochs is None
    with pytest.raises(ConfigError, match=r"steps \(5\) and epochs \(2\) are both set"):
        parse_finetune_config({"method": "lora", "steps": 5, "epochs": 2})
    # a saved config (both keys, one null) reads back
    dumped = parse_finetune_config({"method": "lora", "steps": 5}).model_dump()
    assert parse_finetune_config(dumped).steps == 5


def test_cosine_schedule_warms_up_then_decays_to_about_zero(
    base: MiniClip, train: TrainData
) -> None:
    factor = lr_factor("cosine", warmup=2, total=10)
    assert [factor(s) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    values = [factor(s) for s in range(2, 10)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8))) and values[-1] < 0.04
    assert [lr_factor("constant", 2, 10)(s) for s in (0, 1, 5, 9)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1]
    )
    settings = {"schedule": "cosine", "warmup_fraction": 0.2, "lr": 0.01, "log_every": 1}
    _, result = run_method(base, train, "linear-probe", epochs=None, steps=10, **settings)
    lrs = [h["lr"] for h in result.report["history"]]
    assert lrs == pytest.approx([0.01 * factor(s) for s in range(10)])


def test_lr_grid_keeps_the_best_validation_score_and_records_the_grid(
    base: MiniClip, train16: TrainData
) -> None:
    grid = [1e-6, 0.05, 1e-4]
    config = {
        "method": "linear-probe",
        "steps": 4,
        "batch_size": 4,
        "max_train_items": None,
        "val_fraction": 0.25,
        "lr_grid": grid,
    }
    kept = copy.deepcopy(base)
    logged: list[str] = []
    result = finetune_grid(
        kept,
        config,
        "chest_xray",
        train=train16,
        progress=False,
        latency_repeats=1,
        log=logged.append,
    )
    assert all(
        (a == b).all() for a, b in zip(kept.parameters(), base.parameters(), strict=True)
    )  # the base model is left alone
    selection = result.report["lr_selection"]
    assert selection["grid"] == grid and selection["select_by"] == "val_clean_accuracy"
    scores = selection["scores"]
    assert len(scores) == 3 and scores == selection["val_clean_accuracy"]
    assert selection["pick"] == grid[scores.index(max(scores))] == result.config.lr
    assert result.config.lr_grid is None and selection["val_items"] == 4
    _, val = split_validation(train16, 0.25, seed=0)
    assert validation_accuracy(result.classifier, val, 4) == pytest.approx(max(scores))
    # the grid's compute adds up its three trainings of 4 steps of 4 images each
    assert selection["compute"]["image_forward"] == 3 * 16
    # a pick at the grid's top or bottom is logged (a better rate may lie beyond it)
    edge = pick_at_edge(selection)
    assert any("extend finetune.lr_grid" in line for line in logged) == (edge is not None)


@pytest.mark.parametrize(
    ("grid", "pick", "edge"),
    [
        ([0.001, 0.003, 0.01], 0.01, "top"),
        ([0.01, 0.001, 0.003], 0.001, "bottom"),  # the grid's order does not matter
        ([0.001, 0.003, 0.01], 0.003, None),
        ([0.003], 0.003, None),  # one rate: no grid to extend
        ([0.003, 0.003], 0.003, None),
    ],
)
def test_a_pick_at_the_edge_of_the_grid_is_flagged(
    grid: list[float], pick: float, edge: str | None
) -> None:
    assert pick_at_edge({"grid": grid, "pick": pick}) == edge


def test_adversarial_methods_pick_by_robust_validation_accuracy(
    base: MiniClip, train16: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {
        "method": "adv-linear-probe",
        "steps": 2,
        "batch_size": 4,
        "max_train_items": None,
        "val_fraction": 0.25,
        "lr_grid": [1e-3, 1e-2],
        "kwargs": {"pgd_steps": 1},
    }
    result = finetune_grid(copy.deepcopy(base), config, "chest_xray", train=train16, progress=False)
    selection = result.report["lr_selection"]
    assert selection["select_by"] == "val_robust_accuracy"
    assert selection["scores"] == selection["val_robust_accuracy"]
    assert len(selection["val_clean_accuracy"]) == 2
    state = torch.random.get_rng_state()
    attacked: list[torch.nn.Module] = []
    perturb = PGD.perturb
    monkeypatch.setattr(
        PGD, "perturb", lambda self, *a, **k: attacked.append(self.model) or perturb(self, *a, **k)
    )
    robust = robust_validation_accuracy(result.classifier, result.config, result.val, 4, 0)  # type: ignore[arg-type]
    assert robust == pytest.approx(max(selection["scores"]))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    # scored on the evaluation copy (BatchNorm folded), as every evaluation
    assert attacked and all(m is not result.classifier for m in attacked)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in attacked[0].modules())


def test_val_robust_logs_robust_validation_accuracy_and_leaves_training_as_it_was(
    base: MiniClip, train16: TrainData
) -> None:
    config = {
        "epochs": None,
        "steps": 4,
        "batch_size": 4,
        "log_every": 2,
        "max_train_items": None,
        "val_fraction": 0.25,
        "kwargs": {"pgd_steps": 1},
    }
    _, plain = run_method(base, train16, "adv-linear-probe", **config)
    _, scored = run_method(base, train16, "adv-linear-probe", val_robust=True, **config)
    history = scored.report["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert all(0 <= h["val_robust_accuracy"] <= h["val_accuracy"] + 0.25 for h in history)
    assert all("val_robust_accuracy" not in h for h in plain.report["history"])
    # the last entry's score is the one the learning-rate selection gives the final model
    final = robust_validation_accuracy(scored.classifier, scored.config, scored.val, 4, 0)  # type: ignore[arg-type]
    assert history[-1]["val_robust_accuracy"] == pytest.approx(final)
    # the attacks draw from a forked random state: the same losses, weights and compute
    strip = [{k: v for k, v in h.items() if k != "val_robust_accuracy"} for h in history]
    assert strip == plain.report["history"]
    assert scored.report["compute"]["image_forward"] == plain.report["compute"]["image_forward"]
    for (name, a), (_, b) in zip(
        plain.classifier.state_dict().items(), scored.classifier.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"method": "adv-lora", "val_fraction": 0.0}, "set val_fraction above 0"),
        ({"method": "lora", "val_fraction": 0.2}, "lora is a clean method"),
    ],
)
def test_val_robust_needs_a_validation_split_and_an_adversarial_method(
    extra: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_finetune_config({**extra, "val_robust": True})


def test_val_items_draws_the_validation_set_beside_the_training_items(
    base: MiniClip, train16: TrainData, data_dir: Path
) -> None:
    config = {"epochs": None, "steps": 1, "max_train_items": None, "val_items": 12}
    _, result = run_method(base, train16, "linear-probe", **config)
    val = result.val
    assert val is not None and len(val.labels) == 12
    assert torch.bincount(val.labels).tolist() == [6, 6]  # class-balanced
    assert not set(val.ids) & set(train16.ids)  # none of them is trained on
    assert result.report["train_items"] == 16  # and every training item still is
    assert "val_accuracy" in result.report["history"][-1]
    # the validation items are the split's own rows, as a draw without exclusions gives them
    split = load_train_data("chest_xray", None, 0, data_dir)
    rows = [split.ids.index(i) for i in val.ids]
    assert torch.equal(val.images, split.images[rows])
    # on the VQA task the question ids are left out
    vqa = load_train_data(VQA_TASK, 8, 0, data_dir)
    rest = load_train_data(VQA_TASK, 8, 0, data_dir, exclude=vqa.ids)
    assert rest.ids and not set(rest.ids) & set(vqa.ids)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"val_items": 100, "val_fraction": 0.2}, "both make a validation set"),
        ({"val_items": 1}, "greater than or equal to 2"),
    ],
)
def test_val_items_is_one_validation_set(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_finetune_config({"method": "ran", **extra})
    grid = parse_finetune_config({"method": "ran", "val_items": 100, "lr_grid": [1e-3]})
    assert grid.validates and grid.val_fraction == 0


def select_with_scores(
    base: MiniClip,
    train16: TrainData,
    monkeypatch: pytest.MonkeyPatch,
    clean: list[float],
    robust: list[float],
    predicted: list[int] | None = None,
) -> dict:
    """``lr_selection`` of an adv-linear-probe grid of 3 (1e-3, 2e-3, 3e-3) whose runs score
    the given clean and robust validation accuracies and predict ``predicted`` classes (default:
    both), in grid order."""
    import medshield.train.finetune.select as select

    clean_scores, robust_scores = iter(clean), iter(robust)
    classes = iter(predicted or [2] * len(clean))
    monkeypatch.setattr(select, "robust_validation_accuracy", lambda *_: next(robust_scores))
    monkeypatch.setattr(select, "validation_accuracy", lambda *_: next(clean_scores))
    monkeypatch.setattr(select, "classes_predicted", lambda *_: next(classes))
    config = {
        "method": "adv-linear-probe",
        "steps": 1,
        "batch_size": 4,
        "max_train_items": None,
        "val_fraction": 0.25,
        "lr_grid": [1e-3, 2e-3, 3e-3],
        "kwargs": {"pgd_steps": 1},
    }
    result = finetune_grid(copy.deepcopy(base), config, "chest_xray", train=train16, progress=False)
    return result.report["lr_selection"]


def test_a_robust_tie_goes_to_the_higher_clean_accuracy(
    base: MiniClip, train16: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TeCoA at 80 steps scored 0 robust at every learning rate: the tie goes to the run with
    the best clean validation accuracy, not blindly to the first of the grid."""
    selection = select_with_scores(base, train16, monkeypatch, [0.5, 0.9, 0.7], [0.0] * 3)
    assert selection["scores"] == [0.0, 0.0, 0.0]
    assert selection["pick"] == 2e-3


def test_compute_counts_the_adversarys_passes(base: MiniClip, train: TrainData) -> None:
    """Per step the TRADES linear probe passes each image through the tower k + 3 times (the
    clean target, k PGD steps, the clean and adversarial loss terms) and back k times (the
    PGD input gradients); the clean probe once forward and never back."""
    steps = {"epochs": None, "steps": 3, "batch_size": 4}
    _, clean = run_method(base, train, "linear-probe", **steps)
    for k in (1, 3):
        _, adv = run_method(base, train, "adv-linear-probe", kwargs={"pgd_steps": k}, **steps)
        compute = adv.report["compute"]
        assert compute["image_forward"] == (k + 3) * clean.report["compute"]["image_forward"]
        assert compute["image_backward"] == k * 3 * 4
        assert compute["train_flops_estimate"] > clean.report["compute"]["train_flops_estimate"]


def test_a_study_reuses_the_first_seeds_learning_rate(tmp_path: Path, data_dir: Path) -> None:
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[{"method": "linear-probe"}],
        modalities=["chest_xray"],
        vqa_closed=False,
        robust={
            **TINY_EVAL,
            "attacks": [{"name": "pgd", "steps": 1}],
            "retrieval": False,
        },
        seeds=[3, 1],
        finetune={
            "steps": 2,
            "batch_size": 4,
            "max_train_items": 16,
            "val_fraction": 0.25,
            "lr_grid": [1e-6, 0.05],
        },
    )
    cfg = load_study_config(config)
    run = Run(tmp_path / "study", cfg)
    run_study_finetune(cfg, run, log=lambda _: None)
    cells = tmp_path / "study" / "cells"
    first = json.loads((cells / "base__linear-probe__chest_xray__seed3/results.json").read_text())
    later = json.loads((cells / "base__linear-probe__chest_xray__seed1/results.json").read_text())
    picked = first["report"]["lr_selection"]
    assert "from_seed" not in picked and len(picked["scores"]) == 2
    assert later["report"]["lr_selection"] == {**picked, "from_seed": 3}
    saved = json.loads(
        (cells / "base__linear-probe__chest_xray__seed1/finetuned/finetune.json").read_text()
    )
    assert saved["config"]["lr"] == picked["pick"] and saved["config"]["lr_grid"] is None
    # the later seed trained once: its own compute is one training's, not the grid's
    assert later["report"]["compute"]["image_forward"] == 2 * 4
    # resuming reads the pick back and runs nothing
    result = run_study_finetune(load_study_config(config), run, log=lambda _: None)
    assert result["cells"] == 2


@pytest.mark.parametrize(
    ("clean", "robust", "pick", "degenerate"),
    [
        # adv-adapter at lr 0.01 collapsed onto one class: robust 0.5 = its clean accuracy
        ([0.5, 0.8, 0.9], [0.5, 0.3, 0.4], 3e-3, [True, False, False]),
        # every run collapsed: the usual key decides among them
        ([0.5, 0.25, 0.5], [0.5, 0.25, 0.25], 1e-3, [True, True, True]),
    ],
)
def test_a_run_collapsed_onto_one_class_is_not_picked(
    base: MiniClip,
    train16: TrainData,
    monkeypatch: pytest.MonkeyPatch,
    clean: list[float],
    robust: list[float],
    pick: float,
    degenerate: list[bool],
) -> None:
    selection = select_with_scores(base, train16, monkeypatch, clean, robust)
    assert selection["val_majority_accuracy"] == 0.5  # 4 held-out items, 2 per class
    assert selection["degenerate"] == degenerate
    assert selection["pick"] == pick


def test_a_run_that_predicts_half_of_the_classes_or_fewer_is_not_picked(
    base: MiniClip, train16: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The best robust score belongs to a run that predicts one class of two: refused, and the
    selection records how many classes each run predicts."""
    selection = select_with_scores(
        base, train16, monkeypatch, [0.75, 0.75, 0.75], [0.25, 0.5, 0.25], predicted=[2, 1, 2]
    )
    assert selection["degenerate"] == [False, True, False]
    assert selection["val_classes_predicted"] == [2, 1, 2] and selection["val_classes"] == 2
    assert selection["pick"] == 1e-3


def test_a_partial_collapse_on_eight_classes_is_degenerate() -> None:
    labels = torch.arange(8).repeat(13)  # 104 items, 13 per class: majority share 0.125
    assert is_degenerate(0.25, labels, predicted=4)  # well above chance, on half the classes
    assert not is_degenerate(0.25, labels, predicted=5)
    assert not is_degenerate(0.25, labels)  # without the count, the accuracy rule alone
    assert is_degenerate(0.125, labels, predicted=8)


def test_a_constant_classifiers_accuracy_in_float32_counts_as_degenerate() -> None:
    """LoRA at lr 1e-2 predicted the majority class of 103 validation items: its float32
    accuracy, 52/103, sits a hair above 52/103 in float64 and was not flagged."""
    labels = torch.tensor([0] * 52 + [1] * 51)
    constant = float((torch.zeros(103, dtype=torch.long) == labels).float().mean())
    assert constant > 52 / 103  # the rounding that hid it
    assert is_degenerate(constant, labels)
    assert not is_degenerate(53 / 103, labels)
