"""Running the real ``medshield`` command line on bad input, for the bad-input corpus tests
(``tests/test_bad_input_*.py``): one helper, so every family checks the same things."""

from __future__ import annotations

import re
import traceback

from typer.testing import CliRunner

from medshield.commands.cli import app


def run_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``medshield ARGS`` in this process (typer's CliRunner) and return its exit code and
    its output (stdout and stderr), with the traceback of any exception that escaped the
    command appended, so a test that asserts ``"Traceback" not in output`` catches crashes.

    Output is as wide as a terminal of 1000 columns (``COLUMNS``), so messages are not wrapped.
    """
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000", **(env or {})})
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, output


def squash(text: str) -> str:
    """``text`` without whitespace, for messages that name long paths."""
    return re.sub(r"\s+", "", text)
