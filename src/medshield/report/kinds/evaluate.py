"""Pretraining and evaluation runs (``medshield demo`` / ``evaluate`` / ``pretrain``, and each
cell of the noise study): headline table with 95% CIs, per-modality bars, robust accuracy
against the attack budget, and the attack sanity flags."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report import plots
from medshield.report.rundir import RunData
from medshield.report.view import Figure, Kind, Section, Table, ci, flags_table, number

POOLED = ("all", "mean")  # summary groups that are not modalities; "all" preferred for headline
BAR_TASKS = {"zero_shot": "zero-shot", "linear_probe": "linear probe"}


def _pretrain_claims(results: dict[str, Any]) -> list[str]:
    pre = results.get("pretrain")
    history = pre.get("history") if isinstance(pre, dict) else None
    return ["pretrain"] if isinstance(history, dict) and "epochs" in history else []


def _pretrain_sections(run: RunData) -> list[Section]:
    pre = run.results["pretrain"]
    history = pre["history"]
    table = Table(
        columns=["epoch", "mean loss", "first loss", "last loss", "steps", "wall s", "peak MB"],
        rows=[
            [
                number(e.get("epoch")),
                number(e.get("mean_loss")),
                number(e.get("first_loss")),
                number(e.get("last_loss")),
                number(e.get("steps")),
                number(e.get("wall_time_s"), 1),
                number(e.get("peak_memory_mb"), 0),
            ]
            for e in history["epochs"]
        ],
    )
    modalities = ", ".join(pre.get("modalities") or []) or "-"
    intro = (
        f"{number(pre.get('train_pairs'))} image-caption pairs from {modalities}; "
        f"{number(history.get('trainable_parameters'))} trainable parameters."
    )
    return [Section("Pretraining", intro=intro, tables=[table])]


def _evaluate_claims(results: dict[str, Any]) -> list[str]:
    ev = results.get("evaluate")
    return ["evaluate"] if isinstance(ev, dict) and isinstance(ev.get("metrics"), dict) else []


def _headline(metrics: dict[str, Any]) -> Table:
    rows = []
    for task, groups in metrics.items():
        pooled = next((g for g in POOLED if g in groups), None)
        names = list(dict.fromkeys(n for values in groups.values() for n in values))
        for name in names:
            m = groups[pooled].get(name) if pooled else None
            rows.append([task, name, format_metric(m), number((m or {}).get("n")), pooled or "-"])
    return Table(
        columns=["task", "metric", "value [95% CI]", "n", "over"],
        rows=rows,
        title="Headline (mean over modalities; retrieval: all queries pooled)",
    )


def _per_task(task: str, groups: dict[str, Any]) -> Table:
    names = list(dict.fromkeys(n for values in groups.values() for n in values))
    rows = []
    for group, values in groups.items():
        n = max((m.get("n") or 0 for m in values.values() if isinstance(m, dict)), default=0)
        rows.append([group, *(format_metric(values.get(name)) for name in names), number(n)])
    return Table(columns=["modality", *names, "n"], rows=rows, title=task)


def _bars(metrics: dict[str, Any]) -> list[Figure]:
    tasks = [t for t in BAR_TASKS if t in metrics]
    modalities = sorted({m for t in tasks for m in metrics[t] if m not in POOLED})
    if not modalities:
        return []
    series = {
        BAR_TASKS[t]: [ci(metrics[t].get(m, {}).get("accuracy")) for m in modalities] for t in tasks
    }
    return [
        plots.bars(
            modalities,
            series,
            "accuracy",
            "Accuracy per modality (95% CI)",
            caption="Clean test split; whiskers: 95% bootstrap CI.",
        )
    ]


def _robust_curve(groups: dict[str, Any]) -> Figure | None:
    series: plots.Series = {}
    for group, values in groups.items():
        line = []
        for name, m in values.items():
            point = ci(m)
            if point is None:
                continue
            if name == "clean_accuracy":
                line.append((0.0, point))
            elif name.startswith("robust_accuracy@"):
                line.append((float(name.split("@", 1)[1]), point))
        if len(line) > 1:
            series[group] = line
    return plots.lines(
        {"zero-shot accuracy under PGD": series} if series else {},
        xlabel="eps (/255); 0 = clean",
        title="Robust accuracy vs attack budget (95% CI)",
    )


def _evaluate_sections(run: RunData) -> list[Section]:
    ev = run.results["evaluate"]
    metrics: dict[str, Any] = ev["metrics"]
    intro = f"Modalities: {', '.join(ev.get('modalities') or []) or '-'}."
    finetuned = ev.get("finetuned")
    if isinstance(finetuned, dict):
        report = finetuned.get("report") or {}
        ratio = (report.get("overhead") or {}).get("flops_ratio")
        intro += (
            f" A fine-tuned model: {finetuned.get('method')} on {finetuned.get('task')}, "
            f"{number(report.get('trainable_params'))} trainable parameters, "
            f"FLOPs ratio to the base {'-' if ratio is None else f'{ratio:.3f}'}; the task "
            "`finetuned` is the classifier on its own task, the others use its fine-tuned "
            "dual encoder."
        )
    headline = Section(
        "Evaluation",
        intro=intro,
        tables=[_headline(metrics)],
        figures=_bars(metrics),
    )
    robust = metrics.get("robust_zero_shot")
    curve = _robust_curve(robust) if robust else None
    if curve is not None:
        headline.figures.append(curve)
    sections = [headline]
    sanity = ev.get("sanity") or {}
    if sanity:
        flags = [
            (" ".join(filter(None, (modality, flag.get("group")))), flag)
            for modality, group in sanity.items()
            for flag in group
        ]
        table = flags_table(
            flags,
            "modality",
            "Attack sanity flags",
            "Checks that the robust numbers come from a working attack (see eval/robust.py).",
        )
        sections.append(Section("Attack sanity flags", tables=[table]))
    sections.append(
        Section(
            "Metrics per modality",
            tables=[_per_task(task, groups) for task, groups in metrics.items()],
        )
    )
    skipped = ev.get("skipped") or {}
    if skipped:
        sections.append(
            Section(
                "Skipped tasks",
                tables=[Table(["group", "reason"], [[g, str(r)] for g, r in skipped.items()])],
            )
        )
    return sections


PRETRAIN = Kind("pretrain", _pretrain_claims, _pretrain_sections)
EVALUATE = Kind("evaluate", _evaluate_claims, _evaluate_sections)
