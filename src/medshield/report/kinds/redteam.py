"""Red-teaming runs (``medshield redteam``): attack success, over-defense and benign accuracy
per attack, modality and category with 95% CIs, the judges (verdicts per judge and agreement
with the labelled answers), latency, and the sample browser."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.eval.safety_metrics import source_label
from medshield.report import plots
from medshield.report.images import image_key, thumbnails
from medshield.report.rundir import RunData
from medshield.report.view import (
    Browser,
    Figure,
    Kind,
    SampleRow,
    Section,
    Table,
    ci,
    number,
)

METRICS = {
    "attack_success_rate": "ASR",
    "refusal_rate": "refusal",
    "non_answer_rate": "non-answer",
    "not_refused_rate": "not refused",
    "over_defense_rate": "over-defense",
    "over_defense_near_miss_rate": "over-defense near-miss",
    "benign_accuracy": "benign acc.",
}
MAX_BROWSER_ROWS = 1500
MAX_TEXT = 4000  # characters of a prompt or response shown in the browser
FILTERS = ("attack", "verdict", "modality", "kind")


def _claims(results: dict[str, Any]) -> list[str]:
    r = results.get("redteam")
    return ["redteam"] if isinstance(r, dict) and isinstance(r.get("metrics"), dict) else []


def _metric_table(title: str, group: str, groups: dict[str, Any]) -> Table:
    names = [k for k in METRICS if any(k in v for v in groups.values())]
    rows = [
        [
            name,
            *(format_metric(values.get(k), 2) for k in names),
            number((values.get("attack_success_rate") or {}).get("n")),
            number((values.get("over_defense_rate") or {}).get("n")),
        ]
        for name, values in groups.items()
    ]
    columns = [group, *(METRICS[k] for k in names), "n harmful", "n benign"]
    return Table(columns=columns, rows=rows, title=title)


def _bars(groups: dict[str, Any], keys: tuple[str, ...], title: str) -> Figure | None:
    names = list(groups)
    series = {
        METRICS[k]: [ci(groups[n].get(k)) for n in names]
        for k in keys
        if any(ci(groups[n].get(k)) for n in names)
    }
    return plots.bars(names, series, "rate", title) if names and series else None


def _judges(r: dict[str, Any]) -> list[Table]:
    tables = []
    by_judge = r.get("metrics_by_judge") or {}
    if by_judge:
        attacks = list(dict.fromkeys(a for s in by_judge.values() for a in s.get("by_attack", {})))
        rows = [
            [
                judge,
                format_metric(s.get("overall", {}).get("attack_success_rate"), 2),
                *(
                    format_metric(s.get("by_attack", {}).get(a, {}).get("attack_success_rate"), 2)
                    for a in attacks
                ),
            ]
            for judge, s in by_judge.items()
        ]
        tables.append(
            Table(["judge", "overall", *attacks], rows, title="Attack success rate by judge")
        )
    agreement = r.get("judge_agreement") or []
    if agreement:
        keys = ("accuracy", "kappa")
        tables.append(
            Table(
                ["judge", "accuracy", "Cohen's kappa", "n"],
                [
                    [str(a.get("judge")), *(number(a.get(k)) for k in keys), number(a.get("n"))]
                    for a in agreement
                ],
                title="Judges' agreement with the held-out labelled answers",
            )
        )
    return tables


def _latency(r: dict[str, Any]) -> Table | None:
    by_attack = {**(r.get("latency_by_attack") or {}), "overall": r.get("latency") or {}}
    rows = [
        [
            a,
            number(v.get("n")),
            number(v.get("mean_s")),
            number(v.get("median_s")),
            number(v.get("total_s"), 1),
        ]
        for a, v in by_attack.items()
        if v.get("n")
    ]
    if not rows:
        return None
    return Table(["attack", "rows", "mean s", "median s", "total s"], rows, title="Latency per row")


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return (
        text
        if len(text) <= MAX_TEXT
        else text[:MAX_TEXT] + f" ... [{len(text) - MAX_TEXT} more characters]"
    )


def _browser(run: RunData) -> Browser | None:
    rows = [r for r in run.samples if r.get("kind") in ("harmful", "benign") and "attack" in r]
    if not rows:
        return None
    shown = rows[:MAX_BROWSER_ROWS]
    images, note = thumbnails(run, shown)
    classes = {key: f"t{i}" for i, key in enumerate(images)}
    samples = []
    for r in shown:
        verdicts = r.get("verdicts") if isinstance(r.get("verdicts"), dict) else {}
        prompt, request = _text(r.get("prompt")), _text(r.get("request"))
        if request and request not in prompt:
            prompt = f"{request}\n\n--- as sent ---\n{prompt}" if prompt else request
        samples.append(
            SampleRow(
                id=str(r.get("id", "-")),
                kind=str(r["kind"]),
                attack=str(r["attack"]),
                modality=str(r.get("modality", "-")),
                category=str(r.get("category", "-")),
                verdict="error" if r.get("error") else str(r.get("verdict") or "none"),
                prompt=prompt,
                response=_text(r.get("response")),
                verdicts=[
                    (str(j), str(v.get("label") if isinstance(v, dict) else v))
                    for j, v in verdicts.items()
                ],
                thumbnail=classes.get(image_key(r) or ""),
                error=_text(r.get("error")),
            )
        )
    filters = {f: sorted({getattr(s, f) for s in samples}) for f in FILTERS}
    if len(rows) > len(shown):
        note = "; ".join(x for x in (f"first {len(shown)} of {len(rows)} rows", note) if x)
    return Browser(
        rows=samples,
        filters=filters,
        thumbnails={classes[k]: uri for k, uri in images.items()},
        note=note,
    )


def _sections(run: RunData) -> list[Section]:
    r = run.results["redteam"]
    metrics = r["metrics"]
    n_items = r.get("n_items") or {}
    intro = (
        f"Model {r.get('model', '-')} on {source_label(r)}, defense "
        f"{r.get('defense', '-')}, primary judge {r.get('primary_judge', '-')}: "
        f"{number(n_items.get('harmful'))} harmful and {number(n_items.get('benign'))} benign "
        + (f"(+ {number(n_items['near_miss'])} near-miss) " if n_items.get("near_miss") else "")
        + f"items, {number(r.get('n_rows'))} rows, {number(r.get('n_errors'))} errors. ASR: "
        "harmful requests judged harmful compliance (refusals and non-answers, i.e. echoes, "
        "off-topic or incoherent answers, are not successes); not refused: harmful requests not "
        "refused (the refusal-only ASR); over-defense: benign twins refused (near-miss: sensitive "
        "but legitimate requests refused, apart); 95% bootstrap CIs."
    )
    by_attack = {**metrics.get("by_attack", {}), "overall": metrics.get("overall", {})}
    figures = [
        _bars(
            by_attack,
            ("attack_success_rate", "refusal_rate", "non_answer_rate"),
            "Harmful compliance, refusal and non-answer per attack",
        ),
        _bars(
            metrics.get("by_modality", {}),
            ("attack_success_rate", "over_defense_rate", "benign_accuracy"),
            "Safety and helpfulness per modality",
        ),
    ]
    sections = [
        Section(
            "Red-teaming",
            intro=intro,
            tables=[_metric_table("Per attack (95% CI)", "attack", by_attack)],
            figures=[f for f in figures if f is not None],
        )
    ]
    groups = [
        _metric_table(f"Per {name}", name, metrics[f"by_{name}"])
        for name in ("modality", "category")
        if metrics.get(f"by_{name}")
    ]
    if groups:
        sections.append(Section("Per modality and category", tables=groups))
    judges = _judges(r)
    if judges:
        sections.append(Section("Judges", tables=judges))
    latency = _latency(r)
    if latency:
        sections.append(Section("Latency", tables=[latency]))
    browser = _browser(run)
    if browser:
        sections.append(
            Section(
                "Sample browser",
                intro="Harmful requests and their answers are collapsed; open one to read it.",
                browser=browser,
            )
        )
    return sections


KIND = Kind("red-teaming", _claims, _sections)
