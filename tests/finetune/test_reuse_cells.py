"""A study's ``reuse_from``: finished cells of another study with the same cell config are
copied in, not trained (a later seed's too, once its first seed's pick is copied); a cell
whose config differs is trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_support import TINY_EVAL, write_study_config

import medshield.commands.studies.cells as cells_module
from medshield.commands.studies.finetune import load_study_config, run_study_finetune
from medshield.errors import ConfigError
from medshield.runs import Run

PROBE = {"method": "linear-probe", "finetune": {"lr_grid": [0.001, 0.01]}}


def _study(tmp_path: Path, data_dir: Path, name: str, methods: list[dict], **extra: Any) -> Path:
    folder = tmp_path / f"{name}_config"  # beside the study folder, not in it
    folder.mkdir()
    return write_study_config(
        folder,
        data_dir,
        name=name,
        output_dir=str(tmp_path),
        methods=methods,
        modalities=["chest_xray"],
        vqa_closed=False,
        robust={**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}], "retrieval": False},
        seeds=[3, 1],
        finetune={"steps": 2, "batch_size": 4, "max_train_items": 16, "val_fraction": 0.25},
        **extra,
    )


def _run(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run the study; the cells it trained."""
    trained: list[str] = []
    train = cells_module.run_finetune

    def counted(config: Any, *args: Any, **kwargs: Any) -> Any:
        trained.append(config.name)
        return train(config, *args, **kwargs)

    monkeypatch.setattr(cells_module, "run_finetune", counted)
    cfg = load_study_config(path)
    run_study_finetune(cfg, Run(Path(cfg.output_dir) / cfg.name, cfg), log=lambda _: None)
    return trained


def test_reuse_from_must_name_a_study_folder(tmp_path: Path, data_dir: Path) -> None:
    path = _study(tmp_path, data_dir, "b", [PROBE], reuse_from=[str(tmp_path)])
    with pytest.raises(ConfigError, match="is not a study folder"):
        load_study_config(path)


def test_a_study_copies_the_same_cells_and_trains_the_rest(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _study(tmp_path, data_dir, "a", [PROBE])
    assert len(_run(first, monkeypatch)) == 2
    extended = _study(
        tmp_path,
        data_dir,
        "b",
        [PROBE, {"method": "adv-linear-probe"}],
        reuse_from=[str(tmp_path / "a")],
    )
    trained = _run(extended, monkeypatch)
    probe = "base__linear-probe__chest_xray__seed{}"
    assert sorted(trained) == [f"base__adv-linear-probe__chest_xray__seed{s}" for s in (1, 3)]
    for seed in (3, 1):  # seed 1's config reads the copied seed 3's pick
        copied = tmp_path / "b" / "cells" / probe.format(seed) / "results.json"
        source = tmp_path / "a" / "cells" / probe.format(seed)
        assert copied.read_text() == (source / "results.json").read_text()
    rows = [
        json.loads(line) for line in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()
    ]
    reused = {row["cell"]: row.get("reused_from") for row in rows}
    assert reused[probe.format(1)] == str(tmp_path / "a" / "cells" / probe.format(1))
    assert reused["base__adv-linear-probe__chest_xray__seed3"] is None
    tables = (tmp_path / "b" / "tables.md").read_text()
    assert "| linear-probe |" in tables and "| adv-linear-probe |" in tables
    # another lr grid is another config: nothing to copy
    changed = {**PROBE, "finetune": {"lr_grid": [0.001, 0.003]}}
    other = _study(tmp_path, data_dir, "c", [changed], reuse_from=[str(tmp_path / "a")])
    assert len(_run(other, monkeypatch)) == 2
