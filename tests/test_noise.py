"""Noisy upstream datasets: row choice, storage, budget check, checksums, resume, pretraining."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medshield.config import PretrainConfig
from medshield.data import ImageCaptionDataset
from medshield.errors import ConfigError, DataError, InputError
from medshield.models.base import DualEncoder
from medshield.noise import (
    NoisyCaptionDataset,
    choose_perturbed,
    craft_noisy_dataset,
    state_dict_sha256,
)
from medshield.noise.craft import to_uint8
from medshield.train.pretrain import pretrain


class TinyDualEncoder(DualEncoder):
    """A linear image tower on 28x28 pixels and a hashed bag-of-words text tower."""

    backend = "tiny-noise-test"
    embed_dim = 8
    image_size = 28
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.init_kwargs: dict[str, Any] = {}
        self.image_proj = nn.Linear(3 * 28 * 28, self.embed_dim)
        self.text_proj = nn.Linear(32, self.embed_dim)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(pixels.flatten(1))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        bags = torch.zeros(len(texts), 32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                bags[row, sum(map(ord, word)) % 32] += 1
        return self.text_proj(bags)

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.logit_scale, *self.image_proj.parameters(), *self.text_proj.parameters()]


@dataclass
class Result:
    images: torch.Tensor
    captions: list[str]
    text_edits: list[int]


class SignNoiseAttack:
    """Adds a random +-``step``/255 sign pattern and appends a word (budget ``eps``/255).

    ``fail_on_call`` raises on that call (1-based) to simulate an interruption.
    """

    name = "sign-noise"

    def __init__(self, eps: float = 3.0, step: float | None = None, fail_on_call: int = 0):
        self.eps, self.step, self.fail_on_call, self.calls = eps, step, fail_on_call, 0

    def __call__(self, model: DualEncoder, images: torch.Tensor, captions: list[str]) -> Result:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated interruption")
        step = (self.eps if self.step is None else self.step) / 255
        adv = (images + step * torch.randn_like(images).sign()).clamp(0, 1)
        return Result(adv, [c + " noise" for c in captions], [1] * len(captions))

    def config(self) -> dict[str, Any]:
        return {"eps": self.eps, "norm": "Linf"}


@pytest.fixture(scope="module")
def clean(data_dir: Path) -> ImageCaptionDataset:
    return ImageCaptionDataset(["breast_ultrasound"], split="val", per_class_cap=10)


@pytest.fixture(scope="module")
def surrogate() -> TinyDualEncoder:
    torch.manual_seed(0)
    return TinyDualEncoder().eval()


def craft(clean: ImageCaptionDataset, surrogate: DualEncoder, out: Path, **kw: Any) -> Path:
    attack = kw.pop("attack", None) or SignNoiseAttack()
    kw.setdefault("ratio", 0.5)
    kw.setdefault("batch_size", 2)
    return craft_noisy_dataset(clean, surrogate, attack, out_dir=out, progress=False, **kw)


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (0.25, 5), (1.0, 20)])
def test_exact_number_of_perturbed_rows(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path, ratio: float, expected: int
) -> None:
    assert len(clean) == 20
    ds = NoisyCaptionDataset(craft(clean, surrogate, tmp_path / "noisy", ratio=ratio))
    assert len(ds) == 20
    assert int(ds.perturbed.sum()) == expected
    assert ds.manifest["num_perturbed"] == expected
    assert ds.manifest["perturbed_indices"] == [int(i) for i in np.flatnonzero(ds.perturbed)]
    assert len(ds.manifest["shards"]) == math.ceil(expected / 2)
    assert sum(ds[i]["caption"].endswith(" noise") for i in range(20)) == expected


def test_choose_perturbed_is_stratified_seeded_and_exact() -> None:
    modality_of = ["a"] * 10 + ["b"] * 30
    chosen = choose_perturbed(modality_of, 0.25, seed=1)
    assert len(chosen) == 10 and chosen == sorted(set(chosen))
    counts = Counter(modality_of[i] for i in chosen)
    assert counts["a"] in (2, 3) and counts["b"] in (7, 8)
    assert choose_perturbed(modality_of, 0.25, seed=1) == chosen
    assert choose_perturbed(modality_of, 0.25, seed=2) != chosen


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio_is_refused(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path, ratio: float
) -> None:
    with pytest.raises(InputError, match="ratio"):
        craft(clean, surrogate, tmp_path / "noisy", ratio=ratio)
    assert not (tmp_path / "noisy").exists()


def test_stored_images_captions_and_manifest(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    clean.set_epoch(3)  # crafting must store epoch-0 captions and leave the epoch alone
    try:
        out = craft(clean, surrogate, tmp_path / "noisy", seed=7)
        assert clean.epoch == 3
        clean.set_epoch(0)
        epoch0 = [clean.caption(i) for i in range(len(clean))]
    finally:
        clean.set_epoch(0)
    ds = NoisyCaptionDataset(out)
    clean_u8 = to_uint8(clean.images)
    assert int(ds.perturbed.sum()) == 10
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 28, 28)
        assert torch.equal(to_uint8(item["image"]), ds.images[i])
        assert item["label"] == int(clean.labels[i]) and item["modality"] == "breast_ultrasound"
        assert item["perturbed"] == bool(ds.perturbed[i])
        diff = (ds.images[i].int() - clean_u8[i].int()).abs().max().item()
        if item["perturbed"]:
            assert item["caption"] == epoch0[i] + " noise"
            assert 0 < diff <= 3  # eps 3/255 + 0.5/255 rounding, in whole uint8 levels
        else:
            assert item["caption"] == epoch0[i]
            assert torch.equal(ds.images[i], clean_u8[i])  # byte-equal to the clean uint8

    m = ds.manifest
    assert m["ratio"] == 0.5 and m["seed"] == 7 and m["eps"] == 3.0
    assert m["attack"] == {"name": "sign-noise", "config": {"eps": 3.0, "norm": "Linf"}}
    assert m["surrogate_sha256"] == state_dict_sha256(surrogate)
    assert m["clean"]["modalities"] == ["breast_ultrasound"] and m["clean"]["len"] == 20
    assert m["clean"]["split"] == "val"
    assert 0 < m["max_linf_255"] <= m["budget_linf_255"] == 3.5
    assert set(m["files"]) == {"progress.json", "clean.safetensors", "rows.jsonl", *m["shards"]}
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["perturbed"] for r in rows] == ds.perturbed.tolist()
    assert all(r["text_edits"] == int(r["perturbed"]) for r in rows)
    assert max(r["linf_255"] for r in rows) == m["max_linf_255"]

    given = craft(clean, surrogate, tmp_path / "given", surrogate_checksum="ab" * 32)
    assert NoisyCaptionDataset(given).manifest["surrogate_sha256"] == "ab" * 32


def test_corrupt_shard_and_missing_manifest_are_refused(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    out = craft(clean, surrogate, tmp_path / "noisy")
    shard = out / "perturbed-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="perturbed-00001.safetensors fails its checksum"):
        NoisyCaptionDataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="incomplete or not a noisy dataset"):
        NoisyCaptionDataset(out)


def test_interrupted_then_resumed_equals_uninterrupted(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    whole = craft(clean, surrogate, tmp_path / "whole")
    torch.manual_seed(123)  # the global random state must not matter: batches are seeded

    broken = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        craft(clean, surrogate, broken, attack=SignNoiseAttack(fail_on_call=2))
    assert (broken / "perturbed-00000.safetensors").exists()
    assert not (broken / "manifest.json").exists()
    with pytest.raises(DataError, match="incomplete"):
        NoisyCaptionDataset(broken)

    attack = SignNoiseAttack()
    craft(clean, surrogate, broken, attack=attack)
    assert attack.calls == 4  # 5 batches of 2, the first was already done

    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in broken.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (whole / name).read_bytes() == (broken / name).read_bytes(), name
    m_whole = json.loads((whole / "manifest.json").read_text())
    m_broken = json.loads((broken / "manifest.json").read_text())
    m_whole.pop("created"), m_broken.pop("created")
    assert m_whole == m_broken

    again = SignNoiseAttack()
    craft(clean, surrogate, broken, attack=again)  # complete: nothing to do
    assert again.calls == 0


def test_rerun_with_different_arguments_is_refused(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    out = craft(clean, surrogate, tmp_path / "noisy")
    with pytest.raises(ConfigError, match="different arguments.*ratio"):
        craft(clean, surrogate, out, ratio=0.25)
    with pytest.raises(ConfigError, match="different arguments.*attack"):
        craft(clean, surrogate, out, attack=SignNoiseAttack(eps=2.0))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a noisy dataset in progress"):
        craft(clean, surrogate, foreign)


def test_attack_over_budget_is_refused(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="broke its budget"):
        craft(clean, surrogate, tmp_path / "noisy", attack=SignNoiseAttack(eps=2.0, step=3.0))
    assert not (tmp_path / "noisy" / "manifest.json").exists()


def test_pretrain_runs_on_a_noisy_dataset(
    clean: ImageCaptionDataset, surrogate: DualEncoder, tmp_path: Path
) -> None:
    ds = NoisyCaptionDataset(craft(clean, surrogate, tmp_path / "noisy"))
    torch.manual_seed(1)
    model = TinyDualEncoder()
    before = model.image_proj.weight.detach().clone()
    config = PretrainConfig(epochs=1, batch_size=8, image_layers=0)
    history = pretrain(model, ds, config, tmp_path / "ckpt", progress=False)
    assert len(history["epochs"]) == 1 and history["epochs"][0]["steps"] == 2
    assert math.isfinite(history["epochs"][0]["mean_loss"])
    assert not torch.equal(model.image_proj.weight, before)
