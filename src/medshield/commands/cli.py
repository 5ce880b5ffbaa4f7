"""The ``medshield`` command line: the typer app, its groups and the commands it registers. Each
command is a thin layer over functions a user can import; they live in one module per group of
commands (:mod:`~medshield.commands.dual_encoder`, :mod:`~medshield.commands.generative`,
:mod:`~medshield.commands.study`, :mod:`~medshield.commands.overview`)."""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from medshield.commands import dual_encoder, generative, overview, study
from medshield.commands.console import console, fail
from medshield.errors import MedshieldError

RESUMABLE = frozenset(
    {"pretrain", "evaluate", "craft-noise", "demo", "train-vlm", "finetune", "redteam", "study"}
)
"""Commands that resume an interrupted run when run again with the same arguments."""


class _Commands(TyperGroup):
    """The top-level command group: Ctrl-C ends any command with exit status 130 and one line
    (saying how to resume, for the commands that resume), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            resume = ctx.invoked_subcommand in RESUMABLE
            console.print("interrupted" + ("; rerun the same command to resume" if resume else ""))
            raise typer.Exit(code=130) from None


# Help is plain click text: rich help would read [brackets] in it as markup and show every flag
# as taking a <bool> value.
app = typer.Typer(
    cls=_Commands,
    help="Stress-test and harden medical vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
study_app = typer.Typer(
    help="Studies: many runs swept over a grid, aggregated into one table and plots.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(study_app, name="study")


@app.callback()
def _startup() -> None:
    """Stress-test and harden medical vision-language models."""
    from medshield.registry import load_plugins
    from medshield.threads import configure_threads

    configure_threads()  # before torch loads: OMP_NUM_THREADS, else half the cores

    try:
        load_plugins()
    except MedshieldError as exc:
        fail(exc)


# The order here is the order of `medshield --help`.
app.command()(dual_encoder.pretrain)
app.command()(dual_encoder.evaluate)
app.command("craft-noise")(dual_encoder.craft_noise)
app.command()(overview.demo)
app.command("train-vlm")(generative.train_vlm)
app.command()(dual_encoder.finetune)
app.command("report")(overview.report_)
app.command("list")(overview.list_)
app.command()(generative.redteam)
app.command()(generative.serve)
study_app.command("noise")(study.study_noise)
study_app.command("finetune")(study.study_finetune)
study_app.command("defense")(study.study_defense)

judges_app = typer.Typer(
    help="Answer judges: agreement with the labelled answer set.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(judges_app, name="judges")
judges_app.command("calibrate")(generative.judges_calibrate)


if __name__ == "__main__":
    app()
