"""`medshield craft-noise`, then `medshield pretrain` on the noisy dataset it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medshield.cli import app

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
    assert "unknown attack 'teleport'" in result.output and "co-attack" in result.output
