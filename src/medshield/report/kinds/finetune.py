"""Fine-tuning reports: one ``medshield finetune`` run (its metrics, sanity flags, costs and
per-epoch history) and the comparison study (``medshield study finetune``: the table per
checkpoint, method and modality, and a clean-vs-robust scatter per checkpoint and budget, one
point per method)."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report import plots
from medshield.report.rundir import RunData
from medshield.report.view import (
    Figure,
    Kind,
    Section,
    Table,
    ci,
    flags_table,
    is_metric,
    number,
)

CLAIMED = ("table", "modalities", "methods", "checkpoints", "cells", "plots")
REPORT_KEYS = ("task_tables", "task_means", "targets", "ablation", "curves", "ran_terms")
"""The study's issue-20 report (:mod:`medshield.commands.studies.finetune_report`): targets and
ablation are tables here; the per-task tables, curves and RAN term log are its files."""
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
        return [k for k in (*CLAIMED, *REPORT_KEYS, "report_plots") if k in results]
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
                *(format_metric(r.get(k)) for k in metrics),
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
    tables = [_table(rows)]
    if r.get("targets"):
        tables.append(_targets(r["targets"]))
    if r.get("ablation"):
        tables.append(_ablation(r["ablation"]))
    if any(k in r for k in REPORT_KEYS):
        intro += (
            " The study directory also holds tables.md (per task, with chance and majority), "
            "targets.md, ablation.md, curves.md / curves.png and ran_terms.md / ran_terms.png."
        )
    return [Section("Fine-tuning study", intro=intro, tables=tables, figures=_scatters(rows))]


def _targets(targets: list[dict[str, Any]]) -> Table:
    rows, classes = [], []
    for t in targets:
        measured = format_metric(t) if "value" in t else "-"
        rows.append([str(t["target"]), t["checkpoint"], t["task"], t["claim"], measured])
        rows[-1] += [t["verdict"], t.get("note", "")]
        classes.append("fail" if t["verdict"] == "NOT REACHED" else "")
    return Table(
        ["target", "checkpoint", "task", "claim", "measured (95% CI)", "verdict", "note"],
        rows,
        title="Targets of issue 20 (a gap between two methods: paired CI)",
        row_classes=classes,
    )


def _ablation(rows: list[dict[str, Any]]) -> Table:
    measures = list(dict.fromkeys(k for r in rows for k in r if k.startswith("delta_")))
    return Table(
        ["checkpoint", "task", "ablated", *(m.replace("_", " ", 1) for m in measures)],
        [
            [r["checkpoint"], r["task"], r["ablated"], *(format_metric(r.get(m)) for m in measures)]
            for r in rows
        ],
        title="RAN with one term off minus full RAN (paired 95% CI)",
    )


KIND = Kind("fine-tuning study", _claims, _sections)


# --- one ``medshield finetune`` run ---------------------------------------------------------------


RUN_KEYS = ("method", "modality", "report", "metrics", "sanity", "finetuned_dir", "device")


def _is_run(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("metrics"), dict)
        and isinstance(value.get("report"), dict)
        and "method" in value
    )


def _run_claims(results: dict[str, Any]) -> list[str]:
    """``finetune`` in a ``medshield finetune`` run; the same keys at the top level in a
    study's cell."""
    if _is_run(results.get("finetune")):
        return ["finetune"]
    return [k for k in RUN_KEYS if k in results] if _is_run(results) else []


def _history(history: list[dict[str, Any]]) -> Table:
    parts = [k for k in dict.fromkeys(k for h in history for k in h) if k != "epoch"]
    return Table(
        columns=["epoch", *(p.replace("_", " ") for p in parts)],
        rows=[
            [number(h.get("epoch", 0) + 1), *(number(h.get(p), 4) for p in parts)] for h in history
        ],
        title=(
            "Training history (mean over the steps since the previous entry; val accuracy on "
            "held-out items)"
        ),
    )


def _run_sections(run: RunData) -> list[Section]:
    ft = run.results["finetune"] if _is_run(run.results.get("finetune")) else run.results
    report: dict[str, Any] = ft.get("report") or {}
    overhead = report.get("overhead") or {}
    items = f"{number(report.get('train_items'))} training items"
    if "val_items" in report:
        items += f" ({number(report['val_items'])} more held out for validation)"
    best = report.get("best_step")
    intro = (
        f"{ft.get('method', '-')} ({report.get('paper', '-')}) on {ft.get('modality', '-')}: "
        f"{items}, {number(report.get('trainable_params'))} trainable of "
        f"{number(report.get('total_params'))} parameters, "
        f"trained in {number(report.get('train_wall_s'), 1)} s"
        + ("" if best is None else f", weights after step {best} kept (best validation)")
        + f"; inference FLOPs x{number(overhead.get('flops_ratio'))}, latency "
        f"x{number(overhead.get('latency_ratio'))} of the base zero-shot classifier."
    )
    metrics = ft["metrics"]
    table = Table(
        columns=["metric", "value [95% CI]", "n"],
        rows=[
            [name, format_metric(value), number(value.get("n"))]
            for name, value in metrics.items()
            if is_metric(value)
        ],
        title="Clean and robust accuracy and the image-free references (bootstrap CI)",
    )
    tables = [table]
    if ft.get("sanity"):
        flags = [(str(flag.get("group", "-")), flag) for flag in ft["sanity"]]
        note = (
            "Checks that the robust numbers come from a working attack, and that the classifier "
            "uses the image (see docs/concepts.md)."
        )
        tables.append(flags_table(flags, "group", "Sanity flags", note))
    if report.get("history"):
        tables.append(_history(report["history"]))
    return [Section("Fine-tuning run", intro=intro, tables=tables)]


RUN_KIND = Kind("fine-tuning run", _run_claims, _run_sections)
