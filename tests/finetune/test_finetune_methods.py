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
from medshield.train.finetune.method import eval_roots, method_for, set_train_modes


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


@pytest.mark.parametrize(
    ("method", "batchnorm"), [("lora", "train"), ("adapter", "train"), ("tecoa", "frozen")]
)
def test_train_modes_keep_every_frozen_part_and_frozen_norm_in_eval_mode(
    base: MiniClip, train: TrainData, method: str, batchnorm: str
) -> None:
    clf = method_for(FineTuneConfig(method=method, batchnorm=batchnorm, **FAST)).build(
        copy.deepcopy(base), train.class_prompts
    )
    roots = eval_roots(clf, batchnorm)
    clf.eval()  # an attack or a validation pass left it so
    set_train_modes(clf, roots)
    for name, m in clf.named_modules():  # each module by the rule, not the listed roots
        frozen_norm = batchnorm == "frozen" and isinstance(m, torch.nn.BatchNorm2d)
        trainable = any(p.requires_grad for p in m.parameters())
        assert m.training == (trainable and not frozen_norm), name
    assert any(m.training for m in clf.modules()) and any(not m.training for m in clf.modules())
    assert len(roots) < sum(1 for _ in clf.modules())  # the top-most ones only
