"""The commands that show what medshield does and has: ``medshield demo``, ``report`` and
``list``."""

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
    offline_default,
    set_option,
)
from medshield.errors import MedshieldError


def demo(
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, set_option("vlm.steps=8")] = None,
    overwrite: OverwriteOpt = False,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache", help="Train every stage in the run directory; do not use the cache."
        ),
    ] = False,
) -> None:
    """Both halves end to end on the built-in models (configs/demo.yaml): pretrain mini-clip,
    craft noisy data, pretrain on it, fine-tune RAN vs LoRA, train mini-llava, red-team it
    with and without synthetic demonstrations; one report linking every stage."""
    offline_default()
    from medshield.commands.demo import load_demo_config, run_demo
    from medshield.runs import Run

    def log(line: str) -> None:
        console.print(line, highlight=False)

    try:
        cfg = load_demo_config(config, [*(set_ or []), *(["cache=false"] if no_cache else [])])
        run = Run(Path(cfg.output_dir) / cfg.name, cfg, overwrite=overwrite)
        results = run_demo(cfg, run, log=log)
    except MedshieldError as exc:
        fail(exc)
    _print_demo_summary(results, run.path)


def _print_demo_summary(results: dict[str, Any], run_path: Path) -> None:
    """The demo's final table: per stage its wall time, the time producing its trained artifact
    took in the run that produced it (beside a reuse's time), where the artifact came from and
    its headline figures; then where the report is."""
    from medshield.report.kinds.demo import CACHE_LABELS

    table = Table(
        title=f"medshield demo: {results['wall_time_s']:.0f} s (95% bootstrap CIs)",
        title_justify="left",
    )
    numbers = ("wall s", "producing s")
    for column in ("stage", *numbers, "trained artifact", "headline"):
        table.add_column(column, justify="right" if column in numbers else "left", overflow="fold")
    for stage in results["demo"]["stages"]:
        produced = stage["cache"].get("produced_seconds")
        table.add_row(
            stage["stage"],
            f"{stage['seconds']:.0f}",
            "-" if produced is None else f"{produced:.0f}",
            CACHE_LABELS.get(stage["cache"]["status"], "-"),
            Text(stage["text"]),
        )
    console.print(table)
    done("report: ", run_path / "report.html", " (links every stage's report)")


def report_(
    run_dir: Annotated[Path, typer.Argument(help="A run or study directory (with results.json).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Render a run directory to one self-contained HTML file (tables, plots, samples)."""
    from medshield.report import write_report

    try:
        path = write_report(run_dir, out)
    except MedshieldError as exc:
        fail(exc)
    done("report written to ", path, f" ({path.stat().st_size / 1024:.0f} KiB)")


def list_(
    kind: Annotated[
        str,
        typer.Argument(
            help="models | chat-models | attacks (image-attacks, multimodal-attacks, "
            "text-attacks, jailbreaks) | methods | defenses | judges | strategies"
        ),
    ],
) -> None:
    """Show what is registered: one line per entry with a short description."""
    from medshield.registry import REGISTRIES

    if kind not in REGISTRIES:
        fail(MedshieldError(f"unknown kind {kind!r}; choose one of {', '.join(REGISTRIES)}"))
    entries = [entry for registry in REGISTRIES[kind] for entry in registry.entries()]
    for entry in sorted(entries, key=lambda e: e.name):
        console.print(Text.assemble((entry.name, "bold"), f"  {entry.description}"))
