"""Pretrain mini-clip's heads briefly and save the resulting weights.

Run directly (one process) or under ``accelerate launch --num_processes 2`` by
tests/test_pretrain.py, which checks both give the same weights.

Usage: python ddp_pretrain.py OUTPUT_DIR
"""

import os
import sys
from pathlib import Path

import safetensors.torch
import torch

from medshield.config import PretrainConfig
from medshield.data import ImageCaptionDataset
from medshield.models import create_model
from medshield.train.pretrain import pretrain

out = Path(sys.argv[1])
torch.manual_seed(0)
model = create_model("mini-clip")
data = ImageCaptionDataset(["chest_xray", "blood_cell"], split="val", per_class_cap=4, seed=0)
config = PretrainConfig(
    epochs=2, batch_size=8, lr=1e-2, image_layers=0, text_layers=0, warmup_fraction=0.0
)
pretrain(model, data, config, out / "checkpoints", seed=0, progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    heads = {
        "image_proj": model.image_proj.weight,
        "text_proj": model.text_proj.weight,
        "logit_scale": model.logit_scale.detach().reshape(1),
    }
    tensors = {k: v.detach().contiguous() for k, v in heads.items()}
    safetensors.torch.save_file(tensors, out / "heads.safetensors")
