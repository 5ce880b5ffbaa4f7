"""The dual-encoder commands: ``medshield pretrain``, ``evaluate``, ``craft-noise`` and
``finetune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from medshield.commands.console import (
    ConfigOpt,
    OverwriteOpt,
    console,
    done,
    fail,
    load_run_config,
    offline_default,
    print_lines,
    reporter,
    set_option,
)
from medshield.errors import MedshieldError


def print_metrics(metrics: dict[str, Any]) -> None:
    """One table per task: a row per modality, a column per metric, value with its 95% CI."""
    from medshield.eval.metrics import format_metric

    for task, groups in metrics.items():
        names = list(dict.fromkeys(n for values in groups.values() for n in values))
        table = Table(title=f"{task} (95% bootstrap CI)", title_justify="left")
        table.add_column("modality")
        for name in names:
            table.add_column(name, no_wrap=True)
        table.add_column("n", justify="right")
        for modality, values in groups.items():
            cells = [format_metric(values.get(name), missing="n/a") for name in names]
            n = max(m["n"] for m in values.values())
            table.add_row(modality, *cells, str(n))
        console.print(table)


def print_sanity(sanity: dict[str, list[dict[str, Any]]]) -> None:
    """One line per attacked group: how many robustness sanity flags passed, and each failure."""
    from medshield.commands.workflows import sanity_group

    for key, flags in sanity.items():
        failed = [f for f in flags if not f["passed"]]
        status = ("all passed", "green") if not failed else (f"{len(failed)} FAILED", "red")
        console.print(
            Text.assemble(f"sanity flags {sanity_group(key)}: {len(flags)} checks, ", status)
        )
        for f in failed:
            console.print(Text.assemble("  ", (f["name"], "red"), f": {f['detail']}"))


def pretrain(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("pretrain.epochs=1")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Contrastively pretrain a dual encoder; resumes an interrupted run of the same name."""
    offline_default()
    from medshield.commands import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_run_config(config, set_)
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model = workflows.build_model(cfg)
        result = workflows.run_pretrain(cfg, run, model, log=console.print)
        run.finish({"pretrain": result}, kind="pretrain", seed=cfg.seed, report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    done("model saved to ", result["model_dir"], f"; run in {run.path}")
    print_lines(report)


def evaluate(
    config: ConfigOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="A saved medshield model directory to evaluate, or the finetuned/ directory "
            "of a `medshield finetune` run."
        ),
    ] = None,
    set_: Annotated[list[str] | None, set_option("evaluate.max_test_items=50")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Zero-shot, linear probe, robust accuracy, retrieval (clean, attacked), VQA-RAD; 95% CIs."""
    offline_default()
    from medshield.commands import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_run_config(config, set_, **{"model.checkpoint": checkpoint})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model, finetuned = workflows.build_evaluated(cfg)
        result = workflows.run_evaluate(cfg, run, model, log=console.print, finetuned=finetuned)
        run.finish({"evaluate": result}, kind="evaluate", seed=cfg.seed, report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    print_metrics(result["metrics"])
    print_sanity(result["sanity"])
    done("results in ", run.path)
    print_lines(report)


def craft_noise(
    config: ConfigOpt = None,
    surrogate: Annotated[
        Path | None, typer.Option(help="Saved medshield model to attack (model.checkpoint).")
    ] = None,
    set_: Annotated[list[str] | None, set_option("noise.ratio=0.25")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a noisy upstream dataset: a fraction noise.ratio of the pairs made adversarial."""
    offline_default()
    from medshield.commands import workflows
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_run_config(config, set_, **{"model.checkpoint": surrogate})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        result = workflows.run_craft_noise(cfg, run, log=console.print)
        run.finish(
            {"craft_noise": result}, kind="craft-noise", seed=cfg.seed, report=reporter(report)
        )
    except MedshieldError as exc:
        fail(exc)
    done(
        f"{result['perturbed']} of {result['rows']} pairs adversarial "
        f"(max L-inf {result['max_linf_255']:.2f}/255 after uint8 rounding); dataset in ",
        result["noisy_dataset"],
        f"; pretrain on it with --set data.noisy_dataset={result['noisy_dataset']}",
    )
    print_lines(report)


def finetune(
    config: ConfigOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Saved base model directory (model.checkpoint).")
    ] = None,
    method: Annotated[str | None, typer.Option(help="finetune.method, e.g. ran, lora.")] = None,
    set_: Annotated[list[str] | None, set_option("finetune.epochs=2")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune one method on one modality or vqa_rad_closed; clean + PGD/APGD robust accuracy
    and retrieval under Co-Attack, with 95% CIs."""
    offline_default()
    from medshield.commands.finetune import (
        finetune_run_dir,
        load_finetune_config,
        run_finetune,
    )
    from medshield.eval.metrics import format_metric
    from medshield.runs import Run

    report: list[str] = []
    try:
        extra = [f"model.checkpoint={checkpoint}"] if checkpoint is not None else []
        extra += [f"finetune.method={method}"] if method is not None else []
        cfg = load_finetune_config(config, [*(set_ or []), *extra])
        run = Run(finetune_run_dir(cfg), cfg, overwrite=overwrite)
        result = run_finetune(cfg, run, log=console.print)
        run.finish({"finetune": result}, kind="finetune", seed=cfg.seed, report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    for name, m in result["metrics"].items():
        console.print(f"{name}: {format_metric(m)}")
    trained = result["report"]
    done(
        f"trainable parameters {trained['trainable_params']:,}, training "
        f"{trained['train_wall_s']} s, FLOPs x{trained['overhead']['flops_ratio']:.4f}, latency "
        f"x{trained['overhead']['latency_ratio']:.2f}; run in ",
        run.path,
    )
    print_lines(report)
