"""Shared by the fine-tuning tests: the fastest settings and a one-call fine-tune."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from medshield.commands.finetune.config import FineTuneRunConfig
from medshield.models.mini_clip import MiniClip
from medshield.train.finetune import finetune
from medshield.train.finetune.data import TrainData

FAST = {"epochs": 1, "max_train_items": 8, "batch_size": 8, "adversary": {"eps": 2, "steps": 1}}
TINY_MODEL = {
    "backend": "mini-clip",
    "kwargs": {"embed_dim": 32, "image_size": 32, "pretrained": False},
}
TINY_EVAL = {
    "eps": [2],
    "attacks": [
        {"name": "pgd", "steps": 1},
        {"name": "pgd", "steps": 2},
        {"name": "apgd-ce", "steps": 2},
        {"name": "apgd-dlr", "steps": 2},
    ],
    "max_test_items": 4,
    "batch_size": 4,
    "bootstrap_resamples": 20,
    "retrieval_per_class_cap": 2,
    "retrieval_attack_kwargs": {"eps": 2, "steps": 2, "max_edits": 1},
}


def run_method(base: MiniClip, train: TrainData, method: str, device: str = "cpu", **extra: Any):
    """Fine-tune a copy of ``base`` with ``method`` on ``train`` (``extra``: config fields);
    (model, result)."""
    model = copy.deepcopy(base)
    cfg = {**FAST, "method": method, **extra}
    result = finetune(
        model,
        cfg,
        train.modality,
        train=train,
        overhead_batch=2,
        latency_repeats=1,
        progress=False,
        device=device,
    )
    return model, result


def run_config(tmp_path: Path, data_dir: Path, **extra: Any) -> FineTuneRunConfig:
    """A tiny ``medshield finetune`` config (linear probe on chest X-ray); ``extra`` replaces
    top-level fields."""
    raw = {
        "name": "ft",
        "output_dir": str(tmp_path),
        "modality": "chest_xray",
        "data_dir": str(data_dir),
        "model": TINY_MODEL,
        "finetune": {**FAST, "method": "linear-probe"},
        "robust": TINY_EVAL,
        **extra,
    }
    return FineTuneRunConfig.model_validate(raw)


def write_study_config(tmp_path: Path, data_dir: Path, **extra: Any) -> Path:
    """A tiny study config file (one seed, the base model, fast attacks); ``extra`` replaces
    top-level fields."""
    raw = {
        "name": "study",
        "output_dir": str(tmp_path),
        "data_dir": str(data_dir),
        "model": TINY_MODEL,
        "checkpoints": {"base": None},
        "seeds": [0],
        "finetune": FAST,
        "robust": {**TINY_EVAL, "attacks": [{"name": "pgd", "steps": 1}]},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(raw))
    return path


def timed_cell(raw: dict[str, Any], path: str, log: Any = None) -> None:
    """A stand-in for a study cell (module level, so spawned workers can run it): it sleeps
    ``raw["seed"] / 10`` seconds (0 to 9: 0 to 0.9 s; 30 for 3 s) and writes its start and end
    times (epoch seconds) to ``<path>.json``; a negative seed raises."""
    import time

    if raw["seed"] < 0:
        raise ValueError(f"cell {path} failed")
    start = time.time()
    time.sleep(raw["seed"] / 10)
    Path(f"{path}.json").write_text(json.dumps({"start": start, "end": time.time()}))
