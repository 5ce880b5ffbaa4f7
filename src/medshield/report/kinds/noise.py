"""The noise-level study (``medshield study noise``): one point per (noise ratio, eps) with the
mean and 95% t-interval over seeds of each headline metric; curves of each metric against the
noise ratio, one line per eps starting from the clean model."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report import plots
from medshield.report.rundir import RunData
from medshield.report.view import Figure, Kind, Section, Table, is_metric, number

CLAIMED = ("points", "upstream_modalities", "evaluated_modalities", "surrogate", "pools")
SKIP = ("ratio", "eps", "seeds")


def _claims(results: dict[str, Any]) -> list[str]:
    points = results.get("points")
    if isinstance(points, list) and all(isinstance(p, dict) and "ratio" in p for p in points):
        return [k for k in CLAIMED if k in results]
    return []


def _columns(points: list[dict[str, Any]]) -> list[str]:
    names = dict.fromkeys(k for p in points for k in p if k not in SKIP)
    return [c for c in names if any(is_metric(p.get(c)) for p in points)]


def _eps(point: dict[str, Any]) -> str:
    return "-" if point.get("eps") is None else f"{point['eps']:g}"


def _curves(points: list[dict[str, Any]], columns: list[str]) -> Figure | None:
    eps_values = sorted({p["eps"] for p in points if p.get("eps") is not None})
    clean = [p for p in points if p.get("eps") is None]
    groups = {"clean": clean} if not eps_values else {}
    for eps in eps_values:
        groups[f"eps {eps:g}/255"] = [*clean, *(p for p in points if p.get("eps") == eps)]
    panels = plots.panels(groups, columns, lambda p: float(p["ratio"]), lambda p, c: p.get(c))
    return plots.lines(
        panels,
        xlabel="noise ratio",
        title="Downstream metrics vs share of adversarial upstream pairs (mean, 95% CI over seeds)",
        categorical=True,
    )


def _sections(run: RunData) -> list[Section]:
    r = run.results
    points: list[dict[str, Any]] = r["points"]
    columns = _columns(points)
    upstream = r.get("upstream_modalities") or []
    transfer = [m for m in r.get("evaluated_modalities") or [] if m not in upstream]
    intro = (
        f"Pretrained on {', '.join(upstream) or '-'}; held out (transfer): "
        f"{', '.join(transfer) or 'none'}. Each point is the mean over seeds with a 95% "
        "t-interval (no interval with one seed)."
    )
    table = Table(
        columns=["ratio", "eps", "seeds", *columns],
        rows=[
            [
                f"{p['ratio']:g}",
                _eps(p),
                number(p.get("seeds")),
                *(format_metric(p.get(c)) for c in columns),
            ]
            for p in points
        ],
        title="Headline metrics per noise ratio and eps (/255)",
    )
    curves = _curves(points, columns)
    return [
        Section(
            "Noise study",
            intro=intro,
            tables=[table],
            figures=[curves] if curves else [],
        )
    ]


KIND = Kind("noise study", _claims, _sections)
