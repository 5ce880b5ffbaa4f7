"""Fine-tuning on a chosen device: the ``device`` setting is checked when the config is read,
kept out of the run's identity (a run resumes on another device), and, where a GPU is visible,
every method trains, saves, reloads and is attacked on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from bad_input_support import run_cli
from finetune_support import TINY_EVAL, run_config, run_method

from medshield.commands.finetune import load_finetune_config, run_finetune
from medshield.config import dump_config
from medshield.device import resolve_device
from medshield.errors import ConfigError
from medshield.models.mini_clip import MiniClip
from medshield.runs import Run
from medshield.train.finetune import load_finetuned, save_finetuned
from medshield.train.finetune.data import TrainData

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
METHODS = ("linear-probe", "full", "lora", "adapter", "tecoa", "fare", "ran")


def test_device_names_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    for bad in ("gpu", "cuda:x", "CUDA", "tpu"):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            load_finetune_config(None, [f"device={bad}"])
    assert load_finetune_config(None, ["device=cuda:1"]).device == "cuda:1"
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_without_one_fails_before_training(tmp_path: Path, data_dir: Path) -> None:
    cfg = run_config(tmp_path, data_dir, device="cuda")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        run_finetune(cfg, Run(tmp_path / "ft", cfg))
    assert not (tmp_path / "ft" / "finetuned").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_study_asking_for_a_gpu_without_one_fails_before_any_cell(tmp_path: Path) -> None:
    code, out = run_cli(
        ["study", "finetune", "--set", f"output_dir={tmp_path}", "--set", "device=cuda"]
    )
    assert code == 2 and "Traceback" not in out, out
    assert "error: device 'cuda' asked for, but torch sees no CUDA GPU here" in out
    assert list(tmp_path.iterdir()) == []  # no study folder, no cell


def test_the_device_is_not_part_of_a_runs_identity(tmp_path: Path, data_dir: Path) -> None:
    on_cpu = run_config(tmp_path, data_dir, device="cpu")
    elsewhere = run_config(tmp_path, data_dir, device="cuda:3")
    assert "device" not in yaml.safe_load(dump_config(on_cpu))
    assert dump_config(on_cpu) == dump_config(elsewhere)
    result = run_finetune(on_cpu, Run(tmp_path / "ft", on_cpu), log=lambda _: None)
    assert result["device"] == "cpu"
    Run(tmp_path / "ft", elsewhere)  # same run: no "different config" error


@CUDA
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_saves_and_reloads_on_the_gpu(
    base: MiniClip, train: TrainData, method: str, tmp_path: Path
) -> None:
    _, result = run_method(base, train, method, device="cuda")
    assert next(result.classifier.parameters()).device.type == "cuda"
    assert all(v.device.type == "cpu" for v in result.base_state.values())
    assert result.report["overhead"]["latency_s"] > 0
    save_finetuned(result, tmp_path / "saved")
    loaded, _ = load_finetuned(tmp_path / "saved", model=base)
    images = train.images[:4]
    with torch.no_grad():
        on_gpu = result.classifier.eval()(images.cuda()).cpu()
        on_cpu = loaded.eval()(images)
    # cuDNN runs convolutions in TF32 by default: logits (up to ~14) agree to ~1e-3, not 1e-5
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-2, rtol=1e-2)


@CUDA
@pytest.mark.parametrize("task", ["chest_xray", "vqa_rad_closed"])
def test_a_finetune_run_evaluates_on_the_gpu(tmp_path: Path, data_dir: Path, task: str) -> None:
    cfg = run_config(
        tmp_path,
        data_dir,
        modality=task,
        device="cuda",
        finetune={"method": "ran", "epochs": 1, "max_train_items": 8, "batch_size": 8},
        robust=TINY_EVAL,
    )
    result = run_finetune(cfg, Run(tmp_path / "ft", cfg), log=lambda _: None)
    assert result["device"].startswith("cuda")
    assert 0 <= result["metrics"]["clean_accuracy"]["value"] <= 1
    assert any(k.startswith("robust_accuracy/") for k in result["metrics"])
