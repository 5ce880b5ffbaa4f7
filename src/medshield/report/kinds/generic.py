"""Any ``results.json`` content no kind claims: a table of every number (and short value) in it,
so a report of an unknown run kind still shows what the run computed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report.view import Section, Table, is_metric, number

MAX_ROWS = 500
MAX_SCALAR_LIST = 20


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _named_interval(value: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``{"accuracy": v, "ci_low": l, "ci_high": h}`` as ``("accuracy", metric dict)``."""
    others = [k for k in value if k not in ("ci_low", "ci_high", "n")]
    if len(others) != 1 or "ci_low" not in value or "ci_high" not in value:
        return None
    name = others[0]
    if not isinstance(value[name], (int, float)):
        return None
    return name, {**value, "value": value[name]}


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted.path[i], text)`` of every leaf; metric dicts become ``value [low, high]``."""
    if is_metric(value):
        yield prefix, format_metric(value)
    elif isinstance(value, dict) and (named := _named_interval(value)):
        name, point = named
        yield f"{prefix}.{name}", format_metric(point)
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from flatten(child, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and all(map(_scalar, value)) and len(value) <= MAX_SCALAR_LIST:
        yield prefix, ", ".join(number(v) for v in value) or "(empty)"
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from flatten(child, f"{prefix}[{i}]")
    else:
        yield prefix, number(value)


def numbers_section(results: dict[str, Any], keys: list[str], title: str) -> Section | None:
    """A two-column table of the ``keys`` of ``results`` (None when there is nothing)."""
    rows = [[path, text] for key in keys for path, text in flatten(results[key], key)]
    if not rows:
        return None
    note = ""
    if len(rows) > MAX_ROWS:
        note = f"first {MAX_ROWS} of {len(rows)} values; the rest is in results.json"
        rows = rows[:MAX_ROWS]
    return Section(title, tables=[Table(["key", "value"], rows, note=note)])
