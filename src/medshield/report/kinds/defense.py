"""The defense study (``medshield study defense``, :mod:`medshield.commands.studies.defense`):
each headline metric against the demonstration budget, a line per selection strategy from the
undefended point, the baselines in the table, and the study's claims."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report import plots
from medshield.report.rundir import RunData
from medshield.report.view import Figure, Kind, Section, Table, is_metric

CLAIMED = ("cells", "budgets", "strategies", "baselines", "best_by_budget", "claims", "plots")


def _claims(results: dict[str, Any]) -> list[str]:
    cells = results.get("cells")
    if (
        "budgets" in results
        and isinstance(cells, list)
        and all(
            isinstance(c, dict) and "k" in c and isinstance(c.get("overall"), dict) for c in cells
        )
    ):
        return [k for k in CLAIMED if k in results]
    return []


def _curves(points: list[dict[str, Any]], names: list[str]) -> Figure | None:
    start = [p for p in points if p.get("group") == "undefended"]
    strategies = dict.fromkeys(p.get("strategy") for p in points if p.get("group") == "strategy")
    groups = {
        str(s): [
            *start,
            *(p for p in points if p.get("group") == "strategy" and p["strategy"] == s),
        ]
        for s in strategies
    }
    panels = plots.panels(groups, names, lambda p: float(p["k"]), lambda p, n: p["overall"].get(n))
    return plots.lines(
        panels,
        xlabel="demonstration budget k (0 = undefended)",
        title="Defense metrics vs demonstration budget (95% CI)",
        categorical=True,
    )


def _sections(run: RunData) -> list[Section]:
    r = run.results
    points: list[dict[str, Any]] = r["cells"]
    names = list(dict.fromkeys(n for p in points for n, m in p["overall"].items() if is_metric(m)))
    table = Table(
        columns=["cell", "defense", "strategy", "k", *(n.replace("_", " ") for n in names)],
        rows=[
            [
                str(p.get("cell", "-")),
                str(p.get("defense", "-")),
                str(p.get("strategy") or "-"),
                "-" if p["k"] is None else str(p["k"]),
                *(format_metric(p["overall"].get(n), 2) for n in names),
            ]
            for p in points
        ],
        title="Every cell, overall (95% CI)",
    )
    tables = [table]
    claims = r.get("claims") or {}
    if isinstance(claims, dict) and claims:
        tables.append(
            Table(
                ["claim", "verdict", "rule"],
                [
                    [
                        str(c.get("statement", key)),
                        str(c.get("verdict", "-")),
                        str(c.get("rule", "")),
                    ]
                    for key, c in claims.items()
                    if isinstance(c, dict)
                ],
                title="Claims, decided from the 95% intervals",
            )
        )
    curves = _curves(points, names)
    intro = (
        f"Model {r.get('model', '-')}, judge {r.get('primary_judge', '-')}; strategies "
        f"{', '.join(map(str, r.get('strategies') or [])) or '-'}; budgets "
        f"{', '.join(map(str, r.get('budgets') or []))}."
    )
    return [
        Section("Defense study", intro=intro, tables=tables, figures=[curves] if curves else [])
    ]


KIND = Kind("defense study", _claims, _sections)
