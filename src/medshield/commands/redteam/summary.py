"""The red-teaming summary table printed at the end of ``medshield redteam``."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.eval.safety_metrics import source_label


def _n(values: dict[str, Any], key: str) -> str:
    metric = values.get(key) or {}
    return str(metric.get("n", 0))


def print_redteam_summary(results: dict[str, Any], console: Any | None = None) -> None:
    """Print the summary tables of a red-teaming run with rich: metrics per attack and per
    modality, the judges' agreement with the held-out labels, latency and errors."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    r = results["redteam"] if "redteam" in results else results
    metrics = r["metrics"]
    columns = [
        ("ASR", "attack_success_rate"),
        ("refusal", "refusal_rate"),
        ("non-answer", "non_answer_rate"),
        ("over-defense", "over_defense_rate"),
        ("over-def. near-miss", "over_defense_near_miss_rate"),
        ("benign acc.", "benign_accuracy"),
    ]
    columns = [c for c in columns if c[1] in metrics["overall"]]
    title = (
        f"{r['model']} on {source_label(r)}, defense {r['defense']}, judge {r['primary_judge']} "
        "(95% bootstrap CI)"
    )

    def metric_table(title: str, group: str, groups: dict[str, Any]) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column(group)
        for label, _ in columns:
            table.add_column(label)
        table.add_column("n harm.", justify="right")
        table.add_column("n benign", justify="right")
        for name, values in groups.items():
            table.add_row(
                name,
                *(format_metric(values.get(key), 2) for _, key in columns),
                _n(values, "attack_success_rate"),
                _n(values, "over_defense_rate"),
            )
        return table

    groups = {**metrics.get("by_attack", {}), "overall": metrics["overall"]}
    console.print(metric_table(title, "attack", groups))
    by_modality = metrics.get("by_modality", {})
    if len(by_modality) > 1:
        console.print(metric_table("per modality", "modality", by_modality))

    if r.get("judge_agreement"):
        table = Table(title="judge agreement (held-out labelled answers)", title_justify="left")
        for column in ("judge", "accuracy", "kappa", "n"):
            table.add_column(column, justify="left" if column == "judge" else "right")
        for a in r["judge_agreement"]:
            table.add_row(a["judge"], f"{a['accuracy']:.3f}", f"{a['kappa']:.3f}", str(a["n"]))
        console.print(table)

    asr = {
        name: s["overall"]["attack_success_rate"]["value"]
        for name, s in r.get("metrics_by_judge", {}).items()
    }
    if len(asr) > 1:
        console.print(
            "overall ASR by judge: "
            + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in asr.items())
        )
    lat = r["latency"]
    if lat["n"]:
        console.print(
            f"latency per row: mean {lat['mean_s']:.3f} s, median {lat['median_s']:.3f} s "
            f"over {lat['n']} rows"
        )
    n_items = r["n_items"]
    console.print(
        f"{n_items['harmful']} harmful + {n_items['benign']} benign"
        + (f" + {n_items['near_miss']} near-miss" if n_items.get("near_miss") else "")
        + f" items, {r['n_rows']} rows, "
        f"{r['n_errors']} errors" + (f" {r['errors_by_stage']}" if r["n_errors"] else "")
    )
