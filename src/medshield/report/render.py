"""Render a run directory to one self-contained HTML file (inline CSS, PNG data URIs, a few
lines of inline JavaScript; no network) with Jinja2, autoescaping every value."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import jinja2

from medshield.report.kinds import renderers
from medshield.report.kinds.generic import numbers_section
from medshield.report.rundir import RunData, load_run
from medshield.report.view import Section, Table, number
from medshield.runs import Log

RUN_KEYS = ("kind", "seed", "versions", "wall_time_s")
REPORT_NAME = "report.html"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("medshield.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _run_table(results: dict[str, Any], kind_names: list[str]) -> Table:
    generic = f"{results.get('kind', 'unknown')} (generic table)"
    rows = [["kind", ", ".join(kind_names) or generic]]
    if "seed" in results:
        rows.append(["seed", number(results["seed"])])
    if "wall_time_s" in results:
        rows.append(["wall time", f"{number(results['wall_time_s'], 1)} s"])
    versions = results.get("versions")
    if isinstance(versions, dict):
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items())])
    return Table(["", ""], rows)


def sections(run: RunData) -> tuple[list[str], list[Section]]:
    """The names of the run's renderers and every section of its report, in order."""
    names: list[str] = []
    out: list[Section] = []
    claimed: set[str] = set(RUN_KEYS)
    for kind in renderers(run.results):
        keys = kind.claims(run.results)
        if keys:
            names.append(kind.name)
            claimed.update(keys)
            out.extend(kind.sections(run))
    rest = [k for k in run.results if k not in claimed]
    generic = numbers_section(run.results, rest, "Other results" if names else "Results")
    if generic is not None:
        out.append(generic)
    return names, out


def render_report(run_dir: str | Path) -> str:
    """The HTML report of a run directory.

    Raises:
        DataError: not a run directory (no or unreadable ``results.json``).
    """
    run = load_run(run_dir)
    names, parts = sections(run)
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=run.path.resolve().name,
        run_path=str(run.path),
        generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        run_table=_run_table(run.results, names),
        config_text=run.config_text,
        n_samples=len(run.samples),
        sections=parts,
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``)."""
    html = render_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def report_after_run(run_dir: str | Path, log: Log = print) -> Path | None:
    """Write the report at the end of a run; never raises, so a report that fails to render
    costs only the report (a warning), never the run's results or its exit code."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are already on disk
        log(f"warning: could not write the report of {run_dir}: {type(exc).__name__}: {exc}")
        return None
    log(f"report: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return path
