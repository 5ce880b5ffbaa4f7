"""Noise mixes from one adversarial pool, and `medshield study noise` end to end on a tiny grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medshield.attacks import CoAttack
from medshield.commands.cli import app
from medshield.commands.studies.noise import load_noise_study_config, mean_t_ci
from medshield.data import ImageCaptionDataset
from medshield.errors import DataError, InputError
from medshield.models.mini_clip import MiniClip
from medshield.noise import NoisyCaptionDataset, NoisyMix, choose_perturbed, craft_noisy_dataset

runner = CliRunner()
TINY_STUDY = [  # the smallest study: one upstream modality, fundus held out, one tiny epoch
    "holdout_modality=fundus",
    "base.data.modalities=[breast_ultrasound, fundus]",
    "base.data.train_per_class_cap=4",
    "base.model.kwargs={embed_dim: 16, image_size: 32, pretrained: false}",
    "base.pretrain.epochs=1",
    "base.pretrain.batch_size=8",
    "base.pretrain.image_layers=0",
]


def _clean(data_dir: Path, seed: int = 0) -> ImageCaptionDataset:
    return ImageCaptionDataset(
        ["breast_ultrasound"], split="val", seed=seed, per_class_cap=4, data_dir=data_dir
    )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> NoisyCaptionDataset:
    torch.manual_seed(0)
    surrogate = MiniClip(embed_dim=16, image_size=32, pretrained=False)
    out = craft_noisy_dataset(
        _clean(data_dir),
        surrogate,
        CoAttack(eps=8, alpha=4, steps=1, max_edits=1),
        1.0,
        tmp_path_factory.mktemp("pool") / "noisy",
        batch_size=8,
        progress=False,
    )
    return NoisyCaptionDataset(out)


def test_choose_perturbed_is_nested_across_ratios() -> None:
    modality_of = ["a"] * 30 + ["b"] * 10
    chosen = [set(choose_perturbed(modality_of, r, seed=3)) for r in (0.1, 0.25, 0.5, 1.0)]
    assert all(small <= large for small, large in zip(chosen, chosen[1:], strict=False))
    assert [len(c) for c in chosen] == [4, 10, 20, 40]


def test_mix_takes_adversarial_pairs_from_the_pool(
    pool: NoisyCaptionDataset, data_dir: Path
) -> None:
    clean = _clean(data_dir)
    mix = NoisyMix(clean, pool, 0.5, seed=1)
    assert len(mix) == len(clean) == 8 and mix.perturbed.sum() == 4
    for i in range(len(mix)):
        item = mix[i]
        assert item["perturbed"] == bool(mix.perturbed[i])
        source = pool[i] if item["perturbed"] else clean[i]
        assert torch.equal(item["image"], source["image"])
        if item["perturbed"]:
            assert item["caption"] == pool.captions[i]
    assert not torch.equal(pool[0]["image"], clean[0]["image"])  # the pool really is perturbed
    zero = NoisyMix(clean, pool, 0.0, seed=1)
    assert not zero.perturbed.any()
    assert [zero[i]["caption"] for i in range(8)] == [
        NoisyMix(clean, pool, 0.0, seed=2)[i]["caption"] for i in range(8)
    ]  # fixed captions: the clean rows never resample


def test_mix_without_a_pool_is_the_clean_mix_at_ratio_0(
    pool: NoisyCaptionDataset, data_dir: Path
) -> None:
    clean = _clean(data_dir)
    with_pool, without = NoisyMix(clean, pool, 0.0, seed=1), NoisyMix(clean, None, 0.0, seed=1)
    for i in range(len(clean)):
        a, b = with_pool[i], without[i]
        assert a.keys() == b.keys() and a["caption"] == b["caption"] and not b["perturbed"]
        assert torch.equal(a["image"], b["image"])
    with pytest.raises(InputError, match="needs a pool"):
        NoisyMix(clean, None, 0.1, seed=1)


def test_mix_refuses_a_pool_of_another_dataset(pool: NoisyCaptionDataset, data_dir: Path) -> None:
    with pytest.raises(DataError, match="another clean dataset"):
        NoisyMix(_clean(data_dir, seed=5), pool, 0.5, seed=0)


def test_mean_t_ci_over_seeds() -> None:
    one = mean_t_ci([0.5])
    assert one["value"] == 0.5 and one["ci_low"] is None
    three = mean_t_ci([0.4, 0.5, 0.6])
    assert three["value"] == pytest.approx(0.5)
    assert three["ci_low"] == pytest.approx(0.5 - 4.302653 * 0.1 / 3**0.5, rel=1e-5)
    near_zero = mean_t_ci([0.0, 0.02, 0.07])  # the raw t-interval reaches below 0
    assert near_zero["ci_low"] == 0.0 and near_zero["ci_high"] < 0.2
    near_one = mean_t_ci([1.0, 0.98, 0.93])
    assert near_one["ci_high"] == 1.0 and near_one["ci_low"] > 0.8


def test_study_config_rejects_bad_grids() -> None:
    from medshield.errors import ConfigError

    for bad in ("ratios=[0, 1.5]", "eps_values=[0]", "seeds=[1, 1]", "ratios=[0.1, 0.1]"):
        with pytest.raises(ConfigError):
            load_noise_study_config(None, [bad])


def test_study_noise_runs_resumes_and_aggregates(tmp_path: Path, data_dir: Path) -> None:
    sets = [
        f"output_dir={tmp_path}",
        "ratios=[0, 1]",
        "eps_values=[8]",
        "seeds=[0]",
        *TINY_STUDY,
        "base.noise.batch_size=8",
        "base.noise.attack_kwargs={steps: 1, max_edits: 1}",
        "base.evaluate.tasks=[zero_shot, robust_zero_shot]",
        "base.evaluate.max_test_items=8",
        "base.evaluate.robust_max_items=4",
        "base.evaluate.robust_eps=[1]",
        "base.evaluate.robust_attacks=[{name: pgd, steps: 1}]",
        "base.evaluate.vqa_attack_steps=1",
        "base.evaluate.bootstrap_resamples=20",
    ]
    args = ["study", "noise", *[a for s in sets for a in ("--set", s)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    study = tmp_path / "study_noise"
    results = json.loads((study / "results.json").read_text())
    assert results["upstream_modalities"] == ["breast_ultrasound"]
    points = {(p["ratio"], p["eps"]): p for p in results["points"]}
    assert set(points) == {(0.0, None), (1.0, 8.0)}
    assert points[(0.0, None)]["robust acc@1"]["n"] == 1
    assert points[(1.0, 8.0)]["transfer zero-shot acc"] is not None  # fundus held out
    cells = sorted(p.name for p in (study / "cells").iterdir())
    assert cells == ["ratio0_eps-_seed0", "ratio1_eps8_seed0"]
    assert not (study / "cells" / cells[0] / "checkpoints").exists()
    pool = json.loads((study / "pools" / "eps8" / "manifest.json").read_text())
    assert pool["ratio"] == 1.0 and pool["eps"] == 8
    assert (study / "table.md").read_text().startswith("| ratio | eps | seeds |")
    assert (study / "plots" / "zero-shot_acc.png").stat().st_size > 1000

    again = runner.invoke(app, args)  # resumes: every cell is kept
    assert again.exit_code == 0, again.output
    assert again.output.count("done earlier, kept") == 2


def test_a_clean_only_sweep_trains_no_surrogate_and_crafts_no_pool(
    tmp_path: Path, data_dir: Path
) -> None:
    sets = [
        f"output_dir={tmp_path}",
        "ratios=[0]",
        "seeds=[0]",
        *TINY_STUDY,
        "base.evaluate.tasks=[zero_shot]",
        "base.evaluate.max_test_items=8",
        "base.evaluate.bootstrap_resamples=20",
    ]
    result = runner.invoke(app, ["study", "noise", *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    study = tmp_path / "study_noise"
    assert not (study / "surrogate").exists() and not (study / "pools").exists()
    results = json.loads((study / "results.json").read_text())
    assert results["surrogate"] is None and results["pools"] == {}
    assert [p["ratio"] for p in results["points"]] == [0.0]
    assert (study / "cells" / "ratio0_eps-_seed0" / "results.json").exists()
    assert "Pretrained on breast_ultrasound" in (study / "report.html").read_text()
