"""External safety sets loaded from their files, for transfer evaluation.

Files under the data root (see :func:`medshield.data.data_root`), as in ``shared/data``:

- ``medsafetybench/{train,test}/{gpt4,llama2}/med_safety_demonstrations_category_<k>.csv``
  (columns ``harmful_medical_request``, ``safe_response``) and
  ``medsafetybench/med_harm_llama3/category_<k>.txt`` (one request per line); k = 1..9 are the
  AMA medical-ethics principles the requests violate (Han et al., MedSafetyBench, 2024);
- ``figstep/safebench.csv`` and ``figstep/SafeBench-Tiny.csv`` (columns ``category_name``,
  ``question``, ``instruction``, ...) and ``figstep/benign_sentences_without_harmful_phase.csv``
  (column ``sentence``) (Gong et al., FigStep, 2023);
- ``jailbreakbench/harmful-behaviors.csv`` and ``jailbreakbench/benign-behaviors.csv`` (columns
  ``goal``, ``target``, ``behavior``, ``category``, any capitalisation; Chao et al., 2024). The two
  files are aligned row by row (benign behaviour i is the matched twin of harmful behaviour i), so
  items loaded together carry each other's id in ``twin_id``.

These requests are text only; each item is paired with an image of a *stated* modality (the
``modality`` argument): the test image at index ``crc32(text) mod N``, so the pairing is stable.
Categories are kept from the source, prefixed with its name (``"jailbreakbench:Malware/Hacking"``).
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medshield.data.medmnist import data_root, load_split
from medshield.data.modalities import get_modality
from medshield.data.safety.items import RADIOLOGY, ImageRef, SafetyItem, item_id
from medshield.data.vqa_rad import load_vqa_rad
from medshield.errors import DataError

DEFAULT_MODALITY = "chest_xray"
MEDSAFETYBENCH_SPLITS = ("train", "test", "med_harm_llama3")
MEDSAFETYBENCH_GENERATORS = ("gpt4", "llama2")


# --- file reading --------------------------------------------------------------------------------


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a data-root csv file (see :func:`read_csv_rows`)."""
    if not path.is_file():
        raise DataError(
            f"{path} not found. Set MEDSHIELD_DATA_DIR to a directory holding the safety data "
            "files (see shared/data/SOURCES.md for where each file comes from)."
        )
    return [row for _, row in read_csv_rows(path, required)]


def read_csv_rows(path: Path, required: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every non-blank row of a UTF-8 csv file, with lower-cased, stripped
    column names and stripped cells; every required column present and non-empty in every row.

    Raises:
        DataError: an unreadable or empty file, a missing column, a row with the wrong number of
            fields or an empty required cell (the message names the file and the line).
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            records = []
            start = reader.line_num + 1
            for record in reader:  # a quoted cell may span lines: a row starts after the last
                records.append((start, record))
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read {path} ({type(exc).__name__}: {exc}); the file is corrupt or not a "
            "UTF-8 csv file. Replace it with a fresh copy."
        ) from exc
    if header is None:
        raise DataError(f"{path} is empty; expected a csv header with {', '.join(required)}")
    columns = [c.strip().lower() for c in header]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
        )
    rows = []
    for line, record in records:
        if not any(cell.strip() for cell in record):
            continue
        if len(columns) == 1 and len(record) > 1:  # a one-column file with unquoted commas
            record = [",".join(record)]
        if len(record) != len(columns):
            raise DataError(
                f"{path}, line {line}: {len(record)} fields but the header has {len(columns)}"
            )
        row = {c: cell.strip() for c, cell in zip(columns, record, strict=True)}
        empty = [c for c in required if not row[c]]
        if empty:
            raise DataError(f"{path}, line {line}: empty {', '.join(empty)}")
        rows.append((line, row))
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if "\x00" in text:
        raise DataError(f"{path} contains NUL bytes; it is not a text file")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no requests")
    return lines


# --- image pairing -------------------------------------------------------------------------------


def image_picker(modality: str, data_dir: str | Path | None = None) -> Callable[[str], ImageRef]:
    """A function text -> the test image of ``modality`` paired with it.

    The pairing is a stable hash: the image at index ``crc32(text) mod N`` of the modality's N
    test images (MedMNIST), or of VQA-RAD's test images for ``"radiology"``. Every text-only
    source (the external sets, a query file's rows without an image) draws its images here.

    Raises:
        DataError: the modality's test split (or VQA-RAD) is missing or empty.
        UnknownNameError: an unknown modality.
    """
    if modality == RADIOLOGY:
        names = sorted({(q.image_path.name, q.qid) for q in load_vqa_rad("test", data_dir)})
        by_name = dict(names[::-1])  # smallest qid per image
        images = sorted(by_name)

        def pick_vqa(text: str) -> ImageRef:
            name = images[zlib.crc32(text.encode()) % len(images)]
            return ImageRef("vqa_rad", RADIOLOGY, "test", by_name[name], name)

        return pick_vqa
    name = get_modality(modality).name
    size = len(load_split(name, "test", data_dir, download=False))  # never empty

    def pick(text: str) -> ImageRef:
        return ImageRef("medmnist", name, "test", zlib.crc32(text.encode()) % size)

    return pick


def _item(
    source: str,
    kind: str,
    category: str,
    text: str,
    image: ImageRef,
    meta: dict[str, Any],
    template: str = "",
) -> SafetyItem:
    return SafetyItem(
        id=item_id("x", source, kind, category, image.modality, image.key(), text),
        kind=kind,  # type: ignore[arg-type]
        category=category,
        modality=image.modality,
        text=text,
        image=image,
        twin_id=None,
        answer=None,
        source=source,
        template=template,
        meta=meta,
    )


# --- loaders -------------------------------------------------------------------------------------


def load_medsafetybench(
    split: str = "test",
    generators: Sequence[str] = MEDSAFETYBENCH_GENERATORS,
    modality: str = DEFAULT_MODALITY,
    data_dir: str | Path | None = None,
    limit_per_category: int | None = None,
) -> list[SafetyItem]:
    """MedSafetyBench harmful medical requests (all harmful; category ``medsafetybench:<k>``).

    Args:
        split: ``"train"`` or ``"test"`` (the csv demonstrations, ``meta["safe_response"]`` holds
            the reference refusal), or ``"med_harm_llama3"`` (about 8000 requests per category,
            so ``limit_per_category`` is advised).
        generators: for the csv splits, which generator folders (``gpt4``, ``llama2``) to read.
        modality: modality of the images the requests are paired with.
        data_dir: data root.
        limit_per_category: keep the first n requests of each category (per generator).

    Raises:
        DataError: missing directory or files, corrupt file, bad split or generator.
    """
    if split not in MEDSAFETYBENCH_SPLITS:
        raise DataError(
            f"unknown MedSafetyBench split {split!r}; expected one of "
            f"{', '.join(MEDSAFETYBENCH_SPLITS)}"
        )
    unknown = [g for g in generators if g not in MEDSAFETYBENCH_GENERATORS]
    if unknown or not generators:
        raise DataError(
            f"unknown MedSafetyBench generator(s) {unknown or list(generators)}; expected a "
            f"non-empty subset of {', '.join(MEDSAFETYBENCH_GENERATORS)}"
        )
    check_limit(limit_per_category)
    root = data_root(data_dir) / "medsafetybench"
    if not root.is_dir():
        raise DataError(
            f"MedSafetyBench directory {root} not found. Set MEDSHIELD_DATA_DIR to a directory "
            "whose medsafetybench/ folder holds the files of AI4LIFE-GROUP/med-safety-bench."
        )
    pick = image_picker(modality, data_dir)
    items: list[SafetyItem] = []
    for k in range(1, 10):
        category = f"medsafetybench:{k}"
        if split == "med_harm_llama3":
            lines = _read_lines(root / split / f"category_{k}.txt")[:limit_per_category]
            for i, text in enumerate(lines):
                meta = {"file": f"{split}/category_{k}.txt", "row": i}
                items.append(_item("medsafetybench", "harmful", category, text, pick(text), meta))
            continue
        for gen in generators:
            path = root / split / gen / f"med_safety_demonstrations_category_{k}.csv"
            rows = _read_csv(path, ("harmful_medical_request", "safe_response"))
            for i, row in enumerate(rows[:limit_per_category]):
                text = row["harmful_medical_request"]
                meta = {
                    "file": f"{split}/{gen}/{path.name}",
                    "row": i,
                    "safe_response": row["safe_response"],
                }
                items.append(_item("medsafetybench", "harmful", category, text, pick(text), meta))
    return items


def load_figstep(
    tiny: bool = False, modality: str = DEFAULT_MODALITY, data_dir: str | Path | None = None
) -> list[SafetyItem]:
    """FigStep SafeBench harmful questions (500, or the 50 of SafeBench-Tiny).

    ``meta["instruction"]`` holds FigStep's declarative rephrasing ("Steps to ...") that the
    FigStep attack renders into the image; category ``figstep:<category_name>``.

    Raises:
        DataError: missing or corrupt file.
    """
    name = "SafeBench-Tiny.csv" if tiny else "safebench.csv"
    path = data_root(data_dir) / "figstep" / name
    rows = _read_csv(path, ("category_name", "question", "instruction"))
    pick = image_picker(modality, data_dir)
    source = "figstep-tiny" if tiny else "figstep"
    items = []
    for i, row in enumerate(rows):
        meta = {"row": i, "instruction": row["instruction"], "task_id": row.get("task_id", "")}
        category = f"figstep:{row['category_name']}"
        items.append(
            _item(source, "harmful", category, row["question"], pick(row["question"]), meta)
        )
    return items


def load_figstep_benign(
    modality: str = DEFAULT_MODALITY, data_dir: str | Path | None = None
) -> list[SafetyItem]:
    """FigStep's benign sentences (``"Steps to make *."``: the harmful phrase removed).

    Raises:
        DataError: missing or corrupt file.
    """
    path = data_root(data_dir) / "figstep" / "benign_sentences_without_harmful_phase.csv"
    rows = _read_csv(path, ("sentence",))
    pick = image_picker(modality, data_dir)
    return [
        _item(
            "figstep-benign",
            "benign",
            "figstep:benign",
            r["sentence"],
            pick(r["sentence"]),
            {"row": i},
        )
        for i, r in enumerate(rows)
    ]


def load_jailbreakbench(
    kinds: Sequence[str] = ("harmful", "benign"),
    modality: str = DEFAULT_MODALITY,
    data_dir: str | Path | None = None,
) -> list[SafetyItem]:
    """JailbreakBench (JBB-Behaviors) harmful and/or benign behaviours.

    Text is the behaviour's goal; ``meta`` holds ``target`` (the affirmative prefix), ``behavior``
    and the source ``index``. When both kinds are loaded, row i of each file are twins.

    Raises:
        DataError: missing or corrupt file, an unknown kind.
    """
    bad = [k for k in kinds if k not in ("harmful", "benign")]
    if bad or not kinds:
        raise DataError(f"kinds must be a non-empty subset of harmful, benign; got {list(kinds)}")
    root = data_root(data_dir) / "jailbreakbench"
    pick = image_picker(modality, data_dir)
    loaded: dict[str, list[SafetyItem]] = {}
    for kind in ("harmful", "benign"):
        if kind not in kinds:
            continue
        rows = _read_csv(root / f"{kind}-behaviors.csv", ("goal", "target", "behavior", "category"))
        loaded[kind] = [
            _item(
                "jailbreakbench",
                kind,
                f"jailbreakbench:{row['category']}",
                row["goal"],
                pick(row["goal"]),
                {"index": i, "target": row["target"], "behavior": row["behavior"]},
            )
            for i, row in enumerate(rows)
        ]
    if len(loaded) == 2 and len(loaded["harmful"]) == len(loaded["benign"]):
        from dataclasses import replace

        harmful = [
            replace(h, twin_id=b.id)
            for h, b in zip(loaded["harmful"], loaded["benign"], strict=True)
        ]
        benign = [
            replace(b, twin_id=h.id)
            for h, b in zip(loaded["harmful"], loaded["benign"], strict=True)
        ]
        loaded = {"harmful": harmful, "benign": benign}
    return [item for kind in ("harmful", "benign") for item in loaded.get(kind, [])]


def check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
