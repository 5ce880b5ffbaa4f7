"""A fine-tuned model loads back through `medshield evaluate`: the fine-tuned dual encoder on the
usual tasks, and the classifier on its own task with the same clean accuracy as its run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_support import run_config, run_method
from typer.testing import CliRunner

from medshield.commands.cli import app
from medshield.commands.finetune import finetuned_rows, run_finetune
from medshield.config import AttackEntry
from medshield.runs import Run
from medshield.train.finetune.data import VQA_TASK


@pytest.fixture(scope="module")
def ran_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """A tiny `medshield finetune` run of the MLP RAN (its rectifier stays in the encoder)."""
    tmp_path = tmp_path_factory.mktemp("ft")
    cfg = run_config(tmp_path, data_dir)
    cfg.finetune.method = "ran"
    cfg.finetune.kwargs = {"placement": "head", "rectifier": "mlp", "hidden": 8}
    cfg.robust.retrieval = False
    return run_finetune(cfg, Run(tmp_path / "ft", cfg), log=lambda _: None, progress=False)


def test_evaluate_loads_a_finetuned_directory(tmp_path: Path, data_dir: Path, ran_run) -> None:
    sets = [
        f"output_dir={tmp_path}",
        "name=eval_ft",
        f"data.data_dir={data_dir}",
        "data.modalities=[chest_xray]",
        "evaluate.tasks=[zero_shot, robust_zero_shot]",
        "evaluate.max_test_items=8",
        "evaluate.robust_eps=[2]",
        "evaluate.robust_attacks=[{name: pgd, steps: 2}]",
        "evaluate.robust_max_items=4",  # the run's robust.max_test_items: the same images
        "evaluate.bootstrap_resamples=20",
    ]
    args = ["evaluate", "--checkpoint", ran_run["finetuned_dir"]]
    result = CliRunner().invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    assert "sanity flags finetuned/chest_xray" in result.output
    ev = json.loads((tmp_path / "eval_ft" / "results.json").read_text())["evaluate"]
    assert ev["finetuned"]["method"] == "ran" and ev["finetuned"]["task"] == "chest_xray"
    assert ev["finetuned"]["report"]["trainable_params"] == ran_run["report"]["trainable_params"]
    own = ev["metrics"]["finetuned"]["chest_xray"]
    assert own["clean_accuracy"]["value"] == ran_run["metrics"]["clean_accuracy"]["value"]
    assert own["clean_accuracy"]["n"] == 4
    assert own["majority_accuracy"]["value"] == ran_run["metrics"]["majority_accuracy"]["value"]
    # the shuffled control: the same derangement of the same test images as the run's
    run_shuffled = ran_run["metrics"]["shuffled_image_accuracy"]["value"]
    assert own["shuffled_image_accuracy"]["value"] == run_shuffled
    assert own["robust_accuracy@2"]["value"] <= own["clean_accuracy"]["value"]
    assert {"zero_shot", "robust_zero_shot"} <= set(ev["metrics"])
    assert {(f["name"], f.get("group")) for f in ev["sanity"]["finetuned/chest_xray"]} >= {
        ("budget", "pgd@2"),
        ("range", "pgd@2"),
        ("zero-gradients", "inputs"),
        ("uses image", None),
    }
    html = (tmp_path / "eval_ft" / "report.html").read_text()
    assert "A fine-tuned model: ran on chest_xray" in html


def test_evaluate_refuses_a_finetuned_directory_of_another_base(tmp_path: Path, ran_run) -> None:
    record = Path(ran_run["finetuned_dir"]) / "finetune.json"
    meta = json.loads(record.read_text())
    meta["base"]["kwargs"]["embed_dim"] = 16  # a different architecture than the one trained
    broken = tmp_path / "finetuned"
    broken.mkdir()
    (broken / "finetune.json").write_text(json.dumps(meta))
    (broken / "method.safetensors").write_bytes(
        (Path(ran_run["finetuned_dir"]) / "method.safetensors").read_bytes()
    )
    result = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(broken), "--set", f"output_dir={tmp_path}"]
    )
    assert result.exit_code == 2
    assert "not the one 'ran' was fine-tuned from" in " ".join(result.output.split())


def test_finetuned_rows_on_the_vqa_task(vqa_train, data_dir: Path, base) -> None:
    _, result = run_method(base, vqa_train, "linear-probe")
    pgd = [AttackEntry(name="pgd", steps=1)]
    rows = finetuned_rows(result.classifier, VQA_TASK, [2], pgd, 4, data_dir=data_dir, batch_size=2)
    assert len(rows) == 4 and all(r["task"] == "finetuned" for r in rows)
    assert all(r["modality"] == VQA_TASK and r["linf"] <= 2.0 + 1e-4 for r in rows)
    assert all((r["attack"], r["eps"], r["restart"]) == ("pgd", 2.0, 0) for r in rows)
    assert all(r["robust_correct"] <= r["clean_correct"] for r in rows)
    assert all(isinstance(r["shuffled_correct"], bool) for r in rows)  # the question stays
