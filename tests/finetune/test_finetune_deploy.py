"""The evaluation copy of a fine-tuned classifier (issue 22): LoRA merged and unwrapped,
BatchNorm folded into the convolutions, channels_last; the same function as the original. Its
text-free form is what the training adversaries attack."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from finetune_support import FAST, run_method
from peft.tuners.lora import LoraLayer
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.models.base import eval_mode
from medshield.models.mini_clip import MiniClip, fold_batchnorm
from medshield.train.finetune import trades
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.config import FineTuneConfig
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.deploy import LeftOut, evaluation_copy
from medshield.train.finetune.method import count_parameters, method_for
from medshield.train.finetune.trades import TradesOptions


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


def _perturbed_adv_lora(base: MiniClip, items: TrainData) -> FineTunedClassifier:
    """An ``adv-lora`` classifier as it is in the middle of training: LoRA not merged, its
    factors moved from zero, train mode."""
    cfg = FineTuneConfig(method="adv-lora", kwargs={"rank": 4, "pgd_steps": 1}, **FAST)
    clf = method_for(cfg).build(copy.deepcopy(base), items.class_prompts)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in clf.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    clf.refresh_class_embeddings()
    return clf.train()


def test_the_copy_for_image_attacks_leaves_the_text_tower_out(
    trained_base: MiniClip, train: TrainData
) -> None:
    clf = _perturbed_adv_lora(trained_base, train)
    flags = {name: p.requires_grad for name, p in clf.named_parameters()}
    current = evaluation_copy(clf, text_tower=False)

    images = train.images[:6]
    with eval_mode(clf):
        logits, grad = logits_and_input_grad(clf, images)
    new_logits, new_grad = logits_and_input_grad(current, images)
    torch.testing.assert_close(new_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_grad, grad, rtol=1e-3, atol=1e-5 * grad.abs().max().item())

    stages = clf.model.text_blocks()
    assert all(isinstance(s, LeftOut) for s in current.model.text_blocks())
    assert len(current.model.text_blocks()) == len(stages)
    text_weights = sum(p.numel() for s in stages for p in s.parameters())
    assert count_parameters(current) <= count_parameters(clf) - text_weights
    assert not any(p.requires_grad for p in current.parameters())
    with pytest.raises(RuntimeError, match="leaves the text tower out"):
        current.model.encode_text(["a new prompt"])
    # the original keeps its text tower, modes and trainable flags
    assert clf.training and clf.model.text_blocks() == stages
    assert {name: p.requires_grad for name, p in clf.named_parameters()} == flags


def test_the_copy_for_image_attacks_answers_the_current_questions(
    base: MiniClip, vqa_train: TrainData
) -> None:
    clf = _perturbed_adv_lora(base, vqa_train)
    clf.set_questions(vqa_train.questions[:3])
    current = evaluation_copy(clf, text_tower=False)
    images = vqa_train.images[:3]
    with torch.no_grad(), eval_mode(clf):
        torch.testing.assert_close(current(images), clf(images), rtol=1e-4, atol=1e-4)


def test_the_trades_adversary_runs_on_a_copy_and_leaves_the_classifier_as_it_is(
    base: MiniClip, train: TrainData, monkeypatch: pytest.MonkeyPatch
) -> None:
    clf = _perturbed_adv_lora(base, train)
    attacked: list[nn.Module] = []
    monkeypatch.setattr(PGD, "perturb", _recording(PGD.perturb, attacked))
    wrapped = sum(isinstance(m, LoraLayer) for m in clf.modules())
    images = train.images[:4]
    adv = trades.trades_adversary(clf, images, 2 / 255, TradesOptions(pgd_steps=2))

    assert len(attacked) == 1 and attacked[0] is not clf
    assert not any(isinstance(m, (LoraLayer, nn.BatchNorm2d)) for m in attacked[0].modules())
    assert (adv - images).abs().max() <= 2 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, images)
    assert clf.training and sum(isinstance(m, LoraLayer) for m in clf.modules()) == wrapped


@pytest.mark.parametrize("method", ["adv-lora", "ran", "tecoa", "fare"])
def test_every_training_adversary_attacks_a_copy_in_inference_form(
    base: MiniClip, train: TrainData, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    cfg = FineTuneConfig(method=method, **FAST)
    trainer = method_for(cfg)
    clf = trainer.build(copy.deepcopy(base), train.class_prompts)
    trainer.prepare(clf, train)
    attacked: list[nn.Module] = []
    monkeypatch.setattr(PGD, "perturb", _recording(PGD.perturb, attacked))
    loss, _ = trainer.loss(clf.train(), train.images[:4], train.labels[:4])
    loss.backward()

    own = {id(p) for p in clf.parameters()}
    assert len(attacked) == 1
    assert not own & {id(p) for p in attacked[0].parameters()}  # a copy, not the classifier
    assert not any(isinstance(m, (LoraLayer, nn.BatchNorm2d)) for m in attacked[0].modules())
    assert any(p.grad is not None for p in clf.parameters())  # the loss still trains clf


def _recording(perturb: Any, attacked: list[nn.Module]) -> Any:
    def record(self: PGD, *args: Any, **kwargs: Any) -> torch.Tensor:
        attacked.append(self.model)
        return perturb(self, *args, **kwargs)

    return record
