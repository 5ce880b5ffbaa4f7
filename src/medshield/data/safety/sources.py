"""Where red-teaming items come from: :data:`SOURCES` and :func:`load_safety_items`, which
dispatches a source name to the medshield benchmark, an external set or the user's query file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medshield.data.medmnist import data_root
from medshield.data.safety.benchmark import build_benchmark
from medshield.data.safety.external import (
    DEFAULT_MODALITY,
    check_limit,
    load_figstep,
    load_figstep_benign,
    load_jailbreakbench,
    load_medsafetybench,
)
from medshield.data.safety.items import SafetyItem
from medshield.data.safety.queryfile import load_query_file
from medshield.errors import DataError, InputError, UnknownNameError

SOURCES = (
    "medshield",
    "medsafetybench",
    "figstep",
    "figstep-tiny",
    "figstep-benign",
    "jailbreakbench",
    "file",
)
_OPTIONS: dict[str, set[str]] = {
    "medsafetybench": {"split", "generators", "limit_per_category"},
    "figstep": {"include_benign"},
    "figstep-tiny": {"include_benign"},
}


def load_safety_items(
    source: str,
    *,
    kind: str | None = None,
    modality: str | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    path: str | Path | None = None,
    **options: Any,
) -> list[SafetyItem]:
    """Load safety items from one source: the entry point the red-teaming workflow uses.

    Args:
        source: one of :data:`SOURCES`: ``"medshield"`` (the query benchmark),
            ``"medsafetybench"``, ``"figstep"``, ``"figstep-tiny"``, ``"figstep-benign"``,
            ``"jailbreakbench"``, or ``"file"`` (the user's query file at ``path``, see
            :mod:`medshield.data.safety.queryfile`). For ``"figstep"``,
            ``include_benign=True`` also loads the benign sentences when their file is present.
        kind: keep only ``"harmful"`` or ``"benign"`` items (None: both).
        modality: for the benchmark, restrict to this modality; for external sets, the modality
            of the paired images (default :data:`DEFAULT_MODALITY`); for a query file, keep the
            rows of this modality and those without one, which it gives its images.
        data_dir: data root.
        limit: keep the first ``limit`` items (after the ``kind`` filter).
        path: the query file of source ``"file"`` (only).
        options: passed on to the source's loader (e.g. ``split="train"`` for MedSafetyBench).

    Raises:
        UnknownNameError: unknown source.
        DataError: missing or corrupt files; a malformed query file; bad ``kind`` or ``limit``.
        InputError: options the source does not take; ``path`` without source ``"file"``.
    """
    if kind not in (None, "harmful", "benign"):
        raise DataError(f"kind must be 'harmful', 'benign' or None, got {kind!r}")
    check_limit(limit)
    if (source == "file") != (path is not None):
        raise InputError(
            "source 'file' needs the path of a query file"
            if path is None
            else f"a query file path is only read with source 'file', not {source!r}"
        )
    allowed = _OPTIONS.get(source, set())
    unexpected = sorted(set(options) - allowed)
    if source in SOURCES and unexpected:
        raise InputError(
            f"unexpected option(s) {', '.join(unexpected)} for source {source!r}; it takes "
            f"{', '.join(sorted(allowed)) or 'no options'}"
        )
    image_modality = modality or DEFAULT_MODALITY
    if source == "medshield":
        items = build_benchmark(data_dir, [modality] if modality else None)
    elif source == "medsafetybench":
        items = load_medsafetybench(modality=image_modality, data_dir=data_dir, **options)
    elif source in ("figstep", "figstep-tiny"):
        include_benign = bool(options.pop("include_benign", False))
        items = load_figstep(source == "figstep-tiny", image_modality, data_dir)
        benign_file = data_root(data_dir) / "figstep" / "benign_sentences_without_harmful_phase.csv"
        if include_benign and benign_file.is_file():
            items += load_figstep_benign(image_modality, data_dir)
    elif source == "figstep-benign":
        items = load_figstep_benign(image_modality, data_dir)
    elif source == "jailbreakbench":
        kinds = (kind,) if kind else ("harmful", "benign")
        items = load_jailbreakbench(kinds, image_modality, data_dir)
    elif source == "file":
        items = load_query_file(str(path), modality, data_dir)
    else:
        raise UnknownNameError(
            f"unknown safety source {source!r}; known sources: {', '.join(SOURCES)}"
        )
    if kind is not None:
        items = [item for item in items if item.kind == kind]
    return items[:limit]
