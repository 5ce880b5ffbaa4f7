"""The defense study's ``table.md`` and ``plots/*.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medshield.commands.studies.defense.analysis import _finite
from medshield.commands.studies.defense.claims import claims_summary
from medshield.commands.studies.defense.config import (
    CELL_METRICS,
    LABELS,
    METRICS,
    NEAR_MISS_METRIC,
    RULES,
)
from medshield.eval.metrics import format_metric


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _label(p: dict[str, Any]) -> list[str]:
    k = "-" if p["k"] is None else str(p["k"])
    return [p["cell"], p["defense"], p["strategy"] or "-", k]


def write_table(
    points: list[dict[str, Any]],
    best: list[dict[str, Any]],
    claims: dict[str, dict[str, Any]],
    path: Path,
) -> None:
    """``table.md``: the best strategy at each budget, the claims, the full table (overall),
    each headline metric per modality and ASR per attack; values are ``value [95% CI]``."""
    lines = ["# Defense study", "", "## Best strategy at each budget", ""]
    lines.append(f"Rule: {RULES['best_strategy']}.")
    lines.append("")
    lines += _md(
        ["k", "best strategy", *(LABELS[m] for m in METRICS), "not separated (ASR CIs overlap)"],
        [
            [str(b["k"]), b["strategy"], *(format_metric(b[m], 2) for m in METRICS)]
            + [", ".join(b["not_separated"]) or "-"]
            for b in best
        ],
    )
    lines += ["", "## Claims", "", f"Rules: {RULES['comparison']}; {RULES['combination']}."]
    lines += ["The numbers each verdict was decided on are in claims.md.", ""]
    lines += claims_summary(claims)
    lines += ["", "## All cells (overall)", ""]
    near_miss = any(NEAR_MISS_METRIC in p["overall"] for p in points)
    lines += _md(
        [
            "cell",
            "defense",
            "strategy",
            "k",
            *(LABELS[m] for m in CELL_METRICS),
            *(["over-defense, near-miss"] if near_miss else []),
            "harmful",
            "benign",
            "errors",
        ],
        [
            _label(p)
            + [format_metric(p["overall"][m], 2) for m in CELL_METRICS]
            + ([format_metric(p["overall"].get(NEAR_MISS_METRIC), 2)] if near_miss else [])
            + [str(p["n_items"]["harmful"]), str(p["n_items"]["benign"]), str(p["n_errors"])]
            for p in points
        ],
    )
    modalities = sorted({m for p in points for m in p["by_modality"]})
    for metric in METRICS[:3]:
        lines += ["", f"## {LABELS[metric]} per modality", ""]
        lines += _md(
            ["cell", "defense", "strategy", "k", *modalities],
            [
                _label(p)
                + [format_metric(p["by_modality"].get(m, {}).get(metric), 2) for m in modalities]
                for p in points
            ],
        )
    attacks = list(dict.fromkeys(a for p in points for a in p["by_attack"]))
    lines += ["", "## ASR per attack", ""]
    lines += _md(
        ["cell", "defense", "strategy", "k", *attacks],
        [_label(p) + [format_metric(p["by_attack"].get(a), 2) for a in attacks] for p in points],
    )
    path.write_text("\n".join(lines) + "\n")


def _bar(metric: dict[str, Any]) -> tuple[float, float]:
    """(below, above) error-bar lengths; 0 where the interval is missing."""
    if not (_finite(metric.get("ci_low")) and _finite(metric.get("ci_high"))):
        return 0.0, 0.0
    return metric["value"] - metric["ci_low"], metric["ci_high"] - metric["value"]


def plot(points: list[dict[str, Any]], baselines: list[str], directory: Path) -> list[Path]:
    """One PNG per headline metric, ``plots/<metric>.png``: the metric against the budget, a
    line per strategy (from the undefended point at k 0) with 95% error bars, and the baselines
    as horizontal lines with their interval shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, points, baselines, metric)
        written.append(directory / f"{metric}.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written


def _draw(ax: Any, points: list[dict[str, Any]], baselines: list[str], metric: str) -> None:
    undefended = next((p for p in points if p["group"] == "undefended"), None)
    budgets = sorted({0} | {p["k"] for p in points if p["group"] == "strategy"})
    position = {k: i for i, k in enumerate(budgets)}  # even spacing: 1, 2, 4, 8, 16
    strategies = list(dict.fromkeys(p["strategy"] for p in points if p["group"] == "strategy"))
    for i, strategy in enumerate(strategies):
        line = [undefended] if undefended is not None else []
        line += sorted(
            (p for p in points if p["group"] == "strategy" and p["strategy"] == strategy),
            key=lambda p: p["k"],
        )
        line = [p for p in line if _finite(p["overall"][metric]["value"])]
        bars = [_bar(p["overall"][metric]) for p in line]
        ax.errorbar(
            [position[p["k"]] + 0.04 * (i - len(strategies) / 2) for p in line],
            [p["overall"][metric]["value"] for p in line],
            yerr=[[b[0] for b in bars], [b[1] for b in bars]],
            marker="o",
            capsize=3,
            label=strategy,
            color=f"C{i}",
        )
    references = [p for p in points if p["group"] == "baseline"]
    if undefended is not None and "none" in baselines:
        references.insert(0, {**undefended, "defense": "none"})
    for j, ref in enumerate(references):
        m, color = ref["overall"][metric], f"C{len(strategies) + j}"
        if _finite(m["value"]):
            ax.axhline(m["value"], ls="--", lw=1, color=color, label=f"{ref['defense']} (baseline)")
        if _finite(m["ci_low"]) and _finite(m["ci_high"]):
            ax.axhspan(m["ci_low"], m["ci_high"], color=color, alpha=0.08)
    ax.set_xticks(range(len(budgets)), [str(k) for k in budgets])
    ax.set(xlabel="demonstration budget k (0 = undefended)", ylabel=LABELS[metric])
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{LABELS[metric]} vs budget (95% CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
