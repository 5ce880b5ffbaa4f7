"""`medshield craft-noise`, then `medshield pretrain` on the noisy dataset it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medshield.commands.cli import app

runner = CliRunner()


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_craft_noise_then_pretrain_on_it(tmp_path: Path, data_dir: Path) -> None:
    craft_args = [
        "craft-noise",
        *_sets(
            [
                f"output_dir={tmp_path}",
                "name=noise",
                "data.modalities=[breast_ultrasound]",
                "data.train_per_class_cap=4",
                "noise.split=val",
                "noise.ratio=0.25",
                "noise.eps=2",
                "noise.batch_size=2",
                "noise.attack_kwargs={steps: 2, max_edits: 1}",
            ]
        ),
    ]
    craft = runner.invoke(app, craft_args)
    assert craft.exit_code == 0, craft.output
    noisy = tmp_path / "noise" / "noisy"
    manifest = json.loads((noisy / "manifest.json").read_text())
    assert manifest["attack"]["name"] == "co-attack"
    assert len(manifest["perturbed_indices"]) == 2  # 0.25 of 8 pairs
    results = json.loads((tmp_path / "noise" / "results.json").read_text())
    assert results["craft_noise"]["perturbed"] == 2
    assert results["craft_noise"]["max_linf_255"] <= 2.5  # eps + uint8 rounding
    rows = (tmp_path / "noise" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 8
    assert (tmp_path / "noise" / "report.html").stat().st_size > 1000

    again = runner.invoke(app, craft_args)
    assert again.exit_code == 0, again.output  # finished: a rerun only re-reads it
    assert len((tmp_path / "noise" / "samples.jsonl").read_text().splitlines()) == 8

    pre = runner.invoke(
        app,
        [
            "pretrain",
            *_sets(
                [
                    f"output_dir={tmp_path}",
                    "name=pre",
                    f"data.noisy_dataset={noisy}",
                    "pretrain.epochs=1",
                    "pretrain.batch_size=4",
                    "pretrain.image_layers=0",
                ]
            ),
        ],
    )
    assert pre.exit_code == 0, pre.output
    history = json.loads((tmp_path / "pre" / "results.json").read_text())["pretrain"]
    assert history["train_pairs"] == 8 and history["modalities"] == ["breast_ultrasound"]
    assert (tmp_path / "pre" / "model" / "model.safetensors").exists()
    assert "Pretraining" in (tmp_path / "pre" / "report.html").read_text()


def test_interrupted_craft_noise_resumes_from_its_shards(tmp_path: Path, data_dir: Path) -> None:
    """A run stopped after some batches (shards on disk, no manifest) finishes where it stopped:
    the finished shards are not recomputed and the dataset equals an uninterrupted one."""

    def craft(name: str) -> Path:
        args = [
            f"output_dir={tmp_path}",
            f"name={name}",
            "data.modalities=[breast_ultrasound]",
            "data.train_per_class_cap=4",
            "noise.split=val",
            "noise.ratio=0.25",
            "noise.eps=2",
            "noise.batch_size=1",
            "noise.attack_kwargs={steps: 2, max_edits: 1}",
        ]
        result = runner.invoke(app, ["craft-noise", *_sets(args)])
        assert result.exit_code == 0, result.output
        return tmp_path / name / "noisy"

    full = craft("full")
    shards = sorted(full.glob("perturbed-*.safetensors"))
    assert len(shards) == 2  # 0.25 of 8 pairs, one per batch

    # simulate an interruption after one batch: the later shard and the final files never written
    partial = tmp_path / "partial" / "noisy"
    craft("partial")
    for path in partial.iterdir():
        if path.name not in {"progress.json", shards[0].name}:
            path.unlink()
    kept = (partial / shards[0].name).stat().st_mtime_ns
    (tmp_path / "partial" / "results.json").unlink()

    resumed = craft("partial")
    assert (resumed / shards[0].name).stat().st_mtime_ns == kept  # the finished shard not redone
    for shard in shards:
        assert (resumed / shard.name).read_bytes() == shard.read_bytes()
    ours = json.loads((resumed / "manifest.json").read_text())
    theirs = json.loads((full / "manifest.json").read_text())
    assert ours["perturbed_indices"] == theirs["perturbed_indices"]
    assert ours["files"] == theirs["files"]  # byte-identical shards, rows and clean images


def test_unknown_attack_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "craft-noise",
            *_sets(
                [
                    f"output_dir={tmp_path}",
                    "data.modalities=[breast_ultrasound]",
                    "noise.split=val",
                    "noise.attack=teleport",
                ]
            ),
        ],
    )
    assert result.exit_code == 2
    assert "unknown multimodal attack 'teleport'" in result.output and "co-attack" in result.output
