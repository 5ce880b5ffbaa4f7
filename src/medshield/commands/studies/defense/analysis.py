"""The defense study's numbers: one point per cell and the best strategy at each budget (the
claims, decided on paired differences, are in :mod:`medshield.commands.studies.defense.claims`)."""

from __future__ import annotations

import math
from typing import Any

from medshield.commands.studies.defense.config import (
    CELL_METRICS,
    METRICS,
    NEAR_MISS_METRIC,
)
from medshield.commands.studies.defense.grid import Cell
from medshield.eval.metrics import Metric

# --- aggregation ---------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def balanced_error(asr: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """(ASR + over-defense rate) / 2 with a MOVER interval (Zou & Donner 2008, "Construction of
    confidence limits about effect measures: a general approach", Stat Med 27:1693): the two
    rates come from independent rows, so the half-widths of their intervals add in quadrature
    on each side. Value None when either rate is missing."""
    parts = [asr, over]
    if not all(_finite(m.get("value")) for m in parts):
        return Metric(math.nan, math.nan, math.nan, 0, interval="mover").to_dict()
    value = (asr["value"] + over["value"]) / 2
    n = asr.get("n", 0) + over.get("n", 0)
    if not all(_finite(m.get("ci_low")) and _finite(m.get("ci_high")) for m in parts):
        return Metric(value, math.nan, math.nan, n, interval="mover").to_dict()
    below = math.sqrt(sum((m["value"] - m["ci_low"]) ** 2 for m in parts)) / 2
    above = math.sqrt(sum((m["ci_high"] - m["value"]) ** 2 for m in parts)) / 2
    low, high = max(0.0, value - below), min(1.0, value + above)
    return Metric(value, low, high, n, interval="mover").to_dict()


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {m: metrics[m] for m in CELL_METRICS[:-1]}
    if NEAR_MISS_METRIC in metrics:
        out[NEAR_MISS_METRIC] = metrics[NEAR_MISS_METRIC]
    out["balanced_error"] = balanced_error(
        metrics["attack_success_rate"], metrics["over_defense_rate"]
    )
    return out


def point(cell: Cell, results: dict[str, Any]) -> dict[str, Any]:
    """A cell's numbers from its redteam ``results.json``: the headline metrics overall and per
    modality, and ASR per attack."""
    r = results["redteam"]
    metrics = r["metrics"]
    return {
        "cell": cell.name,
        "group": cell.group,
        "defense": cell.defense,
        "strategy": cell.strategy,
        "k": cell.k,
        "n_items": r["n_items"],
        "n_rows": r["n_rows"],
        "n_errors": r["n_errors"],
        "overall": _headline(metrics["overall"]),
        "by_modality": {m: _headline(v) for m, v in metrics.get("by_modality", {}).items()},
        "by_attack": {
            a: v["attack_success_rate"]
            for a, v in metrics.get("by_attack", {}).items()
            if v["attack_success_rate"]["n"]
        },
    }


def aggregate(cells: list[tuple[Cell, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One point per (cell, its results), in the given order."""
    return [point(cell, results) for cell, results in cells]


def _value(metric: dict[str, Any] | None, missing: float) -> float:
    value = (metric or {}).get("value")
    return float(value) if _finite(value) else missing


def _overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return compare_lower(a, b) == "inconclusive"


def best_strategies(points: list[dict[str, Any]], strategies: list[str]) -> list[dict[str, Any]]:
    """The best strategy at each positive budget (see :data:`RULES`), with the strategies whose
    ASR interval overlaps the best one's (``not_separated``)."""
    order = {s: i for i, s in enumerate(strategies)}
    best = []
    for k in sorted({p["k"] for p in points if p["group"] == "strategy"}):
        here = [
            p
            for p in points
            if p["group"] == "strategy"
            and p["k"] == k
            and _finite(p["overall"]["attack_success_rate"]["value"])
        ]
        if not here:
            continue

        def rank(p: dict[str, Any]) -> tuple[float, float, float, int]:
            o = p["overall"]
            return (
                round(_value(o["attack_success_rate"], math.inf), 9),
                round(_value(o["over_defense_rate"], math.inf), 9),
                -round(_value(o["benign_accuracy"], -math.inf), 9),
                order.get(p["strategy"], len(order)),
            )

        winner = min(here, key=rank)
        asr = winner["overall"]["attack_success_rate"]
        best.append(
            {
                "k": k,
                "strategy": winner["strategy"],
                "cell": winner["cell"],
                **{m: winner["overall"][m] for m in METRICS},
                "not_separated": [
                    p["strategy"]
                    for p in here
                    if p is not winner and _overlaps(asr, p["overall"]["attack_success_rate"])
                ],
            }
        )
    return best


# --- interval comparison -------------------------------------------------------------------------


def compare_lower(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Whether metric ``a`` is lower than ``b``: ``true`` when a's 95% interval lies wholly
    below b's, ``false`` when wholly above, ``inconclusive`` when they overlap or a number is
    missing."""
    ends = [a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high")]
    if not all(_finite(x) for x in ends):
        return "inconclusive"
    if a["ci_high"] < b["ci_low"]:
        return "true"
    if a["ci_low"] > b["ci_high"]:
        return "false"
    return "inconclusive"
