"""How the ``medshield`` command line presents text: help, errors and tables."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

from medshield.commands import cli, console, dual_encoder
from medshield.commands.demo import load_demo_config
from medshield.commands.finetune import load_finetune_config
from medshield.commands.redteam import load_redteam_config
from medshield.commands.serve import load_serve_config
from medshield.commands.studies.defense import load_defense_study_config
from medshield.commands.studies.finetune import load_study_config
from medshield.commands.studies.noise import load_noise_study_config
from medshield.commands.train_vlm import load_vlm_config
from medshield.config import load_config
from medshield.errors import MedshieldError

runner = CliRunner()

LOADERS: dict[tuple[str, ...], Callable[..., Any]] = {
    ("pretrain",): load_config,
    ("evaluate",): load_config,
    ("craft-noise",): load_config,
    ("demo",): load_demo_config,
    ("train-vlm",): load_vlm_config,
    ("finetune",): load_finetune_config,
    ("redteam",): load_redteam_config,
    ("serve",): load_serve_config,
    ("study", "noise"): load_noise_study_config,
    ("study", "finetune"): load_study_config,
    ("study", "defense"): load_defense_study_config,
}


def help_text(*command: str) -> str:
    result = runner.invoke(cli.app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def test_each_command_shows_an_override_its_own_config_takes() -> None:
    examples = {}
    for command, load in LOADERS.items():
        text = " ".join(help_text(*command).split())
        match = re.search(r"Override a config value \(repeatable\), e\.g\. (\S+?)\.(?:\s|$)", text)
        assert match, (command, text)
        examples[command] = match.group(1)
        load(None, [match.group(1)])  # raises ConfigError if the example is not a valid key
    assert examples[("serve",)] == "limits.timeout_s=30"
    assert examples[("redteam",)] == "generation.max_new_tokens=64"
    # pretrain's example is not repeated where it means nothing
    assert "pretrain.epochs" not in examples[("serve",)] + examples[("redteam",)]


def test_flags_read_as_flags() -> None:
    for command in [("pretrain",), ("serve",), ("redteam",), ("study", "defense")]:
        text = help_text(*command)
        assert "<bool>" not in text, command
        assert re.search(r"--help\s+Show this message", text)
    assert re.search(r"--overwrite\s+Delete a run", help_text("pretrain"))
    assert re.search(r"--allow-untrained\s+Serve mini-llava", help_text("serve"))
    assert re.search(r"--retry-errors\s+On resume", help_text("redteam"))
    assert "--port <int>" in help_text("serve")  # options that take a value still say so
    assert "--set KEY=VALUE" in help_text("serve")


def test_messages_keep_their_brackets() -> None:
    result = runner.invoke(cli.app, ["list", "models[online]"])
    assert result.exit_code == 2
    assert "error: unknown kind 'models[online]'" in result.output

    @cli.app.command("fail-for-test", hidden=True)
    def fail_for_test() -> None:
        console.fail(
            MedshieldError("install medshield[online] and set [bold]MEDSHIELD_DATA_DIR[/]")
        )

    try:
        result = runner.invoke(cli.app, ["fail-for-test"])
    finally:
        cli.app.registered_commands.pop()
    assert result.exit_code == 2
    assert result.output == (
        "error: install medshield[online] and set [bold]MEDSHIELD_DATA_DIR[/]\n"
    )


def test_tables_are_never_squeezed_when_output_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    names = ["zero_shot_accuracy", "linear_probe_accuracy", "robust_accuracy@2", "auc", "f1"]
    metric = {"value": 0.64, "ci_low": 0.5, "ci_high": 0.78, "n": 50}
    metrics = {
        "zero_shot": {
            "chest_xray [online]": {name: metric for name in names},
            "dermatology": {name: metric for name in names},
        }
    }
    dual_encoder.print_metrics(metrics)
    out = capsys.readouterr().out
    assert "…" not in out
    header = next(line for line in out.splitlines() if "modality" in line)
    assert all(name in header for name in names)  # every column kept, no name folded
    rows = [line for line in out.splitlines() if "dermatology" in line or "chest_xray" in line]
    assert len(rows) == 2
    assert all(line.count("0.640 [0.500, 0.780]") == len(names) for line in rows)
    assert "chest_xray [online]" in out
    assert max(len(line) for line in out.splitlines()) > 80
