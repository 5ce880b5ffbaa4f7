"""What a report shows, independent of HTML: sections of tables, figures and a sample browser.

The kind modules (:mod:`medshield.report.kinds.evaluate`, ...), each a :class:`Kind`, turn a
run's results into :class:`Section` objects; the Jinja2 template only lays them out. Every cell
is plain text (the template escapes it), so nothing a model wrote can become markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medshield.report.rundir import RunData


@dataclass
class Table:
    """A table of preformatted text cells; ``row_classes`` (e.g. ``"fail"``) style whole rows."""

    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""
    row_classes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """A plot as a ``data:image/png;base64,...`` URI."""

    src: str
    alt: str
    caption: str = ""


@dataclass
class SampleRow:
    """One red-teaming row in the sample browser (texts are escaped by the template)."""

    id: str
    kind: str
    attack: str
    modality: str
    category: str
    verdict: str
    prompt: str
    response: str
    verdicts: list[tuple[str, str]]
    thumbnail: str | None = None
    error: str = ""


@dataclass
class Browser:
    """The filterable sample browser: rows, the filter options, and the thumbnails (CSS class ->
    data URI, each image inlined once however many rows show it)."""

    rows: list[SampleRow]
    filters: dict[str, list[str]]
    thumbnails: dict[str, str]
    note: str = ""


@dataclass
class Link:
    """A link to another page, e.g. a stage's own report: ``href`` is a relative path (opened
    by the reader's browser; the page itself still loads nothing), ``note`` plain text."""

    href: str
    text: str
    note: str = ""


@dataclass
class Section:
    """One titled part of the report."""

    title: str
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    browser: Browser | None = None
    links: list[Link] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


@dataclass(frozen=True)
class Kind:
    """A renderer of part of a run's results; :data:`medshield.report.kinds.RENDERERS` lists
    those of each run kind.

    Attributes:
        name: shown in the report header.
        claims: ``results -> keys`` it renders (empty: not this kind).
        sections: ``run -> sections`` of the report.
    """

    name: str
    claims: Callable[[dict[str, Any]], list[str]]
    sections: Callable[[RunData], list[Section]]


def is_metric(value: Any) -> bool:
    """A metric dict as written by :meth:`medshield.eval.metrics.Metric.to_dict` (or alike)."""
    return isinstance(value, dict) and "value" in value and ("ci_low" in value or "n" in value)


def number(value: Any, digits: int = 3) -> str:
    """A number as text: floats to ``digits`` decimals, None and nan as ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def ci(value: Any) -> tuple[float, float, float] | None:
    """(value, low, high) of a metric dict for plotting (bounds default to the value)."""
    if not is_metric(value) or value["value"] is None:
        return None
    v = float(value["value"])
    if math.isnan(v):
        return None
    low, high = value.get("ci_low"), value.get("ci_high")
    return v, v if low is None else float(low), v if high is None else float(high)


def flags_table(
    flags: list[tuple[str, dict[str, Any]]], where: str, title: str, note: str
) -> Table:
    """The sanity flags, one row each: ``(where, flag)`` pairs, ``where`` naming the modality or
    attack group in the first column (headed ``where``); failed flags are styled ``fail``, and
    the title counts the passed ones (``"<title>: 3 of 4 passed"``)."""
    classes = ["pass" if flag.get("passed") else "fail" for _, flag in flags]
    return Table(
        columns=[where, "check", "result", "detail"],
        rows=[
            [
                place,
                str(flag.get("name")),
                "passed" if flag.get("passed") else "FAILED",
                str(flag.get("detail", "")),
            ]
            for place, flag in flags
        ],
        row_classes=classes,
        title=f"{title}: {classes.count('pass')} of {len(flags)} passed",
        note=note,
    )
