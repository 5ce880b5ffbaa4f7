"""`medshield study finetune`: cells, the aggregated table with CIs, plots, resume, bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_support import timed_cell, write_study_config

from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.commands.studies.cells import CellKey, run_cells
from medshield.commands.studies.finetune import (
    _finetune_config,
    cell_config,
    cell_name,
    load_study_config,
    run_study_finetune,
)
from medshield.errors import ConfigError
from medshield.runs import Run
from medshield.train.finetune.ran import RANOptions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_shipped_ablation_shares_the_main_studys_heavy_ran_cells() -> None:
    """The ablation config's ``ran`` cells are the main study's heavy ``ran`` cells, so a run
    of one can reuse the other's; both train every method for the same >= 1,000 steps and pick
    its learning rate from a grid."""
    main = load_study_config(CONFIGS / "study_finetune.yaml")
    ablation = load_study_config(CONFIGS / "study_finetune_ablation.yaml")
    main_ran = next(s for s in main.expanded_methods() if s.name == "ran")
    ablation_ran = next(s for s in ablation.expanded_methods() if s.name == "ran")
    for task in ("chest_xray", "vqa_rad_closed"):
        assert cell_config(main, "heavy", main_ran, task, 1) == cell_config(
            ablation, "heavy", ablation_ran, task, 1
        )
    for config in (main, ablation):  # issue 20's budget: >= 1,000 steps, cosine, lr grids
        assert config.finetune["steps"] >= 1000 and config.finetune["schedule"] == "cosine"
        for spec in config.expanded_methods():
            assert len(_finetune_config(config, spec).lr_grid or []) >= 3
    assert {s.name for s in ablation.expanded_methods()} == {"ran"} | {
        f"ran-no_{term}"
        for term in ("task_clean", "beta", "keep", "align", "cov", "svd", "contrastive")
    }


def test_the_shipped_studies_train_tecoa_with_frozen_batchnorm_statistics() -> None:
    """TeCoA scored 0.000 robust with BatchNorm in train mode on the CPU headline; the shipped
    studies freeze its statistics; every other method keeps the default."""
    for name in ("study_finetune.yaml", "study_finetune_headline.yaml"):
        config = load_study_config(CONFIGS / name)
        modes = {s.name: _finetune_config(config, s).batchnorm for s in config.expanded_methods()}
        assert modes.pop("tecoa") == "frozen"
        assert set(modes.values()) == {"train"}


def test_the_budget_study_is_the_headline_at_four_times_the_steps() -> None:
    """``study_finetune_budget.yaml`` (why RAN's lead fades with the budget) trains on the
    headline's settings at 320 steps (logged every 10), every variant at the 80-step
    headline's pick of 3e-3; ``ran-trades`` is RAN with both its re-alignment and its
    disentanglement off."""
    budget = load_study_config(CONFIGS / "study_finetune_budget.yaml")
    headline = load_study_config(CONFIGS / "study_finetune_headline.yaml")
    assert budget.finetune == {**headline.finetune, "steps": 320, "log_every": 10}
    assert budget.robust == headline.robust and budget.modalities == headline.modalities
    specs = {s.name: s for s in budget.expanded_methods()}
    assert list(specs) == [
        "adv-lora",
        "ran",
        "ran-no_realignment",
        "ran-no_disentanglement",
        "ran-trades",
        "ran-rank13",
    ]
    assert {_finetune_config(budget, s).lr for s in specs.values()} == {0.003}
    both_off = {**specs["ran-no_realignment"].kwargs, **specs["ran-no_disentanglement"].kwargs}
    assert RANOptions().keep == 0  # so ran-trades need not set it
    assert specs["ran-trades"].kwargs == {k: v for k, v in both_off.items() if k != "keep"}
    assert specs["ran-rank13"].kwargs == {"rank": 13}


def test_the_headline_trains_every_method_at_one_flat_budget() -> None:
    """The CPU headline: one step budget for every method (480, where robust validation
    stopped rising at 640), each adversarial method logging its robust validation curve, RAN's
    three parts ablated at RAN's pick."""
    config = load_study_config(CONFIGS / "study_finetune_headline.yaml")
    specs = config.expanded_methods()
    finetunes = {s.name: _finetune_config(config, s) for s in specs}
    assert {ft.steps for ft in finetunes.values()} == {480}
    robust = {name for name, ft in finetunes.items() if ft.val_robust}
    assert robust == {name for name in finetunes if name not in ("linear-probe", "lora")}
    assert config.ablation_selection == "ran"
    assert [s.name for s in specs if "-no_" in s.name] == [
        "ran-no_noise_aware",
        "ran-no_realignment",
        "ran-no_disentanglement",
    ]


def test_ran_parts_are_ablated_together_and_unknown_names_refused() -> None:
    """``ran_ablations: parts`` switches off each of RAN's three parts (all of its loss terms)
    in one variant; a name that is neither a term nor a part is refused."""
    config = load_study_config(CONFIGS / "study_finetune_headline.yaml", ["ran_ablations=parts"])
    variants = {s.name: s.kwargs for s in config.expanded_methods() if "-no_" in s.name}
    assert set(variants) == {"ran-no_noise_aware", "ran-no_realignment", "ran-no_disentanglement"}
    assert variants["ran-no_realignment"] == {"keep": 0.0, "align": 0.0}
    assert variants["ran-no_disentanglement"] == {"contrastive": 0.0, "cov": 0.0, "svd": 0.0}
    assert variants["ran-no_noise_aware"] == {"beta": 0.0}
    with pytest.raises(ConfigError, match="parts: noise_aware, realignment, disentanglement"):
        load_study_config(CONFIGS / "study_finetune_headline.yaml", ["ran_ablations=[nosuch]"])


def test_study_runs_cells_aggregates_with_cis_plots_and_resumes(
    tmp_path: Path, data_dir: Path
) -> None:
    config = write_study_config(
        tmp_path,
        data_dir,
        methods=[
            {"method": "linear-probe"},
            {"method": "ran", "kwargs": {"placement": "head", "rectifier": "linear", "rank": 4}},
        ],
        ran_ablations=["svd"],
        modalities=["chest_xray"],
        vqa_closed=False,
    )
    cfg = load_study_config(config)
    run = Run(tmp_path / "study", cfg)
    result = run_study_finetune(cfg, run, log=lambda _: None)
    table = {row["method"]: row for row in result["table"]}
    assert set(table) == {"linear-probe", "ran", "ran-no_svd"}
    for row in table.values():
        clean = row["clean_accuracy"]
        assert clean["n"] == 4 and clean["ci_low"] <= clean["value"] <= clean["ci_high"]
        assert "robust/pgd@2" in row and "robust/worst@2" in row  # one PGD entry: "pgd"
        assert row["majority_accuracy"]["value"] == pytest.approx(0.5)  # 2 + 2 test images
        assert row["shuffled_image_accuracy"]["n"] == 4
        for task in ("retrieval_i2t", "retrieval_i2t_adv", "retrieval_t2i", "retrieval_t2i_adv"):
            recall = row[f"{task}/R@1"]
            assert recall["n"] == 4 and recall["ci_low"] <= recall["value"] <= recall["ci_high"]
    assert table["ran"]["flops_ratio"] == pytest.approx(1.0)  # folded linear rectifier
    assert table["ran"]["trainable_params"] < 10_000
    assert (tmp_path / "study" / "table.md").is_file() and (
        tmp_path / "study" / "table.csv"
    ).is_file()
    assert (tmp_path / "study" / "robust_vs_clean_base_eps2.png").stat().st_size > 1000
    assert (tmp_path / "study" / "retrieval_i2t_base.png").stat().st_size > 1000
    assert "retrieval_t2i_adv/R@1" in (tmp_path / "study" / "table.md").read_text()
    # the issue-20 report (tests/finetune/test_finetune_report.py checks its contents)
    for name in ("tables.md", "targets.md", "targets.json", "ablation.md", "curves.md"):
        assert (tmp_path / "study" / name).is_file()
    for name in ("curves.png", "ran_terms.png"):
        assert (tmp_path / "study" / name).stat().st_size > 1000
    (section,) = result["task_tables"]
    assert section["task"] == "chest_xray" and section["chance"] == 0.5
    assert [r["method"] for r in section["rows"]] == ["linear-probe", "ran", "ran-no_svd"]
    (effect,) = result["ablation"]
    assert (effect["ran"], effect["ablated"], effect["delta_clean"]["n"]) == (
        "ran",
        "ran-no_svd",
        4,
    )
    assert result["ran_terms"]["cell"] == "base__ran__chest_xray__seed0"
    assert "svd" in result["ran_terms"]["terms"]
    assert {t["verdict"] for t in result["targets"]} == {"NOT MEASURED"}  # no tecoa, adv-*
    logs: list[str] = []
    again = run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=logs.append)
    assert logs == [] and again["table"] == result["table"]

    # a cell run before the shuffled control existed has no shuffled rows: the table leaves
    # that reference out instead of failing
    cell = tmp_path / "study" / "cells" / "base__linear-probe__chest_xray__seed0"
    samples = cell / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    kept = [r for r in rows if r.get("group") != "shuffled"]
    assert len(kept) == len(rows) - 4
    samples.write_text("".join(json.dumps(r) + "\n" for r in kept))
    older = run_study_finetune(cfg, Run(tmp_path / "study", cfg), log=lambda _: None)
    older = {row["method"]: row for row in older["table"]}
    assert "shuffled_image_accuracy" not in older["linear-probe"]
    assert "shuffled_image_accuracy" in older["ran"]

    bad = config.read_text().replace('"svd"', '"spectrum"')
    config.write_text(bad)
    with pytest.raises(ConfigError, match="unknown RAN terms"):
        load_study_config(config)


HEAVY_IMPORTS = ("peft", "transformers", "scipy.stats", "sklearn", "matplotlib")


def test_the_study_process_schedules_cells_without_the_heavy_imports() -> None:
    # the study process validates and builds every cell's config before its workers start: the
    # imports only a cell needs (peft, transformers, scipy, sklearn) would delay every worker
    script = f"""
import sys
from medshield.commands import cli
from medshield.commands.studies.finetune import cell_config, load_study_config
config = load_study_config({str(CONFIGS / "study_finetune_headline.yaml")!r})
for spec in config.expanded_methods():
    cell_config(config, "base", spec, "chest_xray", 0)
print(sorted(m for m in {HEAVY_IMPORTS!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_study_cells_run_in_worker_processes_like_one_at_a_time(
    tmp_path: Path, data_dir: Path
) -> None:
    raw = {
        "methods": [{"method": "linear-probe"}, {"method": "ran"}],
        "modalities": ["chest_xray"],
        "vqa_closed": False,
        "seeds": [0, 1],
    }
    config = write_study_config(tmp_path, data_dir, **raw)
    robust = ["robust.retrieval=false"]
    serial_cfg = load_study_config(config, [*robust, "name=serial"])
    parallel_cfg = load_study_config(config, [*robust, "name=parallel", "workers=2"])
    serial = run_study_finetune(serial_cfg, Run(tmp_path / "serial", serial_cfg), lambda _: None)
    logs: list[str] = []
    parallel_run = Run(tmp_path / "parallel", parallel_cfg)
    parallel = run_study_finetune(parallel_cfg, parallel_run, log=logs.append)
    assert logs[0] == "4 of 4 cells to run, 2 at a time"
    assert sorted(r["cell"] for r in parallel_run.load_samples()) == sorted(
        r["cell"] for r in Run(tmp_path / "serial", serial_cfg).load_samples()
    )
    for a, b in zip(serial["table"], parallel["table"], strict=True):
        assert (a["method"], a["clean_accuracy"]) == (b["method"], b["clean_accuracy"])
        assert a["trainable_params"] == b["trainable_params"]
    saved = (tmp_path / "parallel" / "config.yaml").read_text()
    assert "workers" not in saved and "device" not in saved
    one_at_a_time = load_study_config(config, [*robust, "name=parallel"])
    logs.clear()
    run_study_finetune(one_at_a_time, Run(tmp_path / "parallel", one_at_a_time), logs.append)
    assert logs == []  # resumed with workers=1: every cell was already done


def test_one_pool_runs_a_later_seed_once_the_cell_whose_pick_it_reuses_is_done(
    tmp_path: Path,
) -> None:
    """With 2 workers, a later seed's cell that reuses a pick (``waits_for``) is built and
    started only after its first-seed cell finishes, while a cell that waits for nothing runs
    meanwhile (no worker idles until the whole first seed is done); a freed worker takes the
    earliest ready cell of the order, so the waiting cell goes before a later free one."""
    slow, quick, dependent, free, last = (
        ("base", "grid", "t", 0),
        ("base", "fixed", "t", 0),
        ("base", "grid", "t", 1),
        ("base", "fixed", "t", 1),
        ("base", "other", "t", 1),
    )
    sleep = {slow: 30, quick: 0, dependent: 1, free: 50, last: 2}  # timed_cell: seed / 10 s
    times = {key: tmp_path / f"{cell_name(*key)}.json" for key in sleep}
    built_after_slow: dict[CellKey, bool] = {}

    def build(key: CellKey) -> FineTuneRunConfig:
        built_after_slow[key] = times[slow].exists()
        return FineTuneRunConfig(name=cell_name(*key), output_dir="", seed=sleep[key])

    def waits_for(key: CellKey) -> CellKey | None:
        return slow if key == dependent else None

    order = [slow, quick, dependent, free, last]
    finished = list(run_cells(order, waits_for, build, tmp_path, 2, print, run=timed_cell))
    assert sorted(cfg.name for cfg in finished) == sorted(cell_name(*k) for k in order)
    when = {key: json.loads(path.read_text()) for key, path in times.items()}
    assert built_after_slow[dependent] and not built_after_slow[free]
    assert when[dependent]["start"] >= when[slow]["end"]
    assert when[free]["start"] < when[slow]["end"]  # on the other worker meanwhile
    assert when[dependent]["start"] < when[last]["start"]
    for w in when.values():  # 2 workers: at most 2 cells at once
        assert sum(v["start"] <= w["start"] < v["end"] for v in when.values()) <= 2


@pytest.mark.parametrize("failing", [0, 1])  # the first cell, or the one started beside it
def test_a_failing_cell_stops_the_study_with_its_error(tmp_path: Path, failing: int) -> None:
    keys: list[CellKey] = [("base", m, "t", 0) for m in ("a", "b", "c")]
    seeds = {key: 50 for key in keys} | {keys[failing]: -1}  # timed_cell: 5 s; < 0 raises

    def build(key: CellKey) -> FineTuneRunConfig:
        return FineTuneRunConfig(name=cell_name(*key), output_dir="", seed=seeds[key])

    cells = run_cells(keys, lambda _: None, build, tmp_path, 2, print, run=timed_cell)
    with pytest.raises(ValueError, match=f"cell .*{cell_name(*keys[failing])} failed"):
        list(cells)
    assert not (tmp_path / f"{cell_name(*keys[2])}.json").exists()  # never started
