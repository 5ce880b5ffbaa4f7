"""Reading a run directory for a report: ``results.json``, ``samples.jsonl``, ``config.yaml``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medshield.errors import DataError
from medshield.runs import read_samples


@dataclass
class RunData:
    """What a report is rendered from.

    Attributes:
        path: the run directory.
        results: ``results.json``.
        samples: the rows of ``samples.jsonl`` (:func:`medshield.runs.read_samples`).
        config_text: ``config.yaml`` as written (None when absent).
        config: ``config.yaml`` parsed (empty when absent or not a mapping).
    """

    path: Path
    results: dict[str, Any]
    samples: list[dict[str, Any]]
    config_text: str | None
    config: dict[str, Any]


def load_run(directory: str | Path) -> RunData:
    """Read a run directory.

    Raises:
        DataError: no directory, no ``results.json`` (the run has not finished or this is not a
            run directory), or a ``results.json`` that is not a JSON object.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory; give a run directory (with results.json)")
    results_path = path / "results.json"
    if not results_path.is_file():
        raise DataError(
            f"{path} has no results.json: not a run directory, or its run has not finished "
            "(a report is rendered from results.json and samples.jsonl)"
        )
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{results_path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict):
        raise DataError(f"{results_path} holds a {type(results).__name__}, not a JSON object")
    config_path = path / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    try:
        config = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError:
        config = None
    return RunData(
        path=path,
        results=results,
        samples=read_samples(path / "samples.jsonl"),
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
    )
