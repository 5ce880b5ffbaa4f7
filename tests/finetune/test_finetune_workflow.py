"""The `medshield finetune` workflow and `medshield study finetune`: rows, CIs, sanity flags,
resume, a wrong checkpoint refused before training, the study table and plots."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from finetune_support import run_config

from medshield.commands.finetune import (
    derangement,
    load_finetune_config,
    run_finetune,
    share_bootstrap_ci,
)
from medshield.config import AttackEntry
from medshield.errors import ConfigError, DataError
from medshield.eval.metrics import image_use_flag, majority_hits
from medshield.runs import Run


def test_finetune_run_writes_rows_metrics_flags_and_resumes(tmp_path: Path, data_dir: Path) -> None:
    cfg = run_config(tmp_path, data_dir)
    run = Run(tmp_path / "ft", cfg)
    logs: list[str] = []
    result = run_finetune(cfg, run, log=logs.append)
    rows = run.load_samples()
    groups = {r["group"] for r in rows}
    assert groups == {
        "clean",
        "shuffled",
        "pgd1@2",
        "pgd2@2",
        "apgd-ce@2",
        "apgd-dlr@2",
        "retrieval",
        "retrieval_adv",
    }
    assert sum(r["group"] == "clean" for r in rows) == 4
    m = result["metrics"]
    assert (
        m["clean_accuracy"]["ci_low"]
        <= m["clean_accuracy"]["value"]
        <= m["clean_accuracy"]["ci_high"]
    )
    attacked = ("pgd1@2", "pgd2@2", "apgd-ce@2", "apgd-dlr@2")
    for name in (*attacked, "worst@2"):
        assert m[f"robust_accuracy/{name}"]["value"] <= m["clean_accuracy"]["value"]
    # the worst case is the per-image minimum over every attack, APGD-DLR included
    assert all(
        (r["attack"], r["eps"], r["restart"]) == (r["group"].split("@")[0], 2.0, 0)
        for r in rows
        if r["group"] in attacked
    )
    robust = {
        g: {r["index"]: r["robust_correct"] for r in rows if r["group"] == g} for g in attacked
    }
    worst = [all(robust[g][i] for g in attacked) for i in sorted(robust["apgd-dlr@2"])]
    assert m["robust_accuracy/worst@2"]["value"] == pytest.approx(sum(worst) / len(worst))
    clean_rows = [r for r in rows if r["group"] == "clean"]
    shuffled_rows = [r for r in rows if r["group"] == "shuffled"]
    assert [(r["index"], r["label"]) for r in shuffled_rows] == [
        (r["index"], r["label"]) for r in clean_rows
    ]
    assert m["shuffled_image_accuracy"]["n"] == 4
    assert m["majority_accuracy"]["value"] == pytest.approx(
        max(Counter(r["label"] for r in clean_rows).values()) / 4
    )
    names = {f["name"] for f in result["sanity"]}
    assert {
        "budget",
        "range",
        "robust<=clean",
        "stronger<=weaker",
        "zero-gradients",
        "uses image",
    } <= names
    assert all(f["passed"] for f in result["sanity"] if f["name"] in ("budget", "range"))
    assert result["report"]["overhead"]["flops_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "ft" / "finetuned" / "method.safetensors").is_file()

    # resume: a half-written group is recomputed, finished groups and the model are kept
    kept = [r for r in rows if r["group"] != "apgd-ce@2"]
    run.rewrite_samples([*kept, next(r for r in rows if r["group"] == "apgd-ce@2")])
    logs.clear()
    again = run_finetune(cfg, Run(tmp_path / "ft", cfg), log=logs.append)
    assert any("loading the fine-tuned" in line for line in logs)
    assert [line.strip() for line in logs if line.strip().endswith("...")] == ["apgd-ce@2 ..."]
    assert len(Run(tmp_path / "ft", cfg).load_samples()) == len(rows)
    assert again["metrics"]["clean_accuracy"] == result["metrics"]["clean_accuracy"]


def test_wrong_checkpoint_and_bad_config_fail_before_training(
    tmp_path: Path, data_dir: Path
) -> None:
    cfg = run_config(tmp_path, data_dir, model={"checkpoint": str(tmp_path / "missing")})
    with pytest.raises(DataError, match="does not exist"):
        run_finetune(cfg, Run(tmp_path / "ft", cfg))
    assert not (tmp_path / "ft" / "finetuned").exists()
    with pytest.raises(ConfigError, match="unknown fine-tuning method"):
        load_finetune_config(None, ["finetune.method=lorax"])
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        load_finetune_config(None, ["finetune.method=ran", "finetune.kwargs={beta: -1}"])


def test_cli_refuses_an_unknown_method_with_a_clear_message(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medshield.commands.cli import app

    result = CliRunner().invoke(
        app, ["finetune", "--method", "lorax", "--set", f"output_dir={tmp_path}"]
    )
    assert result.exit_code == 2
    assert "unknown fine-tuning method 'lorax'" in result.output
    assert not any(tmp_path.iterdir())


def test_cli_finetune_writes_results_and_its_report(tmp_path: Path, data_dir: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from medshield.commands.cli import app

    cfg = run_config(tmp_path, data_dir)
    cfg.finetune.max_train_items, cfg.finetune.val_fraction = 12, 0.5
    cfg.robust.retrieval = False
    cfg.robust.attacks = [AttackEntry(name="pgd", steps=1)]
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["finetune", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "clean_accuracy:" in result.output and "trainable parameters" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("report: ")  # the report's path
    html = (tmp_path / "ft" / "report.html").read_text()
    assert "fine-tuning run" in html and "held out for validation" in html


def test_the_shuffled_control_moves_every_image_and_is_seeded() -> None:
    for n in (2, 3, 10, 101):
        perm = derangement(n, seed=7)
        assert sorted(perm.tolist()) == list(range(n))
        assert all(perm[i] != i for i in range(n))
    assert derangement(50, seed=1).tolist() == derangement(50, seed=1).tolist()
    assert derangement(50, seed=1).tolist() != derangement(50, seed=2).tolist()
    with pytest.raises(DataError, match="at least 2"):
        derangement(1, seed=0)


def test_a_classifier_that_ignores_the_image_fails_uses_image() -> None:
    clean = [{"label": y, "correct": c} for y, c in [(0, True), (0, True), (1, False), (1, True)]]
    own = [r["correct"] for r in clean]
    blind = image_use_flag(own, list(own))  # the same answers without the image
    assert not blind["passed"] and "0.7500" in blind["detail"]
    assert image_use_flag(own, [False] * 4)["passed"]
    assert majority_hits(clean) == [True, True, False, False]
    assert majority_hits([]) == []


def test_share_bootstrap_ci_is_the_share_of_true_values_with_a_seeded_bootstrap() -> None:
    values = [True] * 6 + [False] * 2
    share = share_bootstrap_ci(values, resamples=200, seed=3)
    assert share["value"] == 0.75 and share["n"] == 8
    assert 0 <= share["ci_low"] < 0.75 < share["ci_high"] <= 1
    assert share_bootstrap_ci(values, resamples=200, seed=3) == share
    assert share_bootstrap_ci([True] * 5, resamples=50) == {
        "value": 1.0,
        "ci_low": 1.0,
        "ci_high": 1.0,
        "n": 5,
    }
