"""Fixtures of the fine-tuning tests: a tiny random mini-clip, a small chest X-ray set and a
small set of VQA-RAD closed yes/no questions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medshield.models.mini_clip import MiniClip
from medshield.train.finetune.data import VQA_TASK, TrainData, load_train_data

torch.set_num_threads(1)  # the suite shares two cores


@pytest.fixture(scope="module")
def base() -> MiniClip:
    torch.manual_seed(0)
    return MiniClip(embed_dim=64, image_size=32, pretrained=False).eval()


@pytest.fixture(scope="module")
def train(data_dir: Path) -> TrainData:
    return load_train_data("chest_xray", 8, seed=0, data_dir=data_dir)


@pytest.fixture(scope="module")
def vqa_train(data_dir: Path) -> TrainData:
    return load_train_data(VQA_TASK, 8, seed=0, data_dir=data_dir)
