"""Users' own safety requests: a JSONL or CSV *query file* (the red-teaming ``source: file``).

One request per row: a JSON object per line of a ``.jsonl`` file, or a row of a ``.csv`` file
under a header. The fields:

- ``request`` (required): the text sent to the model;
- ``label`` (required): ``harmful`` or ``benign``;
- ``id``: a unique id (default: a hash of the row's request, label, modality and image, so it
  stays the same when rows are added, removed or reordered);
- ``modality``: a modality name of :data:`~medshield.data.modalities.MODALITIES` (or one of its
  MedMNIST subsets) or ``radiology``;
- ``image``: an image file, absolute or relative to the query file's folder; it is read and
  checked when the file is loaded. Without one the row is paired with a test image of its
  modality from the data dir (:func:`~medshield.data.safety.external.image_picker`, as the
  external sets are); a row with neither takes the requested modality (the first of the
  red-teaming ``modalities``, :data:`~medshield.data.safety.external.DEFAULT_MODALITY` when
  none is set). A row with an image but no modality is grouped as ``unspecified``;
- ``answer``: a benign row's reference answer, scored as the benchmark's are
  (:func:`~medshield.data.safety.items.match_answer`): ``yes`` / ``no`` answers as closed
  yes/no questions (the first of the two in the response counts), any other answer must occur
  in the response;
- ``category``: free text, kept as written (``unspecified`` without one); the nine ids of
  :data:`~medshield.data.safety.taxonomy.CATEGORY_IDS` keep per-category results comparable
  with the benchmark's.

Empty cells and JSON nulls count as absent; unknown fields are refused (a typo is an error, not
a silently dropped field). Every problem raises :class:`~medshield.errors.DataError` naming the
file and, for a row, its line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medshield.data.modalities import MODALITIES, get_modality
from medshield.data.safety.external import DEFAULT_MODALITY, image_picker, read_csv_rows
from medshield.data.safety.items import (
    RADIOLOGY,
    ImageRef,
    SafetyItem,
    item_id,
    load_image_file,
    normalize_answer,
)
from medshield.errors import DataError, UnknownNameError

SOURCE = "file"
FIELDS = ("id", "request", "label", "modality", "image", "answer", "category")
REQUIRED = ("request", "label")
LABELS = ("harmful", "benign")
UNSPECIFIED = "unspecified"
YES_NO = ("yes", "no")
_EXPECTED = {
    ".jsonl": 'one JSON object per line, e.g. {"request": "...", "label": "benign"}',
    ".csv": "a header row with request and label, then one request per row",
}
_RENAMES = {"prompt": "request", "text": "request", "question": "request", "kind": "label"}


@dataclass(frozen=True)
class _Row:
    """One validated row, before its image is drawn."""

    line: int
    id: str
    given_id: bool
    request: str
    label: str
    modality: str | None
    image: Path | None
    answer: str | None
    category: str


def read_query_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, raw fields) of every non-blank row of a query file, not yet validated.

    Raises:
        DataError: a missing file, an extension other than .jsonl or .csv, a file that is not
            UTF-8, an empty file, a line that is not a JSON object, a malformed csv row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"query file {path} not found (a relative path is read from {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix not in _EXPECTED:
        raise DataError(
            f"query file {path} has the unknown extension {suffix or '(none)'!r}; use .jsonl "
            "(one JSON object per line) or .csv (a header row, then one request per row)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read query file {path} ({type(exc).__name__}: {exc}); it must be UTF-8 text"
        ) from exc
    if not text.strip():
        raise DataError(f"query file {path} is empty; expected {_EXPECTED[suffix]}")
    if suffix == ".csv":
        return [(line, dict(row)) for line, row in read_csv_rows(path)]
    records = []
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may
        if not raw.strip():  # hold U+2028 and other characters it would split on
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {line}: not valid JSON ({exc.msg} at column {exc.colno}); "
                f"expected {_EXPECTED[suffix]}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {line}: a JSON {type(record).__name__}, expected {_EXPECTED[suffix]}"
            )
        records.append((line, record))
    return records


def _text(value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {name} must be text, got a JSON {type(value).__name__}")
    return str(value).strip() or None


def _modality(name: str, where: str) -> str:
    if name == RADIOLOGY:
        return RADIOLOGY
    try:
        return get_modality(name).name
    except UnknownNameError:
        raise DataError(
            f"{where}: unknown modality {name!r}; known modalities: "
            f"{', '.join([*MODALITIES, RADIOLOGY])}"
        ) from None


def _row(path: Path, line: int, record: dict[str, Any]) -> _Row:
    where = f"{path}, line {line}"
    unknown = [k for k in record if k not in FIELDS]
    if unknown:
        renames = [f"{k} to {_RENAMES[k]}" for k in unknown if k in _RENAMES]
        raise DataError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
            f"{', '.join(FIELDS)}" + (f" (rename {', '.join(renames)})" if renames else "")
        )
    values = {k: _text(record.get(k), where, k) for k in FIELDS}
    missing = [k for k in REQUIRED if values[k] is None]
    if missing:
        raise DataError(f"{where}: missing required field(s) {', '.join(missing)}")
    request, label = str(values["request"]), str(values["label"]).lower()
    if label not in LABELS:
        raise DataError(f"{where}: label {values['label']!r} must be harmful or benign")
    if values["answer"] is not None and label == "harmful":
        raise DataError(
            f"{where}: a harmful row has an answer; reference answers score benign rows only, "
            "so remove it or label the row benign"
        )
    modality = _modality(values["modality"], where) if values["modality"] else None
    image = None
    if values["image"] is not None:
        image = Path(values["image"])
        image = (image if image.is_absolute() else path.parent / image).resolve()
        if not image.is_file():
            raise DataError(
                f"{where}: image {values['image']} not found (looked for {image}; a relative "
                "path is read from the query file's folder)"
            )
        try:
            load_image_file(image)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    given_id = values["id"] is not None
    return _Row(
        line=line,
        id=values["id"]
        or item_id("f", label, request, values["modality"] or "", values["image"] or ""),
        given_id=given_id,
        request=request,
        label=label,
        modality=modality,
        image=image,
        answer=values["answer"],
        category=values["category"] or UNSPECIFIED,
    )


def load_query_file(
    path: str | Path, modality: str | None = None, data_dir: str | Path | None = None
) -> list[SafetyItem]:
    """The requests of a query file (see the module docstring for its fields), in file order.

    Args:
        path: a ``.jsonl`` or ``.csv`` file.
        modality: keep the rows of this modality and those without one (None: every row); rows
            without a modality or an image are paired with test images of this modality
            (default :data:`~medshield.data.safety.external.DEFAULT_MODALITY`).
        data_dir: data root the images of rows without one are drawn from.

    Raises:
        DataError: a malformed file (see :func:`read_query_records`), a row with a missing or
            bad field, an unknown modality, a missing or unreadable image, a duplicate id, or no
            test images to draw for a row without an image; each names the file and the line.
        UnknownNameError: an unknown ``modality`` argument.
    """
    path = Path(path)
    rows = [_row(path, line, record) for line, record in read_query_records(path)]
    first: dict[str, int] = {}
    for row in rows:
        if row.id in first:
            where = f"{path}, line {row.line}"
            if row.given_id:
                raise DataError(
                    f"{where}: id {row.id!r} is already used on line {first[row.id]}; ids must "
                    "be unique"
                )
            raise DataError(
                f"{where}: repeats line {first[row.id]} (the same request, label, modality and "
                "image); remove one or give the two rows distinct ids"
            )
        first[row.id] = row.line
    wanted = _modality(modality, "modality") if modality is not None else None
    pickers: dict[str, Callable[[str], ImageRef]] = {}
    items = []
    for row in rows:
        if wanted is not None and row.modality not in (None, wanted):
            continue
        if row.image is not None:
            image = ImageRef(SOURCE, row.modality or UNSPECIFIED, "", 0, str(row.image))
        else:
            name = row.modality or wanted or DEFAULT_MODALITY
            if name not in pickers:
                try:
                    pickers[name] = image_picker(name, data_dir)
                except DataError as exc:
                    raise DataError(
                        f"{path}, line {row.line}: no image given, and no {name} test image can "
                        f"be drawn from the data dir: {exc}"
                    ) from None
            image = pickers[name](row.request)
        items.append(
            SafetyItem(
                id=row.id,
                kind=row.label,  # type: ignore[arg-type]
                category=row.category,
                modality=image.modality,
                text=row.request,
                image=image,
                twin_id=None,
                answer=row.answer,
                source=SOURCE,
                choices=YES_NO if row.answer and normalize_answer(row.answer) in YES_NO else None,
                meta={"file": str(path), "line": row.line},
            )
        )
    return items


def query_file_record(path: str | Path) -> dict[str, Any]:
    """What a run records of its query file: resolved path, SHA-256 and number of rows.

    Raises:
        DataError: the file is missing or malformed (see :func:`read_query_records`).
    """
    path = Path(path)
    n_items = len(read_query_records(path))
    return {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "n_items": n_items,
    }
