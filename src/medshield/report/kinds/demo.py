"""``medshield demo`` (:mod:`medshield.commands.demo`): the stages with their times, cache use and
headline figures, a link to each stage's own report, and the two comparisons the demo is about:
RAN against LoRA (clean and robust accuracy) and the safety benchmark without and with the
synthetic-demonstration defense."""

from __future__ import annotations

from typing import Any

from medshield.eval.metrics import format_metric
from medshield.report.rundir import RunData
from medshield.report.view import Kind, Link, Section, Table, number

CACHE_LABELS = {
    "trained": "trained, cached",
    "reused": "reused from cache",
    "off": "in the run directory (no cache)",
    "loaded": "loaded",
    "evaluation": "-",
}
PRODUCING_NOTE = (
    "wall s: the stage's time in this run. producing s: the time producing its trained artifact "
    "(training, or crafting the noisy set) took in the run that produced it, also when this run "
    "reused it from the cache."
)
SAFETY = (
    ("attack_success_rate", "ASR"),
    ("over_defense_rate", "over-defense"),
    ("benign_accuracy", "benign accuracy"),
)


def _claims(results: dict[str, Any]) -> list[str]:
    demo = results.get("demo")
    stages = demo.get("stages") if isinstance(demo, dict) else None
    if isinstance(stages, list) and all(
        isinstance(s, dict) and {"stage", "kind", "headline"} <= set(s) for s in stages
    ):
        return ["demo"]
    return []


def _stage_table(stages: list[dict[str, Any]]) -> Table:
    return Table(
        columns=[
            "stage",
            "what",
            "wall s",
            "producing s",
            "trained artifact",
            "headline (95% CI)",
        ],
        rows=[
            [
                str(s["stage"]),
                str(s.get("title", "")),
                number(s.get("seconds"), 1),
                number((s.get("cache") or {}).get("produced_seconds"), 1),
                CACHE_LABELS.get(str((s.get("cache") or {}).get("status")), "-"),
                str(s.get("text", "")),
            ]
            for s in stages
        ],
        title="Stages, in run order",
        note=PRODUCING_NOTE,
    )


def _robustness(stages: list[dict[str, Any]]) -> Table | None:
    tuned = [s["headline"] for s in stages if s["kind"] == "finetune"]
    if not tuned:
        return None
    budgets = list(dict.fromkeys(eps for h in tuned for eps in h.get("robust_accuracy", {})))
    return Table(
        columns=[
            "method",
            "modality",
            "clean accuracy",
            *(f"robust accuracy, eps {eps}/255" for eps in budgets),
            "trainable params",
            "train s",
        ],
        rows=[
            [
                str(h.get("method")),
                str(h.get("modality")),
                format_metric(h.get("clean_accuracy")),
                *(format_metric(h.get("robust_accuracy", {}).get(eps)) for eps in budgets),
                number(h.get("trainable_params")),
                number(h.get("train_wall_s"), 1),
            ]
            for h in tuned
        ],
        title="Fine-tuning the noisy-pretrained mini-clip (robust: worst case over the attacks)",
    )


def _pretraining(stages: list[dict[str, Any]]) -> Table | None:
    pre = [s for s in stages if s["kind"] == "pretrain"]
    if not pre:
        return None
    return Table(
        columns=["stage", "pretrained on", "zero-shot accuracy (mean over modalities)"],
        rows=[
            [
                str(s["stage"]),
                f"{number(s['headline'].get('train_pairs'))} "
                + ("noisy" if s["headline"].get("noisy") else "clean")
                + " pairs",
                format_metric(s["headline"].get("zero_shot_accuracy")),
            ]
            for s in pre
        ],
        title="What noisy pretraining does to zero-shot accuracy",
    )


def _safety(stages: list[dict[str, Any]]) -> Table | None:
    runs = [s for s in stages if s["kind"] == "redteam"]
    if not runs:
        return None
    return Table(
        columns=["stage", "defense", *(label for _, label in SAFETY), "harmful", "benign"],
        rows=[
            [
                str(s["stage"]),
                str(s["headline"].get("defense")),
                *(format_metric(s["headline"].get(key), 2) for key, _ in SAFETY),
                number((s["headline"].get("n_items") or {}).get("harmful")),
                number((s["headline"].get("n_items") or {}).get("benign")),
            ]
            for s in runs
        ],
        title="Safety benchmark without and with the synthetic-demonstration defense",
    )


def _sections(run: RunData) -> list[Section]:
    demo = run.results["demo"]
    stages: list[dict[str, Any]] = demo["stages"]
    links = []
    for s in stages:
        href = f"{s.get('dir', s['stage'])}/report.html"
        if (run.path / href).is_file():
            links.append(Link(href, str(s["stage"]), str(s.get("title", ""))))
    cache = demo.get("cache_dir")
    intro = (
        "Each stage is an ordinary run directory next to this page, with its own config.yaml, "
        "results.json, samples.jsonl and report. "
        + (f"Trained artifacts are cached in {cache}." if cache else "The cache was off.")
    )
    out = [Section("Demo stages", intro=intro, tables=[_stage_table(stages)], links=links)]
    robustness = [t for t in (_pretraining(stages), _robustness(stages)) if t is not None]
    if robustness:
        out.append(Section("Robustness: noisy pretraining, RAN and LoRA", tables=robustness))
    safety = _safety(stages)
    if safety is not None:
        vqa = next((s for s in stages if s["kind"] == "vlm"), None)
        out.append(
            Section(
                "Safety: synthetic demonstrations",
                intro=f"mini-llava: {vqa['text']}." if vqa else "",
                tables=[safety],
            )
        )
    return out


KIND = Kind("demo", _claims, _sections)
