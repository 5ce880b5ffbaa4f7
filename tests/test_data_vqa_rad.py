"""VQA-RAD: question files, answer normalisation, image loading and broken inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medshield.data import load_vqa_image, load_vqa_rad
from medshield.errors import DataError

ENTRY = {
    "qid": 1,
    "image_name": "a.jpg",
    "image_organ": "HEAD",
    "answer": " Yes",
    "answer_type": "CLOSED",
    "question_type": "PRES",
    "question": "Is there a bleed?",
    "phrase_type": "freeform",
}


def _root_with(tmp_path: Path, content: str) -> Path:
    (tmp_path / "vqa_rad").mkdir()
    (tmp_path / "vqa_rad" / "testset.json").write_text(content)
    return tmp_path


@pytest.mark.parametrize(
    ("split", "n", "closed", "images"), [("train", 3064, 1823, 314), ("test", 451, 272, 203)]
)
def test_counts(data_dir: Path, split: str, n: int, closed: int, images: int) -> None:
    items = load_vqa_rad(split, data_dir)
    assert len(items) == n
    assert len(load_vqa_rad(split, data_dir, answer_type="closed")) == closed
    assert len(load_vqa_rad(split, data_dir, answer_type="OPEN")) == n - closed
    assert len({item.image_path for item in items}) == images
    assert all(item.image_path.is_file() for item in items)


def test_normalisation(data_dir: Path) -> None:
    items = load_vqa_rad("train", data_dir)
    assert {item.answer_type for item in items} == {"closed", "open"}
    assert all(item.answer == item.answer.strip().lower() for item in items)
    assert {item.organ for item in items} == {"HEAD", "CHEST", "ABD"}
    first = items[0]
    assert (first.qid, first.answer, first.question_type) == (1, "yes", "PRES")
    assert first.image_path.name == "synpic54610.jpg"
    closed = {item.answer for item in items if item.answer_type == "closed"}
    assert {"yes", "no"} < closed  # closed answers beyond yes/no are kept
    assert "4" in {item.answer for item in items}  # numeric answers become strings


def test_bad_arguments(data_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown VQA-RAD split 'val'"):
        load_vqa_rad("val", data_dir)
    with pytest.raises(DataError, match="unknown answer_type 'yesno'"):
        load_vqa_rad("test", data_dir, answer_type="yesno")


def test_image_loading(data_dir: Path) -> None:
    path = load_vqa_rad("test", data_dir)[0].image_path
    image = load_vqa_image(path)
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert load_vqa_image(path, size=32).shape == (1, 32, 32)
    image.zero_()  # callers get their own tensor, not the cache
    assert load_vqa_image(path).max() > 0


def test_missing_and_corrupt_images(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_vqa_image(tmp_path / "missing.jpg")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="garbage.jpg"):
        load_vqa_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    source = load_vqa_rad("test", data_dir)[0].image_path
    truncated.write_bytes(source.read_bytes()[:3000])
    with pytest.raises(DataError, match="corrupt"):
        load_vqa_image(truncated)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MEDSHIELD_DATA_DIR"):
        load_vqa_rad("train", tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"qid": 1,', "cannot read VQA-RAD file"),
        ('{"qid": 1}', "expected a json list"),
        (json.dumps([{k: v for k, v in ENTRY.items() if k != "answer"}]), "lacks the keys answer"),
        (json.dumps(["just a string"]), "entry 0 lacks the keys"),
        (json.dumps([{**ENTRY, "answer_type": "MAYBE"}]), "answer_type 'MAYBE'"),
        (json.dumps([{**ENTRY, "qid": "one"}]), "non-integer qid"),
    ],
)
def test_broken_json(tmp_path: Path, content: str, message: str) -> None:
    root = _root_with(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_vqa_rad("test", root)
    assert "testset.json" in str(info.value)


def test_minimal_file(tmp_path: Path, data_dir: Path) -> None:
    root = _root_with(tmp_path, json.dumps([ENTRY]))
    (root / "vqa_rad" / "images").mkdir()
    shutil.copy(load_vqa_rad("test", data_dir)[0].image_path, root / "vqa_rad" / "images" / "a.jpg")
    (item,) = load_vqa_rad("test", root)
    assert (item.answer, item.answer_type) == ("yes", "closed")
    assert load_vqa_image(item.image_path, size=16).shape == (1, 16, 16)
