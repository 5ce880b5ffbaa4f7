"""Reading a run directory for a report: ``results.json``, ``samples.jsonl``, ``config.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medshield.runs import read_results, read_samples


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
        DataError: not a finished run (see :func:`medshield.runs.read_results`).
    """
    path = Path(directory)
    results = read_results(path)
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
