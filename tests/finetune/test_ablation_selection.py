"""RAN's ablations at ``ran``'s pick (``ablation_selection: ran``) or at their own
(``own``): which cell each cell reads its selection from, and a study that trains each
ablation cell once at ``ran``'s learning rate and options with the part switched off."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_support import TINY_EVAL, write_study_config

import medshield.commands.finetune as commands
from medshield.commands.studies.finetune import (
    load_study_config,
    pick_source,
    run_study_finetune,
)
from medshield.errors import ConfigError
from medshield.runs import Run

GRIDS = {"lr_grid": [0.001, 0.003], "kwargs_grid": [{}, {"align": 0.5}]}


def _study(tmp_path: Path, data_dir: Path, **extra: Any) -> Path:
    fields: dict[str, Any] = {
        "methods": [{"method": "ran", "kwargs": {"pgd_steps": 1}, "finetune": GRIDS}],
        "ran_ablations": ["realignment"],
        "modalities": ["chest_xray"],
        "vqa_closed": False,
        "robust": {**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}], "retrieval": False},
        "seeds": [3, 1],
        "finetune": {"steps": 2, "batch_size": 4, "max_train_items": 16, "val_fraction": 0.25},
        **extra,
    }
    return write_study_config(tmp_path, data_dir, **fields)


def test_ablation_selection_ran_needs_a_ran_method(tmp_path: Path, data_dir: Path) -> None:
    path = _study(tmp_path, data_dir, methods=[{"method": "lora"}], ablation_selection="ran")
    with pytest.raises(ConfigError, match="ablation_selection: ran needs a `ran` method"):
        load_study_config(path)
    # without ablations the setting has nothing to apply to (a config's other methods alone)
    path = _study(
        tmp_path, data_dir, methods=[{"method": "lora"}], ablation_selection="ran", ran_ablations=[]
    )
    assert load_study_config(path).ablation_selection == "ran"


@pytest.mark.parametrize(
    ("selection", "ran_finetune", "expected"),
    [
        # at ran's pick: every seed of the ablation reads ran's first seed
        ("ran", GRIDS, {3: ("ran", 3), 1: ("ran", 3)}),
        # its own pick: the first seed selects, the later one reads it
        ("own", GRIDS, {3: None, 1: ("ran-no_realignment", 3)}),
        # ran selects nothing (one lr, no options): nothing to read
        ("ran", {}, {3: None, 1: None}),
    ],
)
def test_each_cell_reads_its_selection_from_the_right_cell(
    tmp_path: Path,
    data_dir: Path,
    selection: str,
    ran_finetune: dict[str, Any],
    expected: dict[int, tuple[str, int] | None],
) -> None:
    methods = [{"method": "ran", "finetune": ran_finetune}]
    cfg = load_study_config(
        _study(tmp_path, data_dir, methods=methods, ablation_selection=selection)
    )
    for seed, source in expected.items():
        key = ("base", "ran-no_realignment", "chest_xray", seed)
        assert pick_source(cfg, key) == (source and ("base", *source[:1], "chest_xray", source[1]))
    ran_later = pick_source(cfg, ("base", "ran", "chest_xray", 1))
    assert ran_later == (("base", "ran", "chest_xray", 3) if ran_finetune else None)
    assert pick_source(cfg, ("base", "ran", "chest_xray", 3)) is None


def test_ablations_train_once_at_rans_pick_with_their_part_off(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []  # (one training or a grid, re-alignment off)

    def counted(kind: str, train: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(base: Any, ft: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((kind, ft.options.align == 0))
            return train(base, ft, *args, **kwargs)

        return wrapped

    for kind in ("finetune", "finetune_grid"):
        monkeypatch.setattr(commands, kind, counted(kind, getattr(commands, kind)))
    cfg = load_study_config(_study(tmp_path, data_dir, ablation_selection="ran"))
    run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=lambda _: None)
    # ran: a grid on seed 3, one training on seed 1; the ablation: one training a seed (with
    # `own` its seed 3 would train a grid of its own)
    once, ablated = ("finetune", False), ("finetune", True)
    assert sorted(calls) == [once, ablated, ablated, ("finetune_grid", False)]
    cells = tmp_path / "study" / "cells"

    def report(method: str, seed: int) -> dict[str, Any]:
        path = cells / f"base__{method}__chest_xray__seed{seed}" / "results.json"
        return json.loads(path.read_text())["report"]

    ran = report("ran", 3)["lr_selection"]
    assert len(ran["scores"]) == 4  # 2 learning rates x 2 alternatives
    off = {"keep": 0.0, "align": 0.0}
    for seed in (3, 1):
        ablated = report("ran-no_realignment", seed)
        assert ablated["lr_selection"] == {
            **ran,
            "from_seed": 3,
            "from_method": "ran",
            "kwargs_pick": {**ran["kwargs_pick"], **off},
        }
        folder = cells / f"base__ran-no_realignment__chest_xray__seed{seed}"
        saved = json.loads((folder / "finetuned/finetune.json").read_text())["config"]
        assert saved["lr"] == ran["pick"]
        assert saved["kwargs"]["keep"] == saved["kwargs"]["align"] == 0
    text = (tmp_path / "study" / "tables.md").read_text()
    edge = "top" if ran["pick"] == 0.003 else "bottom"  # a grid of 2: every pick is an edge
    assert f"{ran['pick']:.3g}* (ran's) ({edge} of grid)" in text
