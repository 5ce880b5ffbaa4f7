"""Adapters, linear probe, TeCoA and FARE: what trains, what stays frozen, reports."""

from __future__ import annotations

import copy

import pytest
import torch
from finetune_support import FAST, run_method

from medshield.models.base import ZeroShotClassifier
from medshield.models.mini_clip import MiniClip
from medshield.train.finetune.config import FineTuneConfig
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.method import method_for


def test_adapters_train_in_both_towers_and_start_as_identity(
    base: MiniClip, train: TrainData
) -> None:
    model = copy.deepcopy(base)
    clf = method_for(FineTuneConfig(method="adapter", **FAST)).build(model, train.class_prompts)
    with torch.no_grad():
        expected = ZeroShotClassifier(base, train.class_prompts)(train.images[:2])
        torch.testing.assert_close(clf.eval()(train.images[:2]), expected, atol=1e-4, rtol=1e-4)
    _, result = run_method(base, train, "adapter", lr=1e-2)
    state = result.classifier.state_dict()
    ups = [k for k in state if k.endswith("adapter.up.weight")]
    assert any("image_tower" in k for k in ups) and any("text_tower" in k for k in ups)
    assert all(state[k].abs().sum() > 0 for k in ups)
    assert result.report["overhead"]["flops_ratio"] > 1.0


def test_linear_probe_trains_only_the_head(base: MiniClip, train: TrainData) -> None:
    model, result = run_method(base, train, "linear-probe", lr=1e-2)
    k, d = len(train.class_prompts), base.embed_dim
    assert result.report["trainable_params"] == k * d + k
    assert all(torch.equal(base.state_dict()[n], v) for n, v in model.state_dict().items())
    assert result.report["overhead"]["flops_ratio"] == pytest.approx(1.0)
    assert result.report["train_wall_s"] > 0 and result.report["history"][0]["loss"] > 0


def test_tecoa_and_fare_train_the_image_side_only(base: MiniClip, train: TrainData) -> None:
    for method in ("tecoa", "fare"):
        model, result = run_method(base, train, method, lr=1e-3)
        state = model.state_dict()
        ref = base.state_dict()
        assert not torch.equal(state["image_proj.weight"], ref["image_proj.weight"]), method
        text_keys = [k for k in ref if k.startswith("text_tower.")]
        assert all(torch.equal(state[k], ref[k]) for k in text_keys), method
        assert result.report["history"][0]["loss"] > 0
