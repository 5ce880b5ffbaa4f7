"""Shared by the fine-tuning tests: the fastest settings and a one-call fine-tune."""

from __future__ import annotations

import copy
from typing import Any

from medshield.models.mini_clip import MiniClip
from medshield.train.finetune import finetune
from medshield.train.finetune.common import TrainData

FAST = {"max_train_items": 8, "batch_size": 8, "adversary": {"eps": 2, "steps": 1}}
TINY_MODEL = {
    "backend": "mini-clip",
    "kwargs": {"embed_dim": 32, "image_size": 32, "pretrained": False},
}
TINY_EVAL = {
    "eps": [2],
    "pgd_steps": [1, 2],
    "restarts": 1,
    "apgd_steps": 2,
    "max_test_items": 4,
    "batch_size": 4,
    "bootstrap_resamples": 20,
}


def run_method(base: MiniClip, train: TrainData, method: str, **extra: Any):
    """Fine-tune a copy of ``base`` with ``method`` on ``train``; (model, result)."""
    model = copy.deepcopy(base)
    cfg = {**FAST, "method": method, **extra}
    result = finetune(
        model, cfg, train.modality, train=train, overhead_batch=2, latency_repeats=1, progress=False
    )
    return model, result
