"""The robust fine-tuning study's files: the table aggregated over seeds (:func:`aggregate`),
``table.csv`` / ``table.md``, the robust-vs-clean and retrieval scatters, and the markdown and
plots of the issue-20 report (:mod:`medshield.commands.studies.finetune_report` computes what
they show)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from medshield.commands.finetune import recall_indicators, share_bootstrap_ci
from medshield.commands.finetune.config import RobustEvalConfig
from medshield.eval.metrics import format_metric, majority_hits
from medshield.eval.robust import worst_case
from medshield.report import plots
from medshield.report.view import ci


def aggregate(cells: list[dict[str, Any]], ev: RobustEvalConfig) -> list[dict[str, Any]]:
    """One table row per (checkpoint, method, modality): metrics pooled over seeds' items."""
    keys = list(dict.fromkeys((c["checkpoint"], c["method"], c["modality"]) for c in cells))
    table = []
    for key in keys:
        group = [c for c in cells if (c["checkpoint"], c["method"], c["modality"]) == key]
        rows = [r for c in group for r in c["rows"]]
        entry: dict[str, Any] = {
            "checkpoint": key[0],
            "method": key[1],
            "modality": key[2],
            "seeds": len(group),
        }
        entry["clean_accuracy"] = share_bootstrap_ci(
            [r["correct"] for r in rows if r.get("group") == "clean"], ev.bootstrap_resamples
        )
        majority = [
            hit
            for c in group
            for hit in majority_hits([r for r in c["rows"] if r.get("group") == "clean"])
        ]
        if majority:
            entry["majority_accuracy"] = share_bootstrap_ci(majority, ev.bootstrap_resamples)
        shuffled = [r["correct"] for r in rows if r.get("group") == "shuffled"]
        if shuffled:  # cells run before the control existed have none
            entry["shuffled_image_accuracy"] = share_bootstrap_ci(shuffled, ev.bootstrap_resamples)
        attack_groups = sorted({(r["attack"], r["eps"]) for r in rows if "attack" in r})
        for attack, eps in attack_groups:
            hits = [v for c in group for v in worst_case(c["rows"], eps, attack)]
            entry[f"robust/{attack}@{eps:g}"] = share_bootstrap_ci(hits, ev.bootstrap_resamples)
        for eps in ev.eps:
            worst = [v for c in group for v in worst_case(c["rows"], eps)]
            if worst:
                entry[f"robust/worst@{eps:g}"] = share_bootstrap_ci(worst, ev.bootstrap_resamples)
        for name, hits in recall_indicators(rows).items():
            entry[name] = share_bootstrap_ci(hits, ev.bootstrap_resamples)
        reports = [c["result"]["report"] for c in group]
        entry["trainable_params"] = int(np.mean([r["trainable_params"] for r in reports]))
        entry["train_wall_s"] = float(np.mean([r["train_wall_s"] for r in reports]))
        entry["flops_ratio"] = float(np.mean([r["overhead"]["flops_ratio"] for r in reports]))
        entry["latency_ratio"] = float(np.mean([r["overhead"]["latency_ratio"] for r in reports]))
        failed = sorted(
            {
                f"{f['name']}({f['group']})"
                for c in group
                for f in c["result"].get("sanity", [])
                if not f["passed"]
            }
        )
        entry["sanity_failed"] = failed
        table.append(entry)
    return table


def write_table(table: list[dict[str, Any]], directory: Path) -> None:
    """``table.csv`` (values and CI ends in columns) and ``table.md`` (value [CI])."""
    columns = list(dict.fromkeys(k for row in table for k in row))
    with (directory / "table.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        header = []
        for c in columns:
            if any(isinstance(row.get(c), dict) for row in table):
                header += [c, f"{c} ci_low", f"{c} ci_high"]
            else:
                header.append(c)
        writer.writerow(header)
        for row in table:
            out = []
            for c in columns:
                v = row.get(c)
                if any(isinstance(r.get(c), dict) for r in table):
                    out += [v["value"], v["ci_low"], v["ci_high"]] if v else ["", "", ""]
                else:
                    out.append(";".join(v) if isinstance(v, list) else v)
            writer.writerow(out)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append(f"{v:.3g}")
            elif isinstance(v, list):
                cells.append(", ".join(v) or "ok")
            else:
                cells.append(format_metric(v) if isinstance(v, dict) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (directory / "table.md").write_text("\n".join(lines) + "\n")


def _scatter(
    rows: list[dict[str, Any]], x: str, y: str, labels: tuple[str, str], title: str, path: Path
) -> Path:
    """One point per table row at metrics ``x``, ``y`` with 95% CI bars: a colour per method,
    a marker per task (:func:`medshield.report.plots.scatter_figure`)."""
    points = [
        (str(r["method"]), str(r["modality"]), xy[0], xy[1])
        for r in rows
        if None not in (xy := (ci(r[x]), ci(r[y])))
    ]
    return plots.to_file(plots.scatter_figure(points, *labels, title), path)


def plot_robust_vs_clean(
    table: list[dict[str, Any]], eps_list: list[float], directory: Path
) -> list[Path]:
    """One scatter per checkpoint and budget: worst-case robust vs clean accuracy per method
    (each task a separate marker), with 95% CI bars."""
    paths = []
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in table):
        for eps in eps_list:
            key = f"robust/worst@{eps:g}"
            rows = [r for r in table if r["checkpoint"] == checkpoint and key in r]
            if rows:
                paths.append(
                    _scatter(
                        rows,
                        "clean_accuracy",
                        key,
                        ("clean accuracy", f"robust accuracy, worst of attacks, eps {eps:g}/255"),
                        f"{checkpoint}: robust vs clean (95% CI)",
                        directory / f"robust_vs_clean_{checkpoint}_eps{eps:g}.png",
                    )
                )
    return paths


def plot_retrieval(table: list[dict[str, Any]], directory: Path) -> list[Path]:
    """One scatter per checkpoint and direction (i2t, t2i): R@1 under the multimodal attack vs
    clean R@1 per method and modality, with 95% CI bars."""
    paths = []
    for checkpoint in dict.fromkeys(r["checkpoint"] for r in table):
        for direction in ("i2t", "t2i"):
            clean, adv = f"retrieval_{direction}/R@1", f"retrieval_{direction}_adv/R@1"
            rows = [r for r in table if r["checkpoint"] == checkpoint and clean in r and adv in r]
            if rows:
                paths.append(
                    _scatter(
                        rows,
                        clean,
                        adv,
                        (f"{direction} R@1, clean", f"{direction} R@1, multimodal attack"),
                        f"{checkpoint}: retrieval under attack (95% CI)",
                        directory / f"retrieval_{direction}_{checkpoint}.png",
                    )
                )
    return paths


def _cell(v: Any) -> str:
    """One markdown table cell: a metric as value [CI], a float to 3 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "-"
    return format_metric(v) if isinstance(v, dict) else str(v)


def _md(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _options(picks: list[dict[str, Any]]) -> str:
    """The ``kwargs_grid`` alternatives a method's selection picked (``{}``: its options as
    configured), ``-`` for a method without that grid."""
    texts = [
        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items())
        or "as configured"
        for o in picks
    ]
    return "; ".join(texts) or "-"


def tables_md(tables: list[dict[str, Any]], means: list[dict[str, Any]], eps: list[float]) -> str:
    """``tables.md``: one table per checkpoint and task, then the means over tasks with the
    same number of classes."""
    worst = [f"worst@{e:g}" for e in eps]
    columns = ["clean", *worst, "shuffled_image", "chance", "majority", "trainable_params"]
    columns += ["image_forward", "image_backward", "train_wall_s", "flops_ratio", "lr"]
    out = ["# Per-task results", ""]
    out += [
        "Accuracy with 95% bootstrap CIs pooled over seeds; `worst@e`: robust under every attack "
        "at e/255; `chance` = 1 / classes; `lr` marked * was picked by the run's lr selection "
        "(another method's, where named: a RAN ablation at `ran`'s pick; `top of grid` / "
        "`bottom of grid`: the largest or smallest rate of its grid, where a rate beyond it "
        "may score better); `options`, where a method had a `kwargs_grid`: the alternative its "
        "selection picked.",
        "",
    ]
    for t in tables:
        out.append(f"## {t['checkpoint']}: {t['task']} ({t['classes']} classes)")
        out.append("")
        if not t["in_means"]:
            out += [
                "Reference task: read against its majority and shuffled-image references; it "
                "is in no mean over tasks.",
                "",
            ]
        picked = any(r.get("options_picked") for r in t["rows"])
        rows = []
        for r in t["rows"]:
            lr = _cell(r["lr"]) + ("*" if r["lr_selected"] else "")
            lr += "".join(f" ({m}'s)" for m in r.get("lr_from", []))
            lr += "".join(f" ({e} of grid)" for e in r.get("lr_at_edge", []))
            row = [r["method"], *(r[c] for c in columns[:-1]), lr]
            rows.append(row + [_options(r.get("options_picked", []))] if picked else row)
        out += _md(["method", *columns, *(["options"] if picked else [])], rows) + [""]
    if means:
        out += ["## Means over tasks with the same number of classes (VQA-RAD closed excluded)"]
        out.append("")
        rows = [
            [m["checkpoint"], m["classes"], ", ".join(m["tasks"]), m["method"]]
            + [m.get(c) for c in ["clean", *worst]]
            for m in means
        ]
        out += _md(["checkpoint", "classes", "tasks", "method", "clean", *worst], rows) + [""]
    return "\n".join(out)


def targets_md(targets: list[dict[str, Any]]) -> str:
    """``targets.md``: one row per target, checkpoint and task."""
    rows = [
        [
            t["target"],
            t["checkpoint"],
            t["task"],
            t["claim"],
            _measured(t),
            t["verdict"],
            t.get("note", "") + _reference(t.get("reference")),
        ]
        for t in targets
    ]
    header = ["target", "checkpoint", "task", "claim", "measured [95% CI]", "verdict", "note"]
    intro = [
        "# Targets (issue 20)",
        "",
        "A bar on one method uses its bootstrap CI; a bar on a gap between two methods the "
        "paired CI over the (seed, test image) pairs both were scored on, and the note gives "
        "the gap of each seed alone: the CI holds the test images' variance, the seeds are "
        "the only look at training's.",
        "",
    ]
    return "\n".join(intro + _md(header, rows)) + "\n"


def _reference(ref: dict[str, Any] | None) -> str:
    if not ref:
        return ""
    found = [f"{k} {format_metric(v)}" for k, v in ref.items() if isinstance(v, dict)]
    return f" (reference {ref['method']}: {', '.join(found) or 'no cells'})"


def _measured(t: dict[str, Any]) -> str:
    if "value" in t:
        return format_metric(t)
    if "trainable_params" in t:
        found = [f"{m} {n}" for m, n in t["trainable_params"].items() if n is not None]
        return ", ".join(found) or "-"
    if "terms_measured" in t:
        return f"{t['terms_measured']} ablations"
    return "-"


def ablation_md(rows: list[dict[str, Any]], eps: list[float]) -> str:
    """``ablation.md``: ablated minus full RAN, clean and worst case, with paired CIs."""
    measures = ["clean", *(f"worst@{e:g}" for e in eps)]
    header = ["checkpoint", "task", "ablated", *(f"delta {m}" for m in measures)]
    body = [
        [r["checkpoint"], r["task"], r["ablated"], *(r.get(f"delta_{m}") for m in measures)]
        for r in rows
    ]
    intro = [
        "# RAN ablation",
        "",
        "Accuracy of RAN with one loss term switched off minus full RAN's, on the same test "
        "images and seeds (paired 95% bootstrap CI); a negative delta means the term helps.",
        "",
    ]
    return "\n".join(intro + _md(header, body)) + "\n"


def curves_md(curves: list[dict[str, Any]]) -> str:
    """``curves.md``: each training curve's first and last loss and its tail change, and where
    logged, the last robust validation accuracy and its tail gain."""
    header = ["checkpoint", "task", "method", "points", "first loss", "last loss"]
    header += ["tail change", "flat"]
    robust = any("val_robust" in c for c in curves)
    if robust:
        header += ["last val robust", "val robust gain", "stopped rising"]
    body = []
    for c in curves:
        row = [c["checkpoint"], c["task"], c["method"], f"{len(c['loss'])} {c['x']}s"]
        row += [c["loss"][0], c["loss"][-1], c["tail_change"], c["flat"]]
        if robust:
            last = c["val_robust"][-1] if "val_robust" in c else None
            row += [last, c.get("val_robust_gain"), c.get("val_robust_stopped")]
        body.append(row)
    intro = [
        "# Training curves",
        "",
        "Seed-mean training loss; `tail change`: relative change of the mean loss over the last "
        "quarter of the logged points from the quarter before; `flat`: within 5%.",
    ]
    if robust:
        intro += [
            "Seed-mean robust accuracy on the held-out items under the method's training "
            "adversary (`finetune.val_robust`); `val robust gain`: the mean of its last quarter "
            "minus the quarter before; `stopped rising`: a gain of at most 1 point.",
        ]
    return "\n".join([*intro, "", *_md(header, body)]) + "\n"


def ran_terms_md(terms: dict[str, Any]) -> str:
    """``ran_terms.md``: the per-term loss log of one RAN run."""
    names = list(terms["terms"])
    inert = "one point only" if terms["inert"] is None else ", ".join(terms["inert"]) or "none"
    body = [
        [x, terms["loss"][i], *(terms["terms"][t][i] for t in names)]
        for i, x in enumerate(terms["steps"])
    ]
    intro = [
        f"# RAN per-term loss log: {terms['cell']}",
        "",
        f"Inert (never moved): {inert}; not logged (weight 0): "
        f"{', '.join(terms['not_logged']) or 'none'}.",
        "",
    ]
    return "\n".join(intro + _md([terms["x"], "loss", *names], body)) + "\n"


def plot_curves(curves: list[dict[str, Any]], path: Path) -> Path | None:
    """``curves.png``: one panel per checkpoint and task, the training loss of each method, and
    where logged, a panel below with its robust validation accuracy."""
    panels = [
        (checkpoint, task, series)
        for checkpoint, task in dict.fromkeys((c["checkpoint"], c["task"]) for c in curves)
        for series in ("loss", "val_robust")
        if any(c.get(series) for c in curves if (c["checkpoint"], c["task"]) == (checkpoint, task))
    ]
    if not panels:
        return None
    plt = plots.pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    label = {"loss": "training loss", "val_robust": "val. robust accuracy"}
    for ax, (checkpoint, task, series) in zip(axes.flat, panels, strict=False):
        shown = [c for c in curves if (c["checkpoint"], c["task"]) == (checkpoint, task)]
        for c in shown:
            if c.get(series):
                ax.plot(c["steps"], c[series], marker=".", label=c["method"])
        ax.set_title(f"{checkpoint}: {task}", fontsize=9)
        ax.set_xlabel(" / ".join(dict.fromkeys(c["x"] for c in shown)), fontsize=8)
        ax.set_ylabel(f"{label[series]} (seed mean)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return plots.to_file(fig, path)


def plot_ran_terms(terms: dict[str, Any], path: Path) -> Path:
    """``ran_terms.png``: one panel per logged RAN term (and the total loss)."""
    series = {"loss (total)": terms["loss"], **terms["terms"]}
    plt = plots.pyplot()
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, series.items(), strict=False):
        ax.plot(terms["steps"], values, marker=".")
        inert = " (inert)" if name in (terms["inert"] or []) else ""
        ax.set_title(name + inert, fontsize=9)
        ax.set_xlabel(terms["x"], fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.set_visible(False)
    fig.suptitle(terms["cell"], fontsize=9)
    fig.tight_layout()
    return plots.to_file(fig, path)
