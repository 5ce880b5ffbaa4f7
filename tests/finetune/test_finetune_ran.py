"""RAN: linear rectifier folds (same logits, params, FLOPs), MLP FLOPs < 2%, ablation, save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from finetune_support import FAST, run_method

from medshield.errors import DataError
from medshield.models.base import ZeroShotClassifier
from medshield.models.mini_clip import MiniClip
from medshield.train.finetune import (
    FineTunedClassifier,
    count_flops,
    load_finetuned,
    save_finetuned,
)
from medshield.train.finetune.common import (
    FineTuneConfig,
    TrainData,
    method_for,
)
from medshield.train.finetune.ran import LinearRectifier, fold_linear_rectifier


def test_ran_linear_rectifier_folds_with_same_logits_params_and_flops(
    base: MiniClip, train: TrainData
) -> None:
    cfg = FineTuneConfig(method="ran", kwargs={"rectifier": "linear", "rank": 8}, **FAST)
    clf: FineTunedClassifier = method_for(cfg).build(copy.deepcopy(base), train.class_prompts)
    assert isinstance(clf.rectifier, LinearRectifier)
    torch.manual_seed(1)
    with torch.no_grad():
        clf.rectifier.up.normal_(0, 0.3)
    x = train.images[:3]
    with torch.no_grad():
        before = clf.eval()(x)
        fold_linear_rectifier(clf)
        after = clf(x)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert clf.rectifier is None
    assert sum(p.numel() for p in clf.model.parameters()) == sum(
        p.numel() for p in base.parameters()
    )
    zero_shot = ZeroShotClassifier(base, train.class_prompts)
    assert count_flops(clf, x) == count_flops(zero_shot, x)


def test_ran_mlp_costs_under_two_percent_flops_and_ablation_drops_terms(
    base: MiniClip, train: TrainData
) -> None:
    _, result = run_method(base, train, "ran", ran={"svd": 0, "contrastive": 0})
    ratio = result.report["overhead"]["flops_ratio"]
    assert 1.0 < ratio < 1.02
    parts = set(result.report["history"][0])
    assert {"task_clean", "task_adv", "keep", "align", "cov"} <= parts
    assert not {"svd", "contrastive"} & parts
    # RAN's trainable parameters stay below LoRA's
    lora_cfg = FineTuneConfig(method="lora", **FAST)
    lora = method_for(lora_cfg).build(copy.deepcopy(base), train.class_prompts)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert result.report["trainable_params"] < n_lora


def test_save_and_load_round_trip_and_refuse_another_base(
    base: MiniClip, train: TrainData, tmp_path: Path
) -> None:
    _, result = run_method(base, train, "ran", kwargs={"rectifier": "linear"}, lr=1e-2)
    save_finetuned(result, tmp_path / "ran")
    loaded, meta = load_finetuned(tmp_path / "ran", model=copy.deepcopy(base))
    assert meta["method"] == "ran" and meta["structure"] == {"folded": True}
    with torch.no_grad():
        torch.testing.assert_close(loaded(train.images[:3]), result.classifier(train.images[:3]))
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.image_proj.weight.add_(0.1)
    with pytest.raises(DataError, match="not the one"):
        load_finetuned(tmp_path / "ran", model=other)
    with pytest.raises(DataError, match="missing"):
        load_finetuned(tmp_path / "nothing-here", model=base)
