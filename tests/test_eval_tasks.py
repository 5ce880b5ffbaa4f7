"""Evaluation tasks end to end: synthetic data with a tiny oracle model, then the real files."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import medshield.data
from medshield.data import MedMNISTSplit, VQAItem, get_modality
from medshield.errors import DataError, InputError
from medshield.eval.features import embed_images, embed_texts
from medshield.eval.linear_probe import linear_probe_rows
from medshield.eval.metrics import summarize
from medshield.eval.retrieval import retrieval_rows
from medshield.eval.vqa import CoAttentionFusionHead, answer_vocabulary, vqa_closed_rows
from medshield.eval.zero_shot import zero_shot_rows
from medshield.models.base import DualEncoder, evaluating

CENTRES = torch.linspace(0, 1, 51)
WIDTH = 0.03
BAG = 61  # bag-of-words dimensions (prime: "bright" and "dark" collide modulo 64)


def bump(level: torch.Tensor) -> torch.Tensor:
    return torch.exp(-((level[..., None] - CENTRES) ** 2) / (2 * WIDTH**2))


class OracleDual(DualEncoder):
    """A tiny dual encoder that knows the synthetic data's rule.

    Image: a Gaussian bump at the mean of the red channel, in block 0 for grey images and in
    block 1 for yellow ones (blue channel dark). Text: the bump at the brightness level of the
    class phrase it mentions, in the block of that phrase's modality; any other text is a bag of
    hashed words. So zero-shot, retrieval and linear probing are perfect on the synthetic data.
    """

    backend = "oracle"
    image_size = 28
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)

    def __init__(self, modalities: tuple[str, ...] = ("chest_xray", "fundus")) -> None:
        super().__init__()
        self.init_kwargs = {}
        phrases = []
        for block, name in enumerate(modalities):
            mod = get_modality(name)
            phrases += [
                (phrase, block, level(c, mod.num_classes))
                for c, phrase in enumerate(mod.class_names)
            ]
        self.phrases = sorted(phrases, key=lambda p: -len(p[0]))  # longest match wins
        self.modes_seen: list[bool] = []

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        means = pixels.mean(dim=(2, 3))
        red, blue = means[:, 0], means[:, 2]
        yellow = (blue < 0.5 * red).float()[:, None]
        b = bump(red)
        return torch.cat([b * (1 - yellow), b * yellow, torch.zeros(len(pixels), BAG)], dim=1)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), 2 * len(CENTRES) + BAG)
        for i, text in enumerate(texts):
            hit = next(((b, lv) for p, b, lv in self.phrases if p in text.lower()), None)
            if hit is not None:
                block, lv = hit
                out[i, block * len(CENTRES) : (block + 1) * len(CENTRES)] = bump(torch.tensor(lv))
            else:
                for word in re.findall(r"[a-z]+", text.lower()):
                    out[i, 2 * len(CENTRES) + zlib.crc32(word.encode()) % BAG] += 1
        return out


def level(label: int, num_classes: int) -> float:
    return (label + 0.5) / num_classes


def synthetic_split(name: str, split: str, counts: list[int], seed: int) -> MedMNISTSplit:
    """Class c of ``counts`` has brightness level(c); fundus is yellow (RGB), chest X-ray grey."""
    mod = get_modality(name)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    levels = np.array([level(c, mod.num_classes) for c in labels])
    grey = levels[:, None, None] + rng.uniform(-0.02, 0.02, (len(labels), 28, 28))
    grey = np.clip(grey * 255, 0, 255).astype(np.uint8)[..., None]
    images = np.concatenate([grey, grey, np.zeros_like(grey)], -1) if name == "fundus" else grey
    return MedMNISTSplit(
        images, labels.astype(np.int64), mod, mod.subsets[0], split, Path(f"/synthetic/{name}.npz")
    )


SYNTHETIC = {
    ("chest_xray", "train"): [40, 40],
    ("chest_xray", "val"): [10, 10],
    ("chest_xray", "test"): [30, 10],
    ("fundus", "train"): [12] * 5,
    ("fundus", "test"): [6] * 5,  # no val split: the probe uses C = 1
    ("colon_pathology", "test"): [2] * 9,  # test-only, as in the shared data
}


@pytest.fixture
def synthetic_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_split(modality: str, split: str, data_dir: object = None) -> MedMNISTSplit:
        name = get_modality(modality).name
        if (name, split) not in SYNTHETIC:
            raise DataError(f"no {split!r} split for modality {name!r} (synthetic)")
        return synthetic_split(name, split, SYNTHETIC[name, split], seed=len(split))

    monkeypatch.setattr(medshield.data, "load_split", load_split)


@pytest.fixture
def model() -> OracleDual:
    return OracleDual()


# --- features ---------------------------------------------------------------------------------


def test_embeddings_restore_mode_and_deduplicate(model: OracleDual) -> None:
    model.train()
    images = torch.rand(5, 1, 28, 28)
    emb = embed_images(model, images, batch_size=2)
    assert emb.shape == (5, 2 * len(CENTRES) + BAG) and emb.dtype == torch.float32
    assert model.modes_seen == [False, False, False] and model.training
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    texts = embed_texts(model, ["is it bright", "is it dark", "is it bright"], batch_size=1)
    torch.testing.assert_close(texts[0], texts[2])
    torch.testing.assert_close(texts[1], model.encode_text(["is it dark"])[0])
    with pytest.raises(InputError, match="batch_size"):
        embed_images(model, images, batch_size=0)
    with pytest.raises(InputError, match="float"):
        embed_images(model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_evaluating_restores_every_submodule_mode(model: OracleDual) -> None:
    frozen = torch.nn.Linear(2, 2).eval()  # a frozen part kept in eval mode during training
    model.frozen_part = frozen
    model.train()
    frozen.eval()
    with evaluating(model):
        assert not model.training and not frozen.training
        assert not torch.is_grad_enabled()
    assert model.training and not frozen.training


# --- zero-shot ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_data")
def test_zero_shot_rows_on_separable_data(model: OracleDual) -> None:
    model.train()
    rows = zero_shot_rows(model, "chest_xray")
    assert model.training  # restored
    assert len(rows) == 40
    assert set(rows[0]) == {"task", "modality", "index", "label", "pred", "scores"}
    assert [r["index"] for r in rows] == list(range(40))
    split = medshield.data.load_split("chest_xray", "test")
    assert [r["label"] for r in rows] == split.labels.tolist()
    for r in rows:
        assert r["task"] == "zero_shot" and r["modality"] == "chest_xray"
        assert sum(r["scores"]) == pytest.approx(1, abs=1e-5)
        assert r["pred"] == int(np.argmax(r["scores"]))
    table = summarize(rows)["zero_shot"]["chest_xray"]
    assert table["accuracy"]["value"] == 1.0 and table["macro_auc"]["value"] == 1.0
    model.eval()  # the classifier wrapping it is a fresh module in train mode
    assert zero_shot_rows(model, "chest_xray") == rows
    assert not model.training


@pytest.mark.usefixtures("synthetic_data")
def test_zero_shot_max_items_is_class_balanced_and_seeded(model: OracleDual) -> None:
    rows = zero_shot_rows(model, "pneumoniamnist", max_items=10, seed=3)  # subset name works
    assert len(rows) == 10
    assert sorted(r["label"] for r in rows) == [0] * 5 + [1] * 5
    assert {r["modality"] for r in rows} == {"chest_xray"}
    assert rows == zero_shot_rows(model, "chest_xray", max_items=10, seed=3)
    assert rows != zero_shot_rows(model, "chest_xray", max_items=10, seed=4)
    five_class = zero_shot_rows(model, "fundus", max_items=10)
    assert sorted(r["label"] for r in five_class) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert summarize(five_class)["zero_shot"]["fundus"]["accuracy"]["value"] == 1.0


# --- linear probe --------------------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_data")
def test_linear_probe_learns_separable_classes(model: OracleDual) -> None:
    rows = linear_probe_rows(model, "fundus")  # no val split: C = 1
    assert len(rows) == 30 and {r["task"] for r in rows} == {"linear_probe"}
    assert all(len(r["scores"]) == 5 for r in rows)
    assert summarize(rows)["linear_probe"]["fundus"]["accuracy"]["value"] == 1.0

    chest = linear_probe_rows(model, "chest_xray", max_train=20, max_test=10)  # C from val
    assert len(chest) == 10
    assert summarize(chest)["linear_probe"]["chest_xray"]["accuracy"]["value"] == 1.0


@pytest.mark.usefixtures("synthetic_data")
def test_linear_probe_without_train_split_raises_data_error(model: OracleDual) -> None:
    with pytest.raises(DataError, match="linear probe on 'colon_pathology' needs a 'train' split"):
        linear_probe_rows(model, "colon_pathology")


# --- retrieval ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_data")
def test_retrieval_rows_pooled_over_modalities(model: OracleDual) -> None:
    rows = retrieval_rows(model, ["chest_xray", "fundus"], per_class_cap=4, seed=1)
    i2t = [r for r in rows if r["task"] == "retrieval_i2t"]
    t2i = [r for r in rows if r["task"] == "retrieval_t2i"]
    assert len(i2t) == len(t2i) == 8 + 20
    assert [r["index"] for r in i2t] == [r["index"] for r in t2i]
    fundus = get_modality("fundus")
    for r in t2i:
        if r["modality"] == "fundus":
            assert r["caption"] in fundus.captions(r["label"])
    assert all(r["rank"] == 0 for r in rows)  # the oracle retrieves its own class first
    summary = summarize(rows)
    assert summary["retrieval_t2i"]["all"]["R@1"] == {
        "value": 1.0,
        "ci_low": 1.0,
        "ci_high": 1.0,
        "n": 28,
    }
    # captions depend on the modality and seed only, not on the other modalities pooled
    alone = retrieval_rows(model, ["fundus"], per_class_cap=4, seed=1)
    captions = [r["caption"] for r in alone if r["task"] == "retrieval_t2i"]
    assert captions == [r["caption"] for r in t2i if r["modality"] == "fundus"]


@pytest.mark.usefixtures("synthetic_data")
def test_retrieval_counts_other_modalities_as_wrong(model: OracleDual) -> None:
    class Blind(OracleDual):
        """Ignores image colour, so chest and fundus images of the same level collide."""

        def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
            return super()._encode_pixels(pixels[:, :1].expand(-1, 3, -1, -1))

    rows = retrieval_rows(Blind(), ["chest_xray", "fundus"], per_class_cap=4)
    assert any(r["rank"] > 0 for r in rows if r["task"] == "retrieval_t2i")
    with pytest.raises(InputError, match="given twice"):
        retrieval_rows(model, ["chest_xray", "pneumoniamnist"])
    with pytest.raises(InputError, match="non-empty list"):
        retrieval_rows(model, "chest_xray")


# --- VQA -----------------------------------------------------------------------------------------


def synthetic_vqa(n: int, seed: int) -> tuple[list[VQAItem], dict[str, torch.Tensor]]:
    """Bright or dark images; "is the image bright/dark?" answered yes or no accordingly."""
    rng = np.random.default_rng(seed)
    items, images = [], {}
    for i in range(n):
        bright, ask_bright = bool(rng.integers(2)), bool(rng.integers(2))
        path = f"/synthetic/vqa{seed}_{i}.png"
        images[path] = torch.full((1, 64, 64), 0.75 if bright else 0.25)
        question = f"is the image {'bright' if ask_bright else 'dark'}?"
        answer = "yes" if bright == ask_bright else "no"
        items.append(
            VQAItem(
                seed * 1000 + i,
                Path(path),
                question,
                answer,
                "closed",
                "ATTRIB",
                "HEAD",
                "freeform",
            )
        )
    return items, images


@pytest.fixture
def synthetic_vqa_data(monkeypatch: pytest.MonkeyPatch) -> None:
    train, train_images = synthetic_vqa(240, seed=1)
    test, test_images = synthetic_vqa(60, seed=2)
    train.append(
        VQAItem(
            9999,
            train[0].image_path,
            "is the image dark?",
            "yes",
            "closed",
            "ATTRIB",
            "HEAD",
            "freeform",
        )
    )  # one noisy label; "yes" stays a minority
    test[0] = VQAItem(
        8888, test[0].image_path, "which side?", "left", "closed", "POS", "HEAD", "freeform"
    )  # answer not in the vocabulary: always wrong
    images = {**train_images, **test_images}

    def load_vqa_rad(split: str, data_dir: object = None, answer_type: str | None = None):
        assert answer_type == "closed"
        return {"train": train, "test": test}[split]

    def load_vqa_image(path: Path, size: int = 64) -> torch.Tensor:
        return images[str(path)][:, :size, :size]

    monkeypatch.setattr(medshield.data, "load_vqa_rad", load_vqa_rad)
    monkeypatch.setattr(medshield.data, "load_vqa_image", load_vqa_image)


@pytest.mark.usefixtures("synthetic_vqa_data")
def test_vqa_head_learns_a_rule_that_needs_both_inputs(model: OracleDual) -> None:
    questions = embed_texts(model, ["is the image bright?", "is the image dark?"])
    assert not torch.equal(questions[0], questions[1])
    rows = vqa_closed_rows(model, epochs=30, seed=0)
    assert len(rows) == 60
    assert set(rows[0]) == {
        "task",
        "modality",
        "qid",
        "question",
        "answer",
        "pred",
        "correct",
        "majority_correct",
    }
    unknown = next(r for r in rows if r["qid"] == 8888)
    assert unknown["correct"] is False and unknown["pred"] in ("yes", "no")
    table = summarize(rows)["vqa_closed"]["radiology"]
    assert table["accuracy"]["value"] >= 58 / 60  # everything but the out-of-vocabulary question
    assert table["majority_baseline"]["value"] < 0.7  # neither image nor question alone suffices
    assert rows == vqa_closed_rows(model, epochs=30, seed=0)  # seeded
    json.dumps(rows)


def test_answer_vocabulary_and_fusion_head_shapes() -> None:
    assert answer_vocabulary(["yes", "no", "no", "left", "abnormal"]) == [
        "no",
        "abnormal",
        "left",
        "yes",
    ]
    head = CoAttentionFusionHead(embed_dim=8, num_answers=3, num_tokens=2, hidden_dim=16)
    assert head(torch.randn(5, 8), torch.randn(5, 8)).shape == (5, 3)
    with pytest.raises(InputError, match="same N"):
        head(torch.randn(5, 8), torch.randn(4, 8))
    with pytest.raises(InputError, match="divisible"):
        CoAttentionFusionHead(embed_dim=8, num_answers=3, hidden_dim=10, num_heads=4)


# --- real files in ../shared/data ----------------------------------------------------------------


def test_real_zero_shot_and_linear_probe_rows_match_the_files(data_dir: Path) -> None:
    model = OracleDual(("chest_xray", "breast_ultrasound"))
    rows = zero_shot_rows(model, "breast_ultrasound", max_items=40, data_dir=data_dir)
    with np.load(data_dir / "medmnist" / "breastmnist.npz") as archive:
        test_labels = archive["test_labels"].reshape(-1)
    assert len(rows) == 40
    assert [r["label"] for r in rows] == test_labels[[r["index"] for r in rows]].tolist()
    assert sorted(r["label"] for r in rows) == [0] * 20 + [1] * 20

    probe = linear_probe_rows(
        model, "breast_ultrasound", max_train=60, max_test=30, data_dir=data_dir
    )
    assert len(probe) == 30
    assert [r["label"] for r in probe] == test_labels[[r["index"] for r in probe]].tolist()
    table = summarize(probe)["linear_probe"]["breast_ultrasound"]
    assert 0 <= table["macro_auc"]["ci_low"] <= table["macro_auc"]["ci_high"] <= 1

    with pytest.raises(DataError, match="needs a 'train' split"):
        linear_probe_rows(model, "colon_pathology", data_dir=data_dir)


def test_real_retrieval_rows(data_dir: Path) -> None:
    rows = retrieval_rows(
        OracleDual(), ["chest_xray", "colon_pathology"], per_class_cap=3, data_dir=data_dir
    )
    assert len(rows) == 2 * (2 * 3 + 9 * 3)
    assert all(0 <= r["rank"] < 33 for r in rows)


def test_real_vqa_rad_closed_rows(data_dir: Path) -> None:
    rows = vqa_closed_rows(OracleDual(), epochs=1, data_dir=data_dir)
    test = medshield.data.load_vqa_rad("test", data_dir, answer_type="closed")
    assert [r["qid"] for r in rows] == [item.qid for item in test]
    table = summarize(rows)["vqa_closed"]["radiology"]
    # "no" is the most frequent closed training answer
    no_share = sum(item.answer == "no" for item in test) / len(test)
    assert table["majority_baseline"]["value"] == pytest.approx(no_share)
