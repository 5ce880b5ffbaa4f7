"""What the command line says and returns when nothing, or only part, was measured, when a
model's outputs are not finite, and on Ctrl-C."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from bad_input_support import run_cli


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_with_every_data_file_missing_exits_1(tmp_path: Path) -> None:
    code, out = run_cli(
        [
            "evaluate",
            *_sets(
                [
                    f"output_dir={tmp_path}",
                    f"data.data_dir={tmp_path / 'empty'}",
                    "data.modalities=[chest_xray, blood_cell]",
                    "evaluate.tasks=[zero_shot, linear_probe, vqa_closed]",
                ]
            ),
        ]
    )
    assert code == 1, out
    assert "Traceback" not in out
    assert "error: nothing measured: all 5 evaluation groups were skipped or failed" in out
    assert "pneumoniamnist" in out and "MEDSHIELD_DATA_DIR" in out
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_partial_evaluation_says_what_was_skipped_and_exits_0(
    tmp_path: Path, data_dir: Path
) -> None:
    partial = tmp_path / "data"  # MedMNIST is there, VQA-RAD is not
    partial.mkdir()
    (partial / "medmnist").symlink_to(data_dir / "medmnist")
    code, out = run_cli(
        [
            "evaluate",
            *_sets(
                [
                    f"output_dir={tmp_path}",
                    f"data.data_dir={partial}",
                    "data.modalities=[chest_xray]",
                    "evaluate.tasks=[zero_shot, vqa_closed]",
                    "evaluate.max_test_items=8",
                    "evaluate.bootstrap_resamples=10",
                ]
            ),
        ]
    )
    assert code == 0, out
    assert "1 of 2 evaluation groups skipped or failed; first reason: VQA-RAD file" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert list(results["evaluate"]["skipped"]) == ["vqa_closed/radiology"]


def test_redteam_against_an_unreachable_endpoint_exits_1(tmp_path: Path, data_dir: Path) -> None:
    kwargs = f"{{base_url: 'http://127.0.0.1:{closed_port()}/v1', model: m, max_retries: 0}}"
    args = [
        "redteam",
        "--model",
        "openai",
        "--attacks",
        "direct",
        "--judge",
        "keyword",
        "--limit",
        "2",
        *_sets(
            [
                f"model.kwargs={kwargs}",
                f"output_dir={tmp_path}",
                "modalities=[chest_xray]",
                "judge_agreement=false",
            ]
        ),
    ]
    code, out = run_cli(args)
    assert code == 1, out
    assert "Traceback" not in out
    assert "error: nothing measured: all 6 red-team rows were skipped or failed" in out
    assert "Connection refused" in out and "--retry-errors" in out
    rows = (tmp_path / "redteam" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 6  # 2 harmful, 2 benign, 2 near-miss; failed rows are kept for retries
    code, out = run_cli([*args, "--retry-errors"])  # still down: still nothing measured
    assert code == 1 and "nothing measured" in out


@pytest.mark.parametrize("tasks", ["[zero_shot, linear_probe]", "[robust_zero_shot]"])
def test_evaluating_a_model_with_nan_weights_is_a_clear_error(tmp_path: Path, tasks: str) -> None:
    from medshield.models import create_model, save_model

    model = create_model("mini-clip")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_model(model, tmp_path / "nan-model")
    code, out = run_cli(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "nan-model"),
            *_sets(
                [
                    f"output_dir={tmp_path}",
                    "data.modalities=[chest_xray]",
                    f"evaluate.tasks={tasks}",
                    "evaluate.max_test_items=8",
                    "evaluate.robust_max_items=4",
                    "evaluate.robust_attacks=[{name: pgd, steps: 1}]",
                ]
            ),
        ]
    )
    assert code == 2, out
    assert "Traceback" not in out and "Input contains NaN" not in out
    assert "the model gave NaN or infinite outputs" in out and "lower lr" in out
    assert not (tmp_path / "run" / "samples.jsonl").exists()  # no pred=0 rows from NaN scores


@pytest.mark.parametrize(
    "command, hint",
    [(["pretrain"], "interrupted; rerun the same command to resume"), (["report"], "interrupted")],
)
def test_ctrl_c_exits_130_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], hint: str
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("medshield.commands.workflows.run_pretrain", interrupted)
    monkeypatch.setattr("medshield.report.write_report", interrupted)
    args = [*_sets([f"output_dir={tmp_path}"])] if command == ["pretrain"] else [str(tmp_path)]
    code, out = run_cli([*command, *args])
    assert code == 130, out
    assert out.strip().splitlines()[-1] == hint
    assert "Traceback" not in out and "Aborted" not in out
