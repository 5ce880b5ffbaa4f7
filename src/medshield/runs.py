"""Run directories: resolved ``config.yaml``, ``results.json`` and ``samples.jsonl``.

``samples.jsonl`` is the source of truth: one JSON row per evaluated item, appended and flushed
as work finishes, so an interrupted run resumes without recomputing or losing finished rows.

A run's lifecycle is :class:`Run`'s: opening it (``config.yaml``, or resuming), appending rows,
and :meth:`Run.finish`, which writes ``results.json`` with the run's :data:`RunKind` and then
its report. Whatever reads a finished run (a study aggregating its cells, the report) reads it
with :func:`read_results`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError

from medshield.config import dump_config
from medshield.errors import ConfigError, DataError, NothingMeasured

Log = Callable[[str], None]
"""Where workflows report progress: ``print``, or ``rich.console.Console.print``."""

RunKind = Literal[
    "pretrain",
    "evaluate",
    "craft-noise",
    "train-vlm",
    "finetune",
    "redteam",
    "study-noise",
    "study-finetune",
    "study-defense",
    "demo",
]
"""What a run is, written to ``results.json`` as ``kind``; the report picks its renderer by it.
A study's cells are ordinary runs: a noise-study cell is a ``pretrain`` run (it evaluates too),
a fine-tuning-study cell a ``finetune`` run, a defense-study cell a ``redteam`` run."""
RUN_KINDS: tuple[str, ...] = get_args(RunKind)

Reporter = Callable[[Path], object]
"""What writes a finished run's report, given its directory (e.g.
:func:`medshield.report.report_after_run` with a log bound)."""

RESULTS_FILE = "results.json"

VERSIONED_PACKAGES = (
    "medshield",
    "torch",
    "transformers",
    "open_clip_torch",
    "accelerate",
    "numpy",
)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``samples.jsonl`` (empty when absent): a torn line left by a crash, or a
    line that holds no JSON object, is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def has_results(directory: str | Path) -> bool:
    """Whether ``directory`` holds a finished run (one that wrote its ``results.json``)."""
    return (Path(directory) / RESULTS_FILE).is_file()


def read_results(directory: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a finished run.

    Raises:
        DataError: no directory, no ``results.json`` (the run has not finished or this is not a
            run directory), or a ``results.json`` that is not a JSON object.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory; give a run directory (with results.json)")
    results_path = path / RESULTS_FILE
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
    return results


def _same_config(saved: str, config: BaseModel, text: str) -> bool:
    """Whether a run's saved ``config.yaml`` describes ``config`` (dumped as ``text``): the same
    YAML, or the same once validated with the current defaults."""
    if saved == text:
        return True
    try:
        previous = type(config).model_validate(yaml.safe_load(saved))
    except (ValidationError, yaml.YAMLError):
        return False
    return dump_config(previous) == text


def holds_finished_run(directory: str | Path, config: BaseModel) -> bool:
    """Whether ``directory`` holds a finished run of ``config``: its ``results.json``, and a
    ``config.yaml`` that describes ``config`` (as :class:`Run` compares them on resuming)."""
    saved = Path(directory) / "config.yaml"
    if not has_results(directory) or not saved.is_file():
        return False
    return _same_config(saved.read_text(), config, dump_config(config))


class Run:
    """A run directory.

    Opening a directory that already holds a run resumes it when its ``config.yaml`` equals the
    new config; a different config is refused unless ``overwrite`` is set (which empties the
    directory), so results and checkpoints from two configurations are never mixed. Equal means
    equal once validated: a ``config.yaml`` written before a field existed holds that field's
    default, so a new field with a default does not orphan older runs.

    A run never deletes what it did not create: a folder that exists, is not empty and holds no
    ``config.yaml`` is refused (with or without ``overwrite``), and so is a directory that is a
    symbolic link or resolves to its parent folder or one of that folder's ancestors.
    """

    def __init__(self, directory: str | Path, config: BaseModel, overwrite: bool = False) -> None:
        self.path = Path(directory)
        self.config = config
        self.started = time.time()
        text = dump_config(config)
        config_path = self.path / "config.yaml"
        try:
            _check_own_folder(self.path)
            if config_path.exists() and not overwrite:
                if not _same_config(config_path.read_text(), config, text):
                    raise ConfigError(
                        f"{self.path} holds a run with a different config; pass --overwrite to "
                        "replace it, or choose another --name/--output-dir"
                    )
            elif overwrite and config_path.exists():
                shutil.rmtree(self.path)  # rows, checkpoints and models of the old config go
            self.path.mkdir(parents=True, exist_ok=True)
            config_path.write_text(text)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the run folder {self.path}: {exc.strerror or exc} "
                f"({exc.filename or self.path}); set output_dir (--set output_dir=DIR) to a "
                "folder you can write to"
            ) from None

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    def load_samples(self) -> list[dict[str, Any]]:
        """Every finished row (see :func:`read_samples`)."""
        return read_samples(self.samples_path)

    def complete_groups(self) -> set[str]:
        """The row groups finished in ``samples.jsonl``, for a job that resumes group by group
        (each row tagged with its ``group`` and the group's size ``n_group``). The rows of a group
        a crash cut short are dropped, so that the group is computed again; rows without a group
        are kept."""
        rows = self.load_samples()
        counts = Counter(r["group"] for r in rows if "group" in r)
        expected = {r["group"]: r["n_group"] for r in rows if "group" in r}
        complete = {g for g, n in counts.items() if n == expected[g]}
        if len(complete) != len(counts):
            self.rewrite_samples(r for r in rows if "group" not in r or r["group"] in complete)
        return complete

    def append_samples(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows and flush them to disk at once (after a torn line, on a new line)."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if self.samples_path.exists() and self.samples_path.stat().st_size:
            with self.samples_path.open("rb") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    text = "\n" + text
        with self.samples_path.open("a") as f:
            f.write(text)
            f.flush()

    @property
    def finished(self) -> bool:
        """Whether the run has written its ``results.json`` (a resumed study keeps such cells)."""
        return has_results(self.path)

    def finish(
        self,
        results: dict[str, Any],
        *,
        kind: RunKind,
        seed: int,
        report: Reporter | None = None,
    ) -> dict[str, Any]:
        """End the run: write ``results.json`` (``kind`` first, then ``results``, the seed, the
        library versions and the wall time; strict JSON, a NaN or infinite number becomes
        ``null``), then the report when ``report`` is given. Returns what was written.

        Raises:
            ConfigError: ``kind`` is not a :data:`RunKind`.
        """
        if kind not in RUN_KINDS:
            raise ConfigError(f"unknown run kind {kind!r}; choose one of {', '.join(RUN_KINDS)}")
        full = finite_json(
            {
                "kind": kind,
                **results,
                "seed": seed,
                "versions": library_versions(),
                "wall_time_s": round(time.time() - self.started, 2),
            }
        )
        text = json.dumps(full, indent=2, allow_nan=False) + "\n"
        (self.path / RESULTS_FILE).write_text(text)
        if report is not None:
            report(self.path)
        return full

    def store(self, data: bytes, folder: str, suffix: str) -> str:
        """Keep ``data`` in the run directory as ``folder/<first 16 hex digits of its SHA-256>
        <suffix>`` and return that path, relative to the run directory (the form rows record).

        Content-addressed: the same bytes map to the same file, written once (atomically, so a
        crash leaves no torn file) and kept when a resumed run stores them again.
        """
        name = f"{folder}/{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
        path = self.path / name
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, data)
        return name

    def rewrite_samples(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace ``samples.jsonl`` (used to drop rows of a group a crash left unfinished)."""
        write_atomic(self.samples_path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_own_folder(path: Path) -> None:
    """Refuse a run directory that a run would write into or delete without having made it."""
    if path.is_symlink():
        raise ConfigError(
            f"{path} is a symbolic link; choose another --set name=... (a run never writes "
            "through or deletes a link)"
        )
    resolved, parent = path.resolve(), path.parent.resolve()
    if resolved == parent or resolved in parent.parents:
        raise ConfigError(
            f"{path} is {resolved}, the output folder itself or one above it; choose a run name "
            "that is a new folder inside output_dir"
        )
    if path.is_dir() and not (path / "config.yaml").exists() and any(path.iterdir()):
        raise ConfigError(
            f"{path} exists and is not a medshield run (it has no config.yaml); nothing was "
            "written or deleted there; choose another --set name=... or --set output_dir=..., "
            "or move the folder away yourself"
        )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run folder; choose another --set name=...")


def finite_json(value: Any) -> Any:
    """``value`` (nested dicts, lists and numbers) with every NaN or infinite float replaced by
    ``None``, so it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def check_measured(
    unit: str, total: int, failures: dict[str, int], fix: str, log: Log = print
) -> None:
    """The check every workflow makes before it writes its results: did it measure anything?

    Args:
        unit: what was attempted, plural (``"evaluation groups"``, ``"red-team rows"``).
        total: how many were attempted (finished earlier or now).
        failures: why the others were skipped or failed: reason -> how many.
        fix: what to do about it, appended to the error.
        log: where a partial run says how many were skipped and why.

    Raises:
        NothingMeasured: every one of the ``total`` failed (or there were none).
    """
    failed = sum(failures.values())
    reasons = list(failures)
    why = f"first reason: {reasons[0]}" if reasons else "nothing was attempted"
    if len(reasons) > 1:
        why += f" (and {len(reasons) - 1} other reasons, in the log above)"
    if total == 0 or failed >= total:
        raise NothingMeasured(
            f"nothing measured: all {total} {unit} were skipped or failed; {why}; {fix}"
        )
    if failed:
        log(f"{failed} of {total} {unit} skipped or failed; {why}")


def swap_directory(new: Path, directory: Path) -> None:
    """Replace ``directory`` by the finished folder ``new`` (a checkpoint written aside), so a
    crash leaves either the old or the new checkpoint, never a half-written one."""
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        directory.rename(old)
        new.rename(directory)
        shutil.rmtree(old)
    else:
        new.rename(directory)
