"""End-to-end: the CLI over the workflows, run directories, and resuming an evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medshield.commands import workflows
from medshield.commands.cli import app
from medshield.config import load_config
from medshield.eval.metrics import summarize
from medshield.runs import Run

TINY = [
    "data.modalities=[breast_ultrasound, chest_xray]",
    "data.train_per_class_cap=8",
    "pretrain.epochs=1",
    "pretrain.batch_size=8",
    "pretrain.image_layers=0",
    "evaluate.tasks=[zero_shot, linear_probe, retrieval]",
    "evaluate.max_test_items=20",
    "evaluate.linear_probe_max_train=40",
    "evaluate.retrieval_per_class_cap=5",
    "evaluate.bootstrap_resamples=50",
]

runner = CliRunner()


def _sets(extra: list[str]) -> list[str]:
    return [arg for item in [*TINY, *extra] for arg in ("--set", item)]


def test_list_shows_every_kind_of_plugin() -> None:
    result = runner.invoke(app, ["list", "models"])
    assert result.exit_code == 0
    for name in ("mini-clip", "open_clip", "hf-clip"):
        assert name in result.output
    attacks = runner.invoke(app, ["list", "attacks"])
    for name in ("fgsm", "pgd", "apgd-ce", "word-substitution"):
        assert name in attacks.output
    expected = {
        "chat-models": ("mini-llava", "hf", "openai"),
        "methods": ("lora", "ran", "tecoa"),
        "defenses": ("self-reminder", "demonstrations"),
        "judges": ("keyword", "embedding", "llm"),
        "strategies": ("harmful-only", "benign-only", "mixed", "retrieval"),
    }
    for kind, names in expected.items():
        listed = runner.invoke(app, ["list", kind])
        assert listed.exit_code == 0 and all(n in listed.output for n in names), listed.output
    bad = runner.invoke(app, ["list", "gadgets"])
    assert bad.exit_code == 2 and "unknown kind" in bad.output


PLUGIN = """
from medshield.attacks import FGSM
from medshield.registry import IMAGE_ATTACKS

@IMAGE_ATTACKS.register("{name}", "an attack from another package")
class Outside(FGSM):
    pass
"""
# Registers before anything imports medshield's jailbreaks: the built-in still wins the name.
CLASHING_JAILBREAK = """
from medshield.registry import JAILBREAKS

@JAILBREAKS.register("direct", "takes a built-in name")
class Direct:
    pass
"""


def installed_plugin(root: Path, module: str, source: str) -> dict[str, str]:
    """A package installed under ``root`` (its module and a dist-info naming it in the
    ``medshield.plugins`` entry-point group); the environment of a process that sees it."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[medshield.plugins]\n{module} = {module}\n")
    path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep a worktree's src
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def medshield_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = "from medshield.commands.cli import app; app(prog_name='medshield')"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_the_command_finds_plugins_of_other_packages_by_entry_point(tmp_path: Path) -> None:
    env = installed_plugin(tmp_path, "outside_attacks", PLUGIN.format(name="outside-fgsm"))
    listed = medshield_command("list", "attacks", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "outside-fgsm  an attack from another package" in listed.stdout
    assert "outside-fgsm" not in runner.invoke(app, ["list", "attacks"]).output  # not installed

    taken = tmp_path / "taken"
    taken.mkdir()
    env = installed_plugin(taken, "clashing_attacks", PLUGIN.format(name="pgd"))
    clash = medshield_command("list", "attacks", env=env)
    assert clash.returncode == 2
    message = " ".join(clash.stdout.split())
    assert "plugin 'clashing_attacks' (clashing_attacks) failed to import" in message
    assert "image attack 'pgd' is registered twice" in message

    early = tmp_path / "early"
    early.mkdir()
    env = installed_plugin(early, "early_jailbreaks", CLASHING_JAILBREAK)
    clash = medshield_command("list", "jailbreaks", env=env)
    message = " ".join(clash.stdout.split())
    assert clash.returncode == 2 and "plugin 'early_jailbreaks'" in message, clash.stderr
    assert "jailbreak 'direct' is registered twice" in message


def test_pretrain_then_evaluate_write_complete_run_directories(
    tmp_path: Path, data_dir: Path
) -> None:
    # what the old demo did, now `medshield pretrain` + `medshield evaluate`
    config = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=pre"])
    run = Run(workflows.run_dir(config), config)
    model = workflows.build_model(config)
    pre = workflows.run_pretrain(config, run, model, log=lambda _: None)
    ev = workflows.run_evaluate(config, run, model, log=lambda _: None)
    results = run.finish({"pretrain": pre, "evaluate": ev}, kind="pretrain", seed=config.seed)
    assert {p.name for p in run.path.iterdir()} >= {
        "config.yaml",
        "results.json",
        "samples.jsonl",
        "model",
        "checkpoints",
    }
    assert results["pretrain"]["history"]["epochs"][0]["steps"] > 0
    assert results["versions"]["torch"] and results["seed"] == 0

    # evaluating the saved model through the `evaluate` command gives the same results
    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(run.path / "model"),
            *_sets([f"output_dir={tmp_path}", "name=eval"]),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "zero_shot (95% bootstrap CI)" in evaluated.output
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["evaluate"]["metrics"]
    assert set(metrics) == {"zero_shot", "linear_probe", "retrieval_i2t", "retrieval_t2i"}
    acc = metrics["zero_shot"]["chest_xray"]["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"] and acc["n"] == 20

    def zero_shot(path: Path) -> list[dict]:
        rows = [json.loads(x) for x in (path / "samples.jsonl").read_text().splitlines()]
        return [r for r in rows if r.get("task") == "zero_shot"]

    assert [r["pred"] for r in zero_shot(run.path)] == [
        r["pred"] for r in zero_shot(tmp_path / "eval")
    ]


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--set", "pretrain.epochs=zero"])
    assert result.exit_code == 2
    assert "error:" in result.output and "epochs" in result.output
    assert "Traceback" not in result.output


def test_evaluation_resumes_and_recomputes_only_a_half_written_group(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(None, [*TINY, f"output_dir={tmp_path}", "evaluate.tasks=[zero_shot]"])
    run = Run(tmp_path / "run", config)
    model = workflows.build_model(config)
    first = workflows.run_evaluate(config, run, model, log=lambda _: None)
    rows = run.load_samples()
    # a crash in the middle of writing chest_xray's rows: keep only part of that group
    torn = [r for r in rows if r["group"] != "zero_shot/chest_xray"]
    torn += [r for r in rows if r["group"] == "zero_shot/chest_xray"][:5]
    run.rewrite_samples(torn)

    calls: list[str] = []
    original = workflows.zero_shot_rows

    def counting(model, modality, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(modality)
        return original(model, modality, **kwargs)

    monkeypatch.setattr(workflows, "zero_shot_rows", counting)
    second = workflows.run_evaluate(config, Run(tmp_path / "run", config), model, log=print)
    assert calls == ["chest_xray"]  # breast_ultrasound's finished group was kept
    assert second["metrics"] == first["metrics"]
    assert len(run.load_samples()) == len(rows)


def finetuned_row(index: int, label: int, clean: bool, shuffled: bool | None) -> dict:
    """A hand-made `finetuned` row, as `medshield evaluate` writes it for a fine-tuned model."""
    row = {
        "task": "finetuned",
        "modality": "chest_xray",
        "index": index,
        "label": label,
        "attack": "pgd",
        "eps": 2.0,
        "restart": 0,
        "clean_correct": clean,
        "adv_correct": False,
        "robust_correct": False,
        "zero_gradient": False,
        "size": 192,
        "linf": 2.0,
        "adv_min": 0.0,
        "adv_max": 1.0,
    }
    return row if shuffled is None else {**row, "shuffled_correct": shuffled}


def test_evaluate_reports_the_shuffled_control_and_flags_a_classifier_that_ignores_the_image() -> (
    None
):
    hits = [(0, True, True), (0, True, True), (1, False, False), (1, True, False)]
    seeing = [finetuned_row(i, y, c, s) for i, (y, c, s) in enumerate(hits)]
    metrics = summarize(seeing, n_resamples=20)["finetuned"]["chest_xray"]
    assert metrics["clean_accuracy"]["value"] == 0.75
    assert metrics["shuffled_image_accuracy"]["value"] == 0.5
    assert metrics["majority_accuracy"]["value"] == 0.5
    flags = {f["name"]: f for f in workflows.robust_sanity(seeing)["finetuned/chest_xray"]}
    assert flags["uses image"]["passed"] and "zero-gradients" in flags

    blind = [finetuned_row(i, y, c, c) for i, (y, c, _) in enumerate(hits)]
    flags = {f["name"]: f for f in workflows.robust_sanity(blind)["finetuned/chest_xray"]}
    assert not flags["uses image"]["passed"]
    assert "own image 0.7500, with another item's 0.7500" in flags["uses image"]["detail"]

    # rows written before the control existed: no shuffled metric and no flag, not a failure
    older = [finetuned_row(i, y, c, None) for i, (y, c, _) in enumerate(hits)]
    assert "shuffled_image_accuracy" not in summarize(older)["finetuned"]["chest_xray"]
    assert "uses image" not in {
        f["name"] for f in workflows.robust_sanity(older)["finetuned/chest_xray"]
    }
