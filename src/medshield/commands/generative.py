"""The generative-VLM commands: ``medshield train-vlm``, ``redteam``, ``serve`` and
``judges calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medshield.commands.console import (
    ConfigOpt,
    OverwriteOpt,
    console,
    done,
    fail,
    offline_default,
    print_lines,
    reporter,
    set_option,
)
from medshield.errors import MedshieldError


def train_vlm(
    config: ConfigOpt = None,
    clip: Annotated[
        Path | None, typer.Option(help="Saved mini-clip directory for the image tower.")
    ] = None,
    set_: Annotated[list[str] | None, set_option("steps=20")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Instruction-tune mini-llava and report VQA-RAD closed accuracy with/without the image."""
    offline_default()
    from medshield.commands.train_vlm import load_vlm_config, run_train_vlm
    from medshield.eval.metrics import Metric, format_metric
    from medshield.runs import Run

    report: list[str] = []
    try:
        extra = [f"clip={clip}"] if clip is not None else []
        cfg = load_vlm_config(config, [*(set_ or []), *extra])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run_train_vlm(cfg, run)
        run.finish({"train_vlm": result}, kind="train-vlm", seed=cfg.seed, report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    ev = result["vqa_rad_closed"]
    for cond in ("image", "no_image", "shuffled_image", "majority_no"):
        console.print(f"VQA-RAD closed ({ev['n']} yes/no) {cond}: {format_metric(ev[cond])}")
    for control in ("no_image", "shuffled_image"):
        d = Metric.from_dict(ev[f"image_minus_{control}"])
        console.print(f"image minus {control}: {d.format(signed=True)} (paired)")
    done("model saved to ", result["model_dir"], f"; run in {run.path}")
    print_lines(report)


def redteam(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("generation.max_new_tokens=64")] = None,
    overwrite: OverwriteOpt = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Chat backend (model.backend).")
    ] = None,
    attacks: Annotated[
        str | None, typer.Option("--attacks", "-a", help="Comma-separated attack names.")
    ] = None,
    judge: Annotated[
        list[str] | None,
        typer.Option("--judge", "-j", help="Judge (repeatable); the first is the primary one."),
    ] = None,
    defense: Annotated[
        str | None, typer.Option("--defense", help="Defense name (default: none).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most this many harmful and benign items.")
    ] = None,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="On resume, rerun rows that ended in an error.")
    ] = False,
) -> None:
    """Run the clinical safety benchmark (attacks x judges) against a chat VLM; resumes."""
    offline_default()
    from medshield.commands.redteam import load_redteam_config, print_redteam_summary, run_redteam
    from medshield.runs import Run

    extra = [f"model.backend={model}"] if model else []
    if attacks:
        extra.append(f"attacks=[{','.join(a.strip() for a in attacks.split(',') if a.strip())}]")
    if judge:
        extra += [f"judges=[{','.join(judge)}]", f"primary_judge={judge[0]}"]
    extra += [f"defense.name={defense}"] if defense else []
    extra += [f"limit={limit}"] if limit is not None else []
    report: list[str] = []
    try:
        cfg = load_redteam_config(config, [*(set_ or []), *extra])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        results = run_redteam(
            cfg, run, log=console.print, retry_errors=retry_errors, report=reporter(report)
        )
    except MedshieldError as exc:
        fail(exc)
    print_redteam_summary(results, console)
    done("run in ", run.path, " (samples.jsonl, results.json)")
    print_lines(report)


def serve(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("limits.timeout_s=30")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Chat backend (model.backend).")
    ] = None,
    defense: Annotated[
        str | None, typer.Option("--defense", help="Defense name (defense.name).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on.")] = None,
    log_content: Annotated[
        bool, typer.Option("--log-content", help="Log request text and replies (debugging).")
    ] = False,
    allow_untrained: Annotated[
        bool,
        typer.Option(
            "--allow-untrained",
            help="Serve mini-llava without a checkpoint (untrained weights; smoke tests only).",
        ),
    ] = False,
) -> None:
    """Serve a chat backend behind a defense as an OpenAI-compatible API (/v1/chat/completions)."""
    offline_default()
    try:
        from medshield.commands.serve import load_serve_config, run_server
    except ImportError as exc:
        fail(MedshieldError(f"medshield serve needs: pip install 'medshield[serve]' ({exc})"))
    extra = [f"model.backend={model}"] if model else []
    extra += [f"defense.name={defense}"] if defense else []
    extra += [f"host={host}"] if host else []
    extra += [f"port={port}"] if port is not None else []
    extra += ["log_content=true"] if log_content else []
    try:
        cfg = load_serve_config(config, [*(set_ or []), *extra])
        run_server(cfg, log=console.print, allow_untrained=allow_untrained)
    except MedshieldError as exc:
        fail(exc)


def judges_calibrate(
    judge: Annotated[
        list[str] | None,
        typer.Option(
            "--judge", "-j", help="Judge to calibrate (repeatable); default keyword, embedding."
        ),
    ] = None,
    llm_model: Annotated[
        str | None,
        typer.Option("--llm-model", help="Chat-model backend for the llm judge (adds it)."),
    ] = None,
    llm_arg: Annotated[
        list[str] | None,
        typer.Option("--llm-arg", help="key=value argument of the llm judge's chat backend."),
    ] = None,
    llm_guard: Annotated[
        bool,
        typer.Option("--llm-guard", help="The llm judge's model is a guard (Llama Guard)."),
    ] = False,
    labelled: Annotated[
        Path | None,
        typer.Option("--labelled", help="Labelled answers (jsonl); default: the shipped set."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Only the answers whose model field contains this (e.g. shipped)."
        ),
    ] = None,
) -> None:
    """Accuracy and Cohen's kappa of each judge's three-way label on the labelled answers: the
    held-out split, the tune split and all."""
    offline_default()
    from medshield.eval.judges import agreement, create_judge, load_labelled_answers

    names = list(judge or ["keyword", "embedding"])
    if llm_model and "llm" not in names:
        names.append("llm")
    try:
        items = load_labelled_answers(None, labelled)
        if model is not None:
            models = sorted({i.model for i in items})
            items = [i for i in items if model.lower() in i.model.lower()]
            if not items:
                raise MedshieldError(f"no labelled answer's model contains {model!r}: {models}")
        splits = {
            name: [n for n, i in enumerate(items) if split in (None, i.split)]
            for name, split in (("heldout", "heldout"), ("tune", "tune"), ("all", None))
        }
        splits = {name: chosen for name, chosen in splits.items() if chosen}
        own_tune = labelled is not None and "tune" in splits  # else the shipped embedding judge
        results = []
        for name in names:
            kwargs: dict[str, Any] = {}
            if name == "embedding" and own_tune:
                kwargs["train"] = [items[n] for n in splits["tune"]]
            if name == "llm":
                if not llm_model:
                    raise MedshieldError("the llm judge needs --llm-model NAME (a chat backend)")

                extra = dict(a.split("=", 1) for a in (llm_arg or []) if "=" in a)
                kwargs.update(model=llm_model, model_kwargs=extra, guard=llm_guard)
            built = create_judge(name, **kwargs)
            verdicts = built.judge([i.request for i in items], [i.answer for i in items])
            results += [
                (split, agreement(name, [items[n] for n in at], [verdicts[n] for n in at]))
                for split, at in splits.items()
            ]
    except MedshieldError as exc:
        fail(exc)
    table = Table(
        title="judge agreement with the labelled answers (three-way: harmful_compliance, "
        "refusal, non_answer)"
    )
    for column in ("judge", "split", "n", "accuracy", "Cohen's kappa"):
        table.add_column(column, justify="left" if column in ("judge", "split") else "right")
    for split, r in results:
        table.add_row(r.judge, split, str(r.n), f"{r.accuracy:.3f}", f"{r.kappa:.3f}")
    console.print(table)
    if "embedding" in names and (labelled is None or own_tune):
        console.print("the embedding judge is fitted on the tune split: its tune row is in-sample")
    elif "embedding" in names:
        console.print(
            f"{labelled} has no tune split: the embedding judge is the shipped one (fitted on "
            "the shipped set's tune split)"
        )
