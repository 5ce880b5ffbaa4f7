"""Selecting a method's options on validation (``finetune.kwargs_grid``), jointly with the
learning rate, in one run and across a study's seeds; RAN's ablations inside such a grid."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from finetune_support import TINY_EVAL, write_study_config

from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.commands.studies.finetune import (
    _finetune_config,
    load_study_config,
    run_study_finetune,
)
from medshield.errors import ConfigError
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune.config import parse_finetune_config
from medshield.train.finetune.data import TrainData, load_train_data
from medshield.train.finetune.select import finetune_grid

PROBE = {  # an adversarial linear probe on 16 items, 4 held out
    "method": "adv-linear-probe",
    "steps": 1,
    "batch_size": 4,
    "max_train_items": None,
    "val_fraction": 0.25,
}


@pytest.fixture(scope="module")
def train16(data_dir: Path) -> TrainData:
    return load_train_data("chest_xray", 16, seed=0, data_dir=data_dir)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kwargs_grid": []}, "kwargs_grid is empty"),
        ({"kwargs_grid": [{}], "val_fraction": 0.0}, "picks the method's options on a validation"),
        ({"kwargs_grid": [{"rank": 4}]}, r"kwargs_grid entry \{'rank': 4\} does not fit"),
        ({"kwargs_grid": [{"beta": -1.0}]}, "beta must be >= 0"),
        # {} merged over kwargs trains beta 6, the same as {beta: 6}
        ({"kwargs": {"beta": 6.0}, "kwargs_grid": [{}, {"beta": 6.0}]}, "trains the same"),
    ],
)
def test_a_bad_kwargs_grid_fails_before_training(extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_finetune_config({**PROBE, **extra})


def test_the_candidates_are_each_learning_rate_with_each_alternative() -> None:
    grid = [{"beta": 1.0}, {"beta": 6.0, "pgd_steps": 2}]
    config = parse_finetune_config({**PROBE, "lr_grid": [1e-3, 1e-2], "kwargs_grid": grid})
    assert config.selects
    assert config.candidates == [(1e-3, grid[0]), (1e-3, grid[1]), (1e-2, grid[0]), (1e-2, grid[1])]
    one = config.candidate(1e-2, grid[1])
    assert one.lr == 1e-2 and one.kwargs == {"beta": 6.0, "pgd_steps": 2}
    assert one.lr_grid is None and one.kwargs_grid is None and not one.selects
    alone = parse_finetune_config({**PROBE, "lr": 3e-3, "kwargs_grid": grid})
    assert [lr for lr, _ in alone.candidates] == [3e-3, 3e-3]  # lr without an lr_grid
    assert not parse_finetune_config(PROBE).selects


def test_the_grid_keeps_the_best_learning_rate_and_options_together(
    base: MiniClip, train16: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medshield.train.finetune.select as select

    robust = iter([0.25, 0.5, 0.75, 0.5])  # the third candidate: lr 2e-3 with pgd_steps 1
    monkeypatch.setattr(select, "robust_validation_accuracy", lambda *_: next(robust))
    trained: list[tuple[float, dict]] = []
    finetune = select.finetune
    monkeypatch.setattr(
        select,
        "finetune",
        lambda model, cfg, *a, **k: (
            trained.append((cfg.lr, cfg.kwargs)) or finetune(model, cfg, *a, **k)
        ),
    )
    grid = [{"pgd_steps": 1}, {"pgd_steps": 2}]
    config = {**PROBE, "kwargs": {"beta": 3.0}, "lr_grid": [1e-3, 2e-3], "kwargs_grid": grid}
    result = finetune_grid(copy.deepcopy(base), config, "chest_xray", train=train16, progress=False)
    assert trained == [
        (1e-3, {"beta": 3.0, "pgd_steps": 1}),
        (1e-3, {"beta": 3.0, "pgd_steps": 2}),
        (2e-3, {"beta": 3.0, "pgd_steps": 1}),
        (2e-3, {"beta": 3.0, "pgd_steps": 2}),
    ]
    selection = result.report["lr_selection"]
    assert selection["scores"] == [0.25, 0.5, 0.75, 0.5]
    assert selection["candidates"] == [
        {"lr": 1e-3, "kwargs": grid[0]},
        {"lr": 1e-3, "kwargs": grid[1]},
        {"lr": 2e-3, "kwargs": grid[0]},
        {"lr": 2e-3, "kwargs": grid[1]},
    ]
    assert selection["pick"] == 2e-3 and selection["kwargs_pick"] == {"pgd_steps": 1}
    assert selection["kwargs_grid"] == grid and selection["grid"] == [1e-3, 2e-3]
    assert result.config.lr == 2e-3 and result.config.kwargs == {"beta": 3.0, "pgd_steps": 1}
    assert result.config.kwargs_grid is None and result.config.lr_grid is None
    # PGD-1 steps cost 1 + 3 passes an image, PGD-2 steps 2 + 3: 2 x (4 + 5) x 4 images
    assert selection["compute"]["image_forward"] == 2 * (4 + 5) * 4
    # another seed's run at this pick trains the same candidate
    again = parse_finetune_config(config).at_pick(selection)
    assert (again.lr, again.kwargs, again.selects) == (2e-3, result.config.kwargs, False)


def test_a_pick_made_elsewhere_must_fit_the_method(tmp_path: Path) -> None:
    finetune = {**PROBE, "kwargs_grid": [{}, {"beta": 1.0}]}
    base = {"name": "x", "output_dir": str(tmp_path), "finetune": finetune}
    FineTuneRunConfig.model_validate(
        {**base, "lr_selection": {"pick": 1e-3, "kwargs_pick": {"beta": 1.0}}}
    )
    with pytest.raises(ValueError, match="rank"):
        FineTuneRunConfig.model_validate(
            {**base, "lr_selection": {"pick": 1e-3, "kwargs_pick": {"rank": 4}}}
        )
    with pytest.raises(ValueError, match="must be a mapping"):
        FineTuneRunConfig.model_validate(
            {**base, "lr_selection": {"pick": 1e-3, "kwargs_pick": [1]}}
        )


def test_a_study_reuses_the_first_seeds_options(tmp_path: Path, data_dir: Path) -> None:
    grid = [{"pgd_steps": 1}, {"pgd_steps": 2}]
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[{"method": "adv-linear-probe", "finetune": {"kwargs_grid": grid}}],
        modalities=["chest_xray"],
        vqa_closed=False,
        robust={**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}], "retrieval": False},
        seeds=[3, 1],
        finetune={"steps": 2, "batch_size": 4, "max_train_items": 16, "val_fraction": 0.25},
    )
    cfg = load_study_config(config)
    run = Run(tmp_path / "study", cfg)
    run_study_finetune(cfg, run, log=lambda _: None)
    cells = tmp_path / "study" / "cells"
    name = "base__adv-linear-probe__chest_xray__seed{}"
    first = json.loads((cells / name.format(3) / "results.json").read_text())
    later = json.loads((cells / name.format(1) / "results.json").read_text())
    picked = first["report"]["lr_selection"]
    assert picked["kwargs_pick"] in grid and len(picked["scores"]) == 2
    assert later["report"]["lr_selection"] == {**picked, "from_seed": 3}
    saved = json.loads((cells / name.format(1) / "finetuned/finetune.json").read_text())
    assert saved["config"]["kwargs"] == picked["kwargs_pick"]
    assert saved["config"]["kwargs_grid"] is None
    # the later seed trained once, at the picked options: (k + 3) passes of 2 x 4 images
    steps = picked["kwargs_pick"]["pgd_steps"]
    assert later["report"]["compute"]["image_forward"] == (steps + 3) * 2 * 4
    # the table names the picked alternative
    text = (tmp_path / "study" / "tables.md").read_text()
    assert "| options |" in text and f"pgd_steps={steps}" in text


def test_ran_ablations_zero_their_terms_in_every_alternative(
    tmp_path: Path, data_dir: Path
) -> None:
    grid = [{}, {"align": 0.0}, {"cov": 0.5}]
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[{"method": "ran", "finetune": {"kwargs_grid": grid}}],
        ran_ablations=["realignment", "disentanglement"],
        finetune={"steps": 2, "val_fraction": 0.25},
    )
    cfg = load_study_config(config)
    specs = {spec.name: spec for spec in cfg.expanded_methods()}
    realign = _finetune_config(cfg, specs["ran-no_realignment"])
    # {} and {align: 0} are the same once re-alignment is off: trained once
    assert realign.kwargs_grid == [
        {"keep": 0.0, "align": 0.0},
        {"cov": 0.5, "keep": 0.0, "align": 0.0},
    ]
    for _, entry in realign.candidates:
        options = realign.candidate(realign.lr, entry).options
        assert options.align == 0 and options.keep == 0
    disent = _finetune_config(cfg, specs["ran-no_disentanglement"])
    assert len(disent.kwargs_grid) == 2  # {} and {cov: 0.5} meet at cov 0
    for _, entry in disent.candidates:
        options = disent.candidate(disent.lr, entry).options
        assert options.cov == options.svd == options.contrastive == 0
    assert _finetune_config(cfg, specs["ran"]).kwargs_grid == grid
