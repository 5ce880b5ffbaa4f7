"""``medshield redteam``: run the clinical safety benchmark against a generative (chat) VLM.

For every selected harmful item and every configured attack, the attack turns the request and
its medical image into a conversation, the optional defense rewrites it, the model answers and
every configured judge labels the answer (harmful compliance / refusal / non-answer). Benign
twins are sent ``direct`` only (under the same defense), to measure over-defense (benign
requests refused) and benign accuracy (answers checked against the known answer).

The run directory (see :class:`medshield.runs.Run`) holds::

    config.yaml     the resolved RedteamConfig
    samples.jsonl   one row per (item id, attack), appended batch by batch: the source of truth
    images/         the images the model received, one PNG per distinct image, named by the
                    start of its SHA-256 (``Run.store``)
    results.json    metrics per attack / modality / category with 95% bootstrap intervals,
                    each judge's agreement with the held-out labelled answers, latency, and
                    the item source (for ``source: file``, ``query_file``: the file's resolved
                    path, SHA-256 and number of rows)

A row::

    {"id": "h-...", "kind": "harmful", "category": "insurance_fraud", "modality": "chest_xray",
     "image_ref": "medmnist:chest_xray:test:17:", "attack": "jb-roleplay", "defense": "none",
     "request": "<benchmark text>",
     "prompt": "<attacked user turn text>", "image_files": ["images/3f9c0d1e2a4b5c6d.png"],
     "response": "...",
     "verdicts": {"keyword": {"label": "refusal", ...}, ...}, "verdict": "refusal",
     "correct": null, "latency_s": 0.41, ...}

``image_ref`` is the item's source image before any attack (:meth:`ImageRef.key`: dataset,
modality, split, index, file name); ``image_files`` are the images of the user turn the model
answered, after the attack and the defense (FigStep's typography, an adversarial image), as
8-bit PNGs in the run directory, in the order sent (rows that failed have none).
``latency_s`` is the wall time of the row's ``generate`` batch divided by the batch size (work
is grouped by attack, so a batch holds one attack); judging is not included.

Rows of items that failed (an image that is not an image, a conversation the attack or defense
rejects, an endpoint that timed out or answered malformed JSON, a prompt longer than the model's
context) carry ``error`` and ``error_stage`` instead of a response; the run goes on and the
metrics count them in ``n_errors``. Re-running the same config resumes: finished (id, attack)
keys are skipped (error rows too, unless ``run_redteam(..., retry_errors=True)``).

Example::

    cfg = load_redteam_config("configs/redteam_quick.yaml", ["limit=10"])
    run = Run(Path(cfg.output_dir) / cfg.name, cfg)
    results = run_redteam(cfg, run, log=print)
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from medshield.commands.redteam.config import (
    ChatModelConfig,
    DefenseConfig,
    GenerationConfig,
    RedteamConfig,
    load_redteam_config,
)
from medshield.commands.redteam.items import load_items, plan, select_items
from medshield.commands.redteam.runner import _Runner, build_judges, check_names
from medshield.commands.redteam.summary import print_redteam_summary
from medshield.runs import Log, Reporter, Run, check_measured

__all__ = [
    "ChatModelConfig",
    "DefenseConfig",
    "GenerationConfig",
    "RedteamConfig",
    "build_judges",
    "check_names",
    "load_items",
    "load_redteam_config",
    "print_redteam_summary",
    "run_redteam",
    "select_items",
    "summarize_run",
]

SUMMARY_GROUPS = ("modality", "category", "attack")


def _latency(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = [r["latency_s"] for r in rows if not r.get("error") and r.get("latency_s") is not None]
    if not values:
        return {"n": 0, "mean_s": None, "median_s": None, "total_s": 0.0}
    return {
        "n": len(values),
        "mean_s": round(statistics.fmean(values), 4),
        "median_s": round(statistics.median(values), 4),
        "total_s": round(sum(values), 2),
    }


def _n_items(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Items per kind; near-miss benign items apart from the plain benign ones (when present)."""
    from medshield.data.safety import NEAR_MISS

    near = {r["id"] for r in rows if r.get("subset") == NEAR_MISS}
    counts = {
        kind: len({r["id"] for r in rows if r["kind"] == kind and r["id"] not in near})
        for kind in ("harmful", "benign")
    }
    return {**counts, NEAR_MISS: len(near)} if near else counts


def summarize_run(
    config: RedteamConfig, rows: Sequence[dict[str, Any]], judges: dict[str, Any] | None
) -> dict[str, Any]:
    """results.json content from the sample rows (and judge agreement when judges are given)."""
    from medshield.data.safety import query_file_record
    from medshield.eval.safety_metrics import summarize_safety

    metrics = summarize_safety(
        rows,
        judge=config.primary,
        groups=SUMMARY_GROUPS,
        n_resamples=config.bootstrap_resamples,
        seed=config.seed,
    )
    by_judge = {
        name: summarize_safety(
            rows,
            judge=name,
            groups=("attack",),
            n_resamples=config.bootstrap_resamples,
            seed=config.seed,
        )
        for name in config.judges
    }
    agreement = []
    if judges and config.judge_agreement:
        from medshield.eval.judges import judge_agreement

        agreement = [judge_agreement(judge).to_dict() for judge in judges.values()]
    errors = [r for r in rows if r.get("error")]
    return {
        "redteam": {
            "model": config.model.backend,
            "source": config.source,
            **({"query_file": query_file_record(config.query_file)} if config.query_file else {}),
            "defense": config.defense.name,
            "attacks": list(config.attacks),
            "primary_judge": config.primary,
            "n_items": _n_items(rows),
            "n_rows": len(rows),
            "n_errors": len(errors),
            "errors_by_stage": dict(Counter(r.get("error_stage", "?") for r in errors)),
            "metrics": metrics,
            "metrics_by_judge": by_judge,
            "judge_agreement": agreement,
            "latency": _latency(rows),
            "latency_by_attack": {
                a: _latency([r for r in rows if r["attack"] == a])
                for a in sorted({r["attack"] for r in rows})
            },
        }
    }


def run_redteam(
    config: RedteamConfig,
    run: Run,
    log: Log = print,
    retry_errors: bool = False,
    *,
    model: Any | None = None,
    judges: dict[str, Any] | None = None,
    attacked: dict[tuple[str, str], list[Any]] | None = None,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Run (or resume) the red-teaming benchmark into ``run`` and return the results dict
    (also written to ``results.json``, then the report with ``report``, by
    :meth:`~medshield.runs.Run.finish`).

    Finished (id, attack) rows already in ``samples.jsonl`` are kept and not recomputed; with
    ``retry_errors`` the rows that ended in an error are dropped and run again (e.g. after an
    endpoint outage).

    Several runs of the same items and attacks under different defenses (a study) can share
    work: ``model`` is an already-loaded chat backend (used as it is and left open; by default
    the configured backend is loaded here and closed at the end), ``judges`` already-built
    judges by name, and ``attacked`` a dict, shared between the runs, in which the attacked
    conversations of white-box attacks (``white_box``) are kept by (item id, attack), so
    each is crafted once against the undefended model and every run defends the same one.

    Raises:
        ConfigError: an empty item selection or bad attack/judge arguments.
        UnknownNameError: an unknown source, modality, attack, judge, defense or backend.
        DataError: missing benchmark data.
        NothingMeasured: every row ended in an error (e.g. the endpoint is down); the rows
            stay in ``samples.jsonl``, so ``retry_errors`` reruns them.
    """
    check_names(config)
    items = select_items(load_items(config), config.limit, config.seed)
    work = plan(items, config.attacks)
    keys = {(item.id, attack) for item, attack in work}

    on_disk = run.load_samples()
    if retry_errors and any(r.get("error") for r in on_disk):
        on_disk = [r for r in on_disk if not r.get("error")]
        run.rewrite_samples(on_disk)
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for r in on_disk:  # rows outside this selection (none under the same config) are ignored
        if (r.get("id"), r.get("attack")) in keys:
            done.setdefault((r["id"], r["attack"]), r)
    rows = list(done.values())
    pending = [(item, attack) for item, attack in work if (item.id, attack) not in done]
    n_harmful = sum(1 for i in items if i.kind == "harmful")
    log(
        f"redteam {config.model.backend} on {config.query_file or config.source}: "
        f"{n_harmful} harmful x {len(config.attacks)} attacks + {len(items) - n_harmful} benign "
        f"= {len(work)} rows; "
        f"{len(done)} done, {len(pending)} to run (defense: {config.defense.name})"
    )

    judges = judges if judges is not None else build_judges(config)
    if pending:
        owned = model is None
        if owned:
            from medshield.models.chat import create_chat_model

            model = create_chat_model(config.model.backend, **config.model.kwargs)
        try:
            runner = _Runner(config, model, judges, log, run, attacked)
            size = config.generation.batch_size
            with tqdm(total=len(pending), desc="redteam", unit="row", mininterval=1.0) as bar:
                for start in range(0, len(pending), size):
                    new = runner.batch(pending[start : start + size])
                    run.append_samples(new)  # flushed: an interruption loses this batch at most
                    rows.extend(new)
                    bar.update(len(new))
        finally:
            close = getattr(model, "close", None)
            if owned and callable(close):
                close()

    errors = Counter(f"{r.get('error_stage', '?')}: {r['error']}" for r in rows if r.get("error"))
    check_measured(
        "red-team rows",
        len(rows),
        dict(errors),
        "fix the cause (e.g. start the endpoint) and rerun the same command with --retry-errors",
        log,
    )
    results = summarize_run(config, rows, judges)
    return run.finish(results, kind="redteam", seed=config.seed, report=report)
