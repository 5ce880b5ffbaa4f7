"""The evaluation copy of a fine-tuned classifier (issue 22): LoRA merged and unwrapped,
BatchNorm folded into the convolutions, channels_last; the same function as the original."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from finetune_support import run_method
from peft.tuners.lora import LoraLayer
from torch import nn

from medshield.models.mini_clip import MiniClip, fold_batchnorm
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.deploy import evaluation_copy


@pytest.fixture(scope="module")
def trained_base(base: MiniClip) -> MiniClip:
    """``base`` with BatchNorm statistics and affine weights far from their initial 0 / 1, so a
    wrong fold shows."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    for bn in model.image_tower.modules():
        if isinstance(bn, nn.BatchNorm2d):
            shape = bn.running_mean.shape
            bn.running_mean.copy_(0.3 * torch.randn(shape, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            bn.weight.data.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
            bn.bias.data.copy_(0.2 * torch.randn(shape, generator=generator))
    return model


def logits_and_input_grad(classifier: nn.Module, images: torch.Tensor):
    x = images.clone().requires_grad_(True)
    logits = classifier(x)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    return logits.detach(), grad


METHODS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {"kwargs": {"rank": 4}}),  # merged after training, wrappers kept
    ("lora", {"kwargs": {"rank": 4, "merge": False}}),  # not merged: the copy merges
    ("adapter", {}),
    ("ran", {}),
    ("tecoa", {}),  # every weight trained, BatchNorm statistics moved
]


@pytest.mark.parametrize(
    ("method", "extra"), METHODS, ids=["lora", "lora-unmerged", "adapter", "ran", "tecoa"]
)
def test_evaluation_copy_computes_the_same_logits_and_gradients(
    trained_base: MiniClip, train: TrainData, method: str, extra: dict[str, Any]
) -> None:
    _, result = run_method(trained_base, train, method, **extra)
    classifier = result.classifier.eval()
    wrapped = sum(isinstance(m, LoraLayer) for m in classifier.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in classifier.modules())
    deployed = evaluation_copy(classifier)

    images = train.images[:6]
    logits, grad = logits_and_input_grad(classifier, images)
    new_logits, new_grad = logits_and_input_grad(deployed, images)
    torch.testing.assert_close(new_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_grad, grad, rtol=1e-3, atol=1e-5 * grad.abs().max().item())

    assert not any(isinstance(m, (LoraLayer, nn.BatchNorm2d)) for m in deployed.modules())
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not {id(p) for p in deployed.parameters()} & {id(p) for p in classifier.parameters()}
    # the original is untouched: its wrappers and BatchNorm layers are still there
    assert sum(isinstance(m, LoraLayer) for m in classifier.modules()) == wrapped
    assert sum(isinstance(m, nn.BatchNorm2d) for m in classifier.modules()) == norms > 0
    if method == "lora":
        assert wrapped > 0


def test_fold_batchnorm_folds_every_pair_in_eval_mode_and_none_in_train_mode(
    trained_base: MiniClip,
) -> None:
    images = torch.rand(4, 3, 32, 32)
    tower = copy.deepcopy(trained_base.image_tower).train()
    assert fold_batchnorm(tower) == 0  # train mode: the statistics still move
    tower.eval()
    with torch.no_grad():
        before = tower.extract_features(images)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in tower.modules())
    assert fold_batchnorm(tower) == pairs == 49
    assert fold_batchnorm(tower) == 0  # nothing left to fold
    with torch.no_grad():
        torch.testing.assert_close(tower.extract_features(images), before, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_a_hooked_pair_and_refuses_another_tower(
    trained_base: MiniClip,
) -> None:
    tower = copy.deepcopy(trained_base.image_tower).eval()
    tower._bn0.register_forward_hook(lambda module, args, output: output)
    folded = fold_batchnorm(tower)
    assert isinstance(tower._bn0, nn.BatchNorm2d)  # its hook would be lost: left as it is
    assert folded == 48
    with pytest.raises(TypeError, match="EfficientNet"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
