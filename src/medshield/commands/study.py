"""The study commands: ``medshield study noise``, ``study finetune`` and ``study defense``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.text import Text

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


def study_noise(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("seeds=[0]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Noise-level study: pretrain at each noise ratio x eps x seed, evaluate, aggregate."""
    offline_default()
    from medshield.commands.studies.noise import load_noise_study_config, run_noise_study
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_noise_study_config(config, set_)
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run_noise_study(cfg, run, log=console.print)
        run.finish(result, kind="study-noise", seed=cfg.base.seed, report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    console.print((run.path / "table.md").read_text())
    done("study in ", run.path, " (results.json, table.md, plots/, cells/)")
    print_lines(report)


def study_finetune(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("seeds=[0]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tuning comparison: checkpoints x methods x tasks (modalities, VQA-RAD) x seeds."""
    offline_default()
    from medshield.commands.studies.finetune import (
        load_study_config,
        run_study_finetune,
        study_run_dir,
    )
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_study_config(config, set_)
        run = Run(study_run_dir(cfg), cfg, overwrite=overwrite)
        result = run_study_finetune(cfg, run, log=console.print)
        run.finish(result, kind="study-finetune", seed=cfg.seeds[0], report=reporter(report))
    except MedshieldError as exc:
        fail(exc)
    console.print((run.path / "table.md").read_text())
    done("study in ", run.path, " (results.json, table.md/csv, plots, cells/)")
    print_lines(report)


def study_defense(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("budgets=[0,4]")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Defense study: demonstration budgets x selection strategies, and the baselines, against
    every attack; ASR, over-defense and benign accuracy with 95% CIs, plots, claims decided."""
    offline_default()
    from medshield.commands.studies.defense import load_defense_study_config, run_defense_study
    from medshield.runs import Run

    report: list[str] = []
    try:
        cfg = load_defense_study_config(config, set_)
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        result = run.finish(
            run_defense_study(cfg, run, log=console.print),
            kind="study-defense",
            seed=cfg.redteam.seed,
            report=reporter(report),
        )
    except MedshieldError as exc:
        fail(exc)
    for claim in result["claims"].values():
        console.print(Text.assemble(f"{claim['statement']}: ", (claim["verdict"], "bold")))
    done("study in ", run.path, " (claims.md, table.md, results.json, plots/, cells/)")
    print_lines(report)
