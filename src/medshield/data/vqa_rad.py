"""VQA-RAD (Lau et al., 2018) in the MEVF / MICCAI19-MedVQA json format.

Layout under the data root::

    vqa_rad/trainset.json   3064 question-answer pairs
    vqa_rad/testset.json     451 question-answer pairs
    vqa_rad/images/*.jpg     315 radiology images (CT, MRI, X-ray)

Each json entry has ``qid, image_name, image_organ, answer, answer_type, question_type,
question, phrase_type``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medshield.data.medmnist import data_root
from medshield.errors import DataError

VQA_SPLITS = {"train": "trainset.json", "test": "testset.json"}
ANSWER_TYPES = ("closed", "open")
_KEYS = (
    "qid",
    "image_name",
    "image_organ",
    "answer",
    "answer_type",
    "question_type",
    "question",
    "phrase_type",
)


@dataclass(frozen=True)
class VQAItem:
    """One VQA-RAD question about one image.

    Attributes:
        qid: question id from the json file.
        image_path: path of the image (may not exist; :func:`load_vqa_image` checks).
        question: the question text, stripped.
        answer: the answer, lower-case and stripped (numbers become strings: ``"4"``).
        answer_type: ``"closed"`` (mostly yes/no, but not always) or ``"open"``.
        question_type: upper-case category such as ``"PRES"``, ``"POS"`` or ``"PRES, ATTRIB"``.
        organ: ``"HEAD"``, ``"CHEST"`` or ``"ABD"``.
        phrase_type: ``"freeform"``, ``"para"`` or ``"frame"``.
    """

    qid: int
    image_path: Path
    question: str
    answer: str
    answer_type: str
    question_type: str
    organ: str
    phrase_type: str


def load_vqa_rad(
    split: str, data_dir: str | Path | None = None, answer_type: str | None = None
) -> list[VQAItem]:
    """Load the VQA-RAD train or test questions.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: data root (see :func:`medshield.data.data_root`); files in ``<root>/vqa_rad/``.
        answer_type: keep only ``"closed"`` or ``"open"`` questions (None: all).

    Raises:
        DataError: bad split or answer type; missing, corrupt or malformed json file.
    """
    if split not in VQA_SPLITS:
        raise DataError(f"unknown VQA-RAD split {split!r}; expected one of {', '.join(VQA_SPLITS)}")
    if answer_type is not None and answer_type.lower() not in ANSWER_TYPES:
        raise DataError(
            f"unknown answer_type {answer_type!r}; expected one of {', '.join(ANSWER_TYPES)} "
            "or None"
        )
    path = data_root(data_dir) / "vqa_rad" / VQA_SPLITS[split]
    if not path.is_file():
        raise DataError(
            f"VQA-RAD file {path} not found. Set MEDSHIELD_DATA_DIR to a directory whose vqa_rad/ "
            "folder holds trainset.json, testset.json and images/ (MEVF / MICCAI19-MedVQA format)."
        )
    stat = path.stat()
    items = _parse(str(path), (stat.st_mtime_ns, stat.st_size))
    if answer_type is None:
        return list(items)
    return [item for item in items if item.answer_type == answer_type.lower()]


@functools.lru_cache(maxsize=8)
def _parse(path_str: str, stamp: tuple[int, int]) -> tuple[VQAItem, ...]:
    """Parse and validate one json file; cached per path and file stamp (mtime, size)."""
    path = Path(path_str)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read VQA-RAD file {path}: {exc}") from exc
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a json list of questions, got {type(entries).__name__}")
    images = path.parent / "images"
    items = []
    for i, entry in enumerate(entries):
        missing = [k for k in _KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DataError(f"{path}: entry {i} lacks the keys {', '.join(missing)}")
        kind = str(entry["answer_type"]).strip().lower()
        if kind not in ANSWER_TYPES:
            raise DataError(
                f"{path}: entry {i} (qid {entry['qid']}) has answer_type {entry['answer_type']!r}; "
                "expected CLOSED or OPEN"
            )
        try:
            qid = int(entry["qid"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: entry {i} has a non-integer qid {entry['qid']!r}") from exc
        items.append(
            VQAItem(
                qid=qid,
                image_path=images / str(entry["image_name"]),
                question=str(entry["question"]).strip(),
                answer=str(entry["answer"]).strip().lower(),
                answer_type=kind,
                question_type=str(entry["question_type"]).strip().upper(),
                organ=str(entry["image_organ"]).strip().upper(),
                phrase_type=str(entry["phrase_type"]).strip(),
            )
        )
    return tuple(items)


def load_vqa_image(path: str | Path, size: int = 64) -> torch.Tensor:
    """Load a VQA-RAD image as a grey float tensor (1, size, size) in [0, 1].

    The radiology images are decoded in PIL mode ``"L"`` and resized (bicubic) to a square.
    Decoded images are cached per path, size and file stamp.

    Raises:
        DataError: missing, unreadable or corrupt image; ``size`` < 1.
    """
    if size < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(
            f"VQA-RAD image {path} not found; check that the images/ folder is complete"
        ) from exc
    pixels = _decode(str(path), size, (stat.st_mtime_ns, stat.st_size))
    return torch.tensor(pixels, dtype=torch.float32).unsqueeze(0) / 255.0


@functools.lru_cache(maxsize=1024)
def _decode(path_str: str, size: int, stamp: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path_str) as image:
            grey = image.convert("L").resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image {path_str} ({type(exc).__name__}: {exc}); the file is corrupt "
            "or not an image. Replace it with a fresh copy."
        ) from exc
    pixels = np.asarray(grey, dtype=np.uint8)
    pixels.flags.writeable = False
    return pixels
