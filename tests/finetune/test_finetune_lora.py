"""LoRA through peft: both towers' adapted modules get gradients and change; merge; save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from finetune_support import FAST, run_method

from medshield.models.mini_clip import MiniClip
from medshield.train.finetune import load_finetuned, save_finetuned
from medshield.train.finetune.config import FineTuneConfig
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.method import method_for


def test_lora_modules_in_both_towers_get_gradients_and_change(
    base: MiniClip, train: TrainData, tmp_path: Path
) -> None:
    model = copy.deepcopy(base)
    cfg = FineTuneConfig(method="lora", **FAST)
    clf = method_for(cfg).build(model, train.class_prompts)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    text_b = "model.text_tower.encoder.layer.0.attention.self.query.lora_B.default.weight"
    image_b = "model.image_tower._blocks.1._expand_conv.lora_B.default.weight"
    assert {text_b, image_b} <= trainable
    clf.train()
    # lora_B starts at zero, so the first gradient reaches lora_B only; then A moves too
    torch.nn.functional.cross_entropy(clf(train.images[:4]), train.labels[:4]).backward()
    grads = dict(clf.named_parameters())
    assert grads[text_b].grad.abs().sum() > 0 and grads[image_b].grad.abs().sum() > 0

    model, result = run_method(base, train, "lora", lr=1e-2)
    state = result.classifier.state_dict()
    assert state[text_b].abs().sum() > 0 and state[image_b].abs().sum() > 0
    assert result.report["trainable_params"] == sum(
        p.numel() for n, p in result.classifier.named_parameters() if "lora_" in n
    )
    # merged after training: no inference overhead, and it saves and loads back exactly
    assert result.report["overhead"]["flops_ratio"] == pytest.approx(1.0)
    save_finetuned(result, tmp_path / "lora")
    loaded, meta = load_finetuned(tmp_path / "lora", model=copy.deepcopy(base))
    assert meta["structure"] == {"merged": True}
    with torch.no_grad():
        torch.testing.assert_close(loaded(train.images[:2]), result.classifier(train.images[:2]))
    # the text tower's LoRA changed the class embeddings: no stale cached text features
    assert not torch.allclose(
        result.classifier.class_weight, result.classifier.zero_shot_embeddings
    )
