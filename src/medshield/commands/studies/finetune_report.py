"""The robust fine-tuning study's report (issue 20), from its cells' per-image rows and reports.

Written to the study directory by :func:`write_report` (and returned for ``results.json``):

- ``tables.md``: one table per checkpoint and task: per method clean accuracy, the per-image
  worst case over the attacks at each budget, the shuffled-image control, the task's chance
  (1 / classes) and majority references, trainable parameters, training compute (image
  forward / backward passes and wall time), FLOPs ratio and the learning rate used (the pick of
  the run's lr selection where it made one). Tasks are never averaged into one headline: the
  only means are over tasks with the same number of classes, and ``vqa_rad_closed`` (read
  against its majority and shuffled-image references) stays out of them.
- ``targets.md`` / ``targets.json``: each target of issue 20 with its measured value, 95% CI
  and verdict (:func:`verdict`): a bar on one method uses that method's CI, a bar on the gap
  between two methods the paired CI of the gap (:func:`medshield.eval.metrics.
  paired_difference_ci` over the (seed, test image) pairs both methods were scored on) and the
  gap of each seed alone, with how many seeds clear the bar: the CI holds the test images'
  variance, the seeds are the only look at training's.
- ``ablation.md``: every ``ran-no_<term>`` against ``ran`` (same checkpoint and task), the
  effect of switching the term off on clean and worst-case accuracy, with its paired CI.
- ``curves.png`` / ``curves.md``: training loss against step (epoch where the runs logged no
  steps) per method, the seed mean, and how much it still moved over the last quarter; with
  ``finetune.val_robust``, robust accuracy on the held-out items likewise, and whether it
  stopped rising.
- ``ran_terms.png`` / ``ran_terms.md``: the per-term loss log of one ``ran`` run and the terms
  that never moved (inert).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medshield.commands.finetune import share_bootstrap_ci
from medshield.commands.studies import finetune_outputs
from medshield.eval.metrics import paired_difference_ci
from medshield.eval.robust import per_image
from medshield.train.finetune.data import VQA_TASK, task_prompts
from medshield.train.finetune.ran import RAN_LOG_TERMS, RAN_PARTS, RAN_TERMS
from medshield.train.finetune.select import pick_at_edge

CHEST, BLOOD = "chest_xray", "blood_cell"
FLAT_TOLERANCE = 0.05
"""A curve has flattened when its mean over the last quarter of the logged points moved at
most this share from the quarter before."""
VAL_ROBUST_GAIN = 0.01
"""Robust accuracy on the held-out items (``finetune.val_robust``) has stopped rising when its
mean over the last quarter of the logged points is at most this much (1 point) above the
quarter before; a fall counts as stopped too (robust overfitting)."""
_NOT = "NOT MEASURED"

Cell = dict[str, Any]
Key = tuple[int, Any]  # (seed, test image)


def chance(task: str) -> float:
    """1 / the task's number of classes."""
    return 1 / len(task_prompts(task))


def hits(cells: Iterable[Cell], measure: str) -> dict[Key, bool]:
    """(seed, test image) -> hit, over one method's cells of one task: ``clean`` or
    ``worst@<eps>`` (robust under every attack at that budget)."""
    out: dict[Key, bool] = {}
    for c in cells:
        if measure == "clean":
            rows = {r["index"]: bool(r["correct"]) for r in c["rows"] if r.get("group") == "clean"}
        else:
            eps = float(measure.removeprefix("worst@"))
            rows = {r["index"]: bool(r["robust_correct"]) for r in per_image(c["rows"], eps)}
        out.update({(c["seed"], i): hit for i, hit in rows.items()})
    return out


def _group(cells: list[Cell]) -> dict[tuple[str, str, str], list[Cell]]:
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c["checkpoint"], c["method"], c["modality"]), []).append(c)
    return groups


def single(cells: list[Cell], measure: str, resamples: int) -> dict[str, Any] | None:
    """One method's share of hits with its 95% bootstrap CI (None without any row)."""
    found = hits(cells, measure)
    if not found:
        return None
    return {**share_bootstrap_ci(list(found.values()), resamples), "seeds": len(cells)}


def paired(a: list[Cell], b: list[Cell], measure: str, resamples: int) -> dict[str, Any] | None:
    """Method ``a`` minus method ``b`` on the (seed, image) pairs both were scored on, with the
    paired 95% bootstrap CI and the gap of each seed alone (``per_seed``: seed, as a string, ->
    gap), since the CI holds the images' variance but not training's (None when they share no
    pair)."""
    ha, hb = hits(a, measure), hits(b, measure)
    keys = sorted(set(ha) & set(hb), key=str)
    if not keys:
        return None
    diff = paired_difference_ci([ha[k] for k in keys], [hb[k] for k in keys], resamples)
    seeds = sorted({k[0] for k in keys})
    per_seed = {  # string keys, as results.json holds them
        str(seed): float(np.mean([int(ha[k]) - int(hb[k]) for k in keys if k[0] == seed]))
        for seed in seeds
    }
    return {**diff.to_dict(), "seeds": len(seeds), "per_seed": per_seed}


def verdict(metric: dict[str, Any] | None, bar: float, missing: str = "") -> dict[str, Any]:
    """REACHED when the point estimate is at least ``bar``, NOT REACHED when below, NOT
    MEASURED without a measurement (``missing`` says what is absent); ``note`` says whether the
    whole CI clears the bar too, lies below it, or straddles it."""
    if metric is None:
        return {"verdict": _NOT, "note": missing}
    value, low, high = metric["value"], metric["ci_low"], metric["ci_high"]
    bar -= 1e-9  # a gap of exactly 3 points clears "+ 0.03" despite float rounding
    point = value >= bar
    if low is None or high is None:
        where = "no CI"
    elif low >= bar:
        where = "the whole CI clears the bar"
    elif high < bar:
        where = "the whole CI lies below the bar"
    else:
        where = "the CI straddles the bar"
    side = "clears" if point else "is below"
    note = f"the point estimate {side} the bar; {where}"
    per_seed = metric.get("per_seed")
    if per_seed and len(per_seed) > 1:
        gaps = ", ".join(f"{gap:+.3f}" for gap in per_seed.values())
        clearing = sum(gap >= bar for gap in per_seed.values())
        note += f"; per seed {gaps}: {clearing} of {len(per_seed)} clear it"
    return {
        **metric,
        "verdict": "REACHED" if point else "NOT REACHED",
        "point_clears": point,
        "ci_clears": low is not None and low >= bar,
        "note": note,
    }


def targets(cells: list[Cell], checkpoints: list[str], resamples: int) -> list[dict[str, Any]]:
    """Issue 20's targets per checkpoint, measured whichever way they fall."""
    groups = _group(cells)
    out: list[dict[str, Any]] = []

    def get(ck: str, method: str, task: str) -> list[Cell]:
        return groups.get((ck, method, task), [])

    def absent(ck: str, task: str, *methods: str) -> str:
        gone = [m for m in methods if not get(ck, m, task)]
        return f"no cells of {', '.join(gone)} on {task} ({ck})" if gone else ""

    def no_rows(measure: str) -> str:
        return f"no {measure} rows (the budget is not in robust.eps)"

    for ck in checkpoints:
        probe = get(ck, "linear-probe", CHEST)
        reference = {
            "method": "linear-probe",
            **{m: single(probe, m, resamples) for m in ("clean", "worst@1")},
        }
        for method in ("tecoa", "adv-lora", "ran"):
            found = single(get(ck, method, CHEST), "worst@1", resamples)
            gap = absent(ck, CHEST, method) or no_rows("worst@1")
            out.append(
                {
                    "target": 1,
                    "claim": f"{method} worst-case robust accuracy @1/255 >= 0.40",
                    "checkpoint": ck,
                    "task": CHEST,
                    "bar": 0.40,
                    "reference": reference,
                    **verdict(found, 0.40, gap),
                }
            )
        for task in (CHEST, BLOOD):
            ran = get(ck, "ran", task)
            comparisons = [
                ("adv-lora", "worst@2", 0.03, "RAN robust @2/255 >= adv-lora + 0.03"),
                ("adv-adapter", "worst@2", 0.03, "RAN robust @2/255 >= adv-adapter + 0.03"),
                ("lora", "clean", -0.01, "RAN clean >= clean LoRA - 0.01"),
            ]
            for other, measure, bar, claim in comparisons:
                diff = paired(ran, get(ck, other, task), measure, resamples)
                gap = absent(ck, task, "ran", other) or no_rows(measure)
                out.append(
                    {
                        "target": 2,
                        "claim": claim,
                        "checkpoint": ck,
                        "task": task,
                        "bar": bar,
                        "paired": True,
                        **verdict(diff, bar, gap),
                    }
                )
            params = {m: _params(get(ck, m, task)) for m in ("ran", "adv-lora")}
            entry: dict[str, Any] = {
                "target": 2,
                "claim": "RAN trainable parameters <= adv-lora's",
                "checkpoint": ck,
                "task": task,
                "trainable_params": params,
            }
            if None in params.values():
                entry.update(verdict=_NOT, note=absent(ck, task, "ran", "adv-lora"))
            else:
                fits = params["ran"] <= params["adv-lora"]
                entry.update(verdict="REACHED" if fits else "NOT REACHED", note="exact count")
            out.append(entry)
            # ablated term by term (RAN_TERMS) or by part (RAN_PARTS): either set counts; with
            # neither, the parts are what is missing
            names = RAN_TERMS if any(get(ck, f"ran-no_{t}", task) for t in RAN_TERMS) else RAN_PARTS
            missing = [f"ran-no_{n}" for n in names if not get(ck, f"ran-no_{n}", task)]
            missing = (["ran"] if not ran else []) + missing
            out.append(
                {
                    "target": 3,
                    "claim": "each RAN part switched off in turn, its effect with a paired CI",
                    "checkpoint": ck,
                    "task": task,
                    "terms_measured": 0 if not ran else len(names) - len(missing),
                    "verdict": _NOT if missing else "REACHED",
                    "note": f"missing: {', '.join(missing)}"
                    if missing
                    else "every term's effect is in ablation.md",
                }
            )
    return out


def _params(cells: list[Cell]) -> int | None:
    if not cells:
        return None
    return int(np.mean([c["result"]["report"]["trainable_params"] for c in cells]))


def ablation(cells: list[Cell], eps: list[float], resamples: int) -> list[dict[str, Any]]:
    """Each ``<ran>-no_<term>`` against its ``<ran>`` (same checkpoint and task): the
    ablated minus the full accuracy, clean and worst case per budget, with paired CIs."""
    groups = _group(cells)
    out = []
    for (ck, method, task), group in groups.items():
        base, sep, term = method.rpartition("-no_")
        known = term in RAN_TERMS or term in RAN_PARTS
        if not sep or not known or (ck, base, task) not in groups:
            continue
        row: dict[str, Any] = {"checkpoint": ck, "task": task, "ran": base, "ablated": method}
        row["term"] = term
        for measure in ["clean", *(f"worst@{e:g}" for e in eps)]:
            diff = paired(group, groups[(ck, base, task)], measure, resamples)
            if diff is not None:
                row[f"delta_{measure}"] = diff
        out.append(row)
    return out


def task_tables(
    table: list[dict[str, Any]], cells: list[Cell], eps: list[float]
) -> list[dict[str, Any]]:
    """One table per (checkpoint, task) from the study's aggregated rows (see
    :func:`medshield.commands.studies.finetune_outputs.aggregate`), with the task's chance and
    majority references and each method's training compute and learning rate."""
    groups = _group(cells)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in table:
        ck, method, task = entry["checkpoint"], entry["method"], entry["modality"]
        reports = [c["result"]["report"] for c in groups[(ck, method, task)]]
        computes = [r["compute"] for r in reports if "compute" in r]
        selections = [r["lr_selection"] for r in reports if "lr_selection" in r]
        picks = [selection["pick"] for selection in selections]
        lrs = picks or [c["lr"] for c in groups[(ck, method, task)] if "lr" in c]
        options = [selection.get("kwargs_pick") for selection in selections]
        options = [o for i, o in enumerate(options) if o is not None and o not in options[:i]]
        sources = {selection.get("from_method") for selection in selections}
        row = {
            "method": method,
            "clean": entry["clean_accuracy"],
            **{f"worst@{e:g}": entry.get(f"robust/worst@{e:g}") for e in eps},
            "shuffled_image": entry.get("shuffled_image_accuracy"),
            "chance": chance(task),
            "majority": entry.get("majority_accuracy"),
            "trainable_params": entry["trainable_params"],
            "image_forward": _mean(c["image_forward"] for c in computes),
            "image_backward": _mean(c["image_backward"] for c in computes),
            "train_wall_s": entry["train_wall_s"],
            "flops_ratio": entry["flops_ratio"],
            "lr": sorted(set(lrs)),
            "lr_selected": bool(picks),
            "lr_at_edge": sorted({e for r in selections if (e := pick_at_edge(r)) is not None}),
            "lr_from": sorted(m for m in sources if m is not None),
            "options_picked": options,
        }
        section = out.setdefault(
            (ck, task),
            {
                "checkpoint": ck,
                "task": task,
                "classes": len(task_prompts(task)),
                "chance": chance(task),
                "in_means": task != VQA_TASK,
                "rows": [],
            },
        )
        section["rows"].append(row)
    return list(out.values())


def _mean(values: Iterable[float]) -> float | None:
    found = list(values)
    return float(np.mean(found)) if found else None


def task_means(tables: list[dict[str, Any]], eps: list[float]) -> list[dict[str, Any]]:
    """Per checkpoint and number of classes, each method's mean clean and worst-case accuracy
    over the tasks with that many classes, where at least two tasks share it and the method
    has them all; ``vqa_rad_closed`` is never in a mean."""
    out = []
    measures = ["clean", *(f"worst@{e:g}" for e in eps)]
    by_classes: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in tables:
        if t["in_means"]:
            by_classes.setdefault((t["checkpoint"], t["classes"]), []).append(t)
    for (ck, classes), group in by_classes.items():
        if len(group) < 2:
            continue
        methods = [r["method"] for r in group[0]["rows"]]
        for method in methods:
            rows = [next((r for r in t["rows"] if r["method"] == method), None) for t in group]
            if None in rows:
                continue
            mean = {"checkpoint": ck, "classes": classes, "method": method}
            mean["tasks"] = [t["task"] for t in group]
            for m in measures:
                if all(r[m] for r in rows):  # type: ignore[index]
                    mean[m] = float(np.mean([r[m]["value"] for r in rows]))  # type: ignore[index]
            out.append(mean)
    return out


def curves(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per (checkpoint, method, task): the seed-mean training loss against step (per-step
    history entries) or epoch, and whether it flattened (:data:`FLAT_TOLERANCE`); where every
    seed logged ``val_robust_accuracy`` (``finetune.val_robust``), its seed mean too
    (``val_robust``), the gain of its last quarter over the quarter before and whether it
    stopped rising (:data:`VAL_ROBUST_GAIN`)."""
    out = []
    for (ck, method, task), group in _group(cells).items():
        series = [_loss_series(c["result"]["report"].get("history", [])) for c in group]
        series = [s for s in series if s[1]]
        if not series:
            continue
        unit = series[0][0]
        length = min(len(s[1]) for s in series if s[0] == unit)
        xs = [x for x, _ in series[0][1][:length]]
        loss = np.mean([[y for _, y in s[1][:length]] for s in series if s[0] == unit], axis=0)
        change = _tail_change(loss)
        curve = {
            "checkpoint": ck,
            "method": method,
            "task": task,
            "x": unit,
            "steps": xs,
            "loss": [float(v) for v in loss],
            "tail_change": change,
            "flat": None if change is None else abs(change) <= FLAT_TOLERANCE,
        }
        robust = [_val_robust_series(c["result"]["report"].get("history", [])) for c in group]
        if unit == "step" and all(len(r) >= length for r in robust):
            mean = np.mean([r[:length] for r in robust], axis=0)
            gain = _tail_gain(mean)
            curve |= {
                "val_robust": [float(v) for v in mean],
                "val_robust_gain": gain,
                "val_robust_stopped": None if gain is None else gain <= VAL_ROBUST_GAIN,
            }
        out.append(curve)
    return out


def _step_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history entries logged per step (with their loss)."""
    return [h for h in history if "step" in h and "loss" in h]


def _val_robust_series(history: list[dict[str, Any]]) -> list[float]:
    """The robust validation accuracy of the per-step entries, as long as every one has it."""
    steps = _step_entries(history)
    if not all("val_robust_accuracy" in h for h in steps):
        return []
    return [h["val_robust_accuracy"] for h in steps]


def _loss_series(history: list[dict[str, Any]]) -> tuple[str, list[tuple[float, float]]]:
    steps = _step_entries(history)
    if steps:
        return "step", [(h["step"], h["loss"]) for h in steps]
    return "epoch", [(h["epoch"] + 1, h["loss"]) for h in history if "epoch" in h and "loss" in h]


def _tail_means(values: np.ndarray) -> tuple[float, float] | None:
    """The mean over the last quarter of ``values`` and over the quarter before (None with
    fewer than 2 values)."""
    if len(values) < 2:
        return None
    k = max(1, len(values) // 4)
    return float(np.mean(values[-k:])), float(np.mean(values[-2 * k : -k]))


def _tail_change(values: np.ndarray) -> float | None:
    """Relative change of the last quarter's mean from the quarter before's."""
    means = _tail_means(values)
    return None if means is None else (means[0] - means[1]) / max(abs(means[1]), 1e-12)


def _tail_gain(values: np.ndarray) -> float | None:
    """The last quarter's mean minus the quarter before's."""
    means = _tail_means(values)
    return None if means is None else means[0] - means[1]


def ran_terms(cells: list[Cell]) -> dict[str, Any] | None:
    """The per-term loss log of one ``ran`` run (chest X-ray where the study has it, else the
    first task; the first checkpoint and seed), per step where logged, else per epoch; a term
    whose logged value never moves over two or more points is inert (``inert`` is None with a
    single logged point: nothing can move)."""
    runs = [c for c in cells if c["method"] == "ran"]
    if not runs:
        return None
    cell = next((c for c in runs if c["modality"] == CHEST), runs[0])
    history = cell["result"]["report"].get("history", [])
    unit = "step" if any("step" in h for h in history) else "epoch"
    entries = [h for h in history if unit in h]
    logged = [t for t in RAN_LOG_TERMS if any(t in h for h in entries)]
    log = {t: [h.get(t) for h in entries] for t in logged}
    moved = {t: np.ptp([x for x in v if x is not None]) for t, v in log.items()}
    inert = [t for t, span in moved.items() if span <= 1e-9] if len(entries) > 1 else None
    return {
        "cell": cell["cell"],
        "x": unit,
        "steps": [h[unit] for h in entries],
        "loss": [h.get("loss") for h in entries],
        "terms": log,
        "not_logged": [t for t in RAN_LOG_TERMS if t not in logged],
        "inert": inert,
    }


def write_report(
    cells: list[Cell], table: list[dict[str, Any]], eps: list[float], resamples: int, path: Path
) -> dict[str, Any]:
    """Write the report files into the study directory ``path``; the ``results.json`` part."""
    checkpoints = list(dict.fromkeys(c["checkpoint"] for c in cells))
    tables = task_tables(table, cells, eps)
    means = task_means(tables, eps)
    found = targets(cells, checkpoints, resamples)
    ablations = ablation(cells, eps, resamples)
    loss_curves = curves(cells)
    terms = ran_terms(cells)
    (path / "tables.md").write_text(finetune_outputs.tables_md(tables, means, eps))
    (path / "targets.md").write_text(finetune_outputs.targets_md(found))
    (path / "targets.json").write_text(json.dumps(found, indent=2))
    (path / "ablation.md").write_text(finetune_outputs.ablation_md(ablations, eps))
    (path / "curves.md").write_text(finetune_outputs.curves_md(loss_curves))
    plots = [finetune_outputs.plot_curves(loss_curves, path / "curves.png")]
    if terms is not None:
        (path / "ran_terms.md").write_text(finetune_outputs.ran_terms_md(terms))
        plots.append(finetune_outputs.plot_ran_terms(terms, path / "ran_terms.png"))
    return {
        "task_tables": tables,
        "task_means": means,
        "targets": found,
        "ablation": ablations,
        "curves": loss_curves,
        "ran_terms": terms,
        "report_plots": [str(p) for p in plots if p is not None],
    }
