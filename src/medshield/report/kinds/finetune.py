"""The fine-tuning comparison (``medshield study finetune``): the table per checkpoint, method
and modality, and a clean-vs-robust scatter per checkpoint and budget (one point per method)."""

from __future__ import annotations

from typing import Any

from medshield.report import plots
from medshield.report.kinds import Kind
from medshield.report.rundir import RunData
from medshield.report.view import Figure, Section, Table, ci, is_metric, metric, number

CLAIMED = ("table", "modalities", "methods", "checkpoints", "cells", "plots")
COSTS = {
    "trainable_params": "trainable params",
    "train_wall_s": "train s",
    "flops_ratio": "FLOPs ratio",
    "latency_ratio": "latency ratio",
}


def _claims(results: dict[str, Any]) -> list[str]:
    table = results.get("table")
    if (
        isinstance(table, list)
        and table
        and all(isinstance(r, dict) and "method" in r and "clean_accuracy" in r for r in table)
    ):
        return [k for k in CLAIMED if k in results]
    return []


def _table(rows: list[dict[str, Any]]) -> Table:
    metrics = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if any(is_metric(r.get(k)) for r in rows)
    ]
    costs = [k for k in COSTS if any(k in r for r in rows)]
    out, classes = [], []
    for r in rows:
        failed = r.get("sanity_failed") or []
        out.append(
            [
                str(r.get("checkpoint", "-")),
                str(r["method"]),
                str(r.get("modality", "-")),
                number(r.get("seeds")),
                *(metric(r.get(k)) for k in metrics),
                *(number(r.get(k), 3) for k in costs),
                ", ".join(failed) or "ok",
            ]
        )
        classes.append("fail" if failed else "")
    return Table(
        columns=[
            "checkpoint",
            "method",
            "modality",
            "seeds",
            *(k.replace("robust/", "robust ") for k in metrics),
            *(COSTS[k] for k in costs),
            "sanity",
        ],
        rows=out,
        row_classes=classes,
        title="Clean and robust accuracy (95% bootstrap CI, pooled over seeds) and costs",
    )


def _scatters(rows: list[dict[str, Any]]) -> list[Figure]:
    figures = []
    for checkpoint in dict.fromkeys(r.get("checkpoint", "-") for r in rows):
        mine = [r for r in rows if r.get("checkpoint", "-") == checkpoint]
        worst = sorted({k for r in mine for k in r if k.startswith("robust/worst@")})
        for key in worst:
            points = []
            for r in mine:
                clean, robust = ci(r.get("clean_accuracy")), ci(r.get(key))
                if clean and robust:
                    points.append((str(r["method"]), str(r.get("modality", "-")), clean, robust))
            if points:
                eps = key.split("@", 1)[1]
                figures.append(
                    plots.scatter(
                        points,
                        "clean accuracy",
                        f"robust accuracy, worst of attacks, eps {eps}/255",
                        f"{checkpoint}: robust vs clean per method (95% CI)",
                    )
                )
    return figures


def _sections(run: RunData) -> list[Section]:
    r = run.results
    rows: list[dict[str, Any]] = r["table"]
    intro = (
        f"{number(r.get('cells'))} cells: methods {', '.join(r.get('methods') or []) or '-'}; "
        f"modalities {', '.join(r.get('modalities') or []) or '-'}; "
        f"checkpoints {', '.join(r.get('checkpoints') or []) or '-'}."
    )
    return [
        Section("Fine-tuning study", intro=intro, tables=[_table(rows)], figures=_scatters(rows))
    ]


KIND = Kind("fine-tuning study", _claims, _sections)
