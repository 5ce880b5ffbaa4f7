"""TeCoA at the reference settings (logit scale 100, PGD-10 of eps/4) and fare-probe (FARE,
then a linear probe on its frozen features)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from finetune_support import FAST, run_method

from medshield.errors import ConfigError
from medshield.models.mini_clip import MiniClip
from medshield.registry import METHODS
from medshield.train.finetune.config import AdversaryConfig, FineTuneConfig, parse_finetune_config
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.method import method_for
from medshield.train.finetune.tecoa import ScaledLogits


def test_training_adversary_defaults_to_pgd10_with_steps_of_eps_over_4() -> None:
    adversary = AdversaryConfig(eps=2)
    assert adversary.steps == 10 and adversary.step_size == pytest.approx(0.5)
    assert FineTuneConfig(method="tecoa").options.logit_scale == 100


def test_tecoa_trains_and_attacks_at_its_logit_scale(base: MiniClip, train: TrainData) -> None:
    cfg = FineTuneConfig(method="tecoa", **FAST)
    clf = method_for(cfg).build(copy.deepcopy(base), train.class_prompts).eval()
    images, labels = train.images[:4], train.labels[:4]
    with torch.no_grad():
        scaled = ScaledLogits(clf, 100.0)(images)
        cosine = clf.image_embeddings(images) @ clf.class_embeddings().T
    torch.testing.assert_close(scaled, 100 * cosine)
    assert clf.model.logit_scale.exp() < 50  # the model's own scale is not the training one
    losses = {}
    for scale in (100.0, 10.0):
        method = method_for(FineTuneConfig(method="tecoa", kwargs={"logit_scale": scale}, **FAST))
        torch.manual_seed(0)
        losses[scale] = float(method.loss(clf, images, labels)[0].detach())
    assert losses[100.0] != pytest.approx(losses[10.0])
    assert losses[100.0] > 0
    _, result = run_method(base, train, "tecoa", lr=1e-3, kwargs={"logit_scale": 100})
    assert result.report["history"][0]["loss"] > 0


def test_tecoa_refuses_a_non_positive_logit_scale() -> None:
    with pytest.raises(ConfigError, match="logit_scale"):
        parse_finetune_config({"method": "tecoa", "kwargs": {"logit_scale": 0}})


def _two_epochs(base: MiniClip, train: TrainData, method: str, **kwargs):
    return run_method(base, train, method, **{"epochs": 2, "lr": 1e-2, **kwargs})


def test_fare_probe_trains_fare_then_a_probe_on_its_frozen_features(
    base: MiniClip, train: TrainData
) -> None:
    assert "fare-probe" in METHODS.names()
    model, result = _two_epochs(base, train, "fare-probe", kwargs={"fare_epochs": 1})
    fare_model, _ = _two_epochs(base, train, "fare", epochs=1)
    image_side = [k for k in base.state_dict() if not k.startswith("text_tower.")]
    tuned, fare_state, ref = model.state_dict(), fare_model.state_dict(), base.state_dict()
    assert not torch.equal(tuned["image_proj.weight"], ref["image_proj.weight"])  # FARE ran
    for key in image_side:  # and the probe epoch left the tower as FARE's epoch left it
        torch.testing.assert_close(tuned[key], fare_state[key], msg=key)
    clf = result.classifier
    assert not torch.equal(clf.class_weight, clf.zero_shot_embeddings)  # the probe trained
    first, second = result.report["history"]
    assert first["loss"] > 0 and second["loss"] > 0


def test_fare_probes_fare_phase_leaves_the_head_alone(base: MiniClip, train: TrainData) -> None:
    cfg = FineTuneConfig(method="fare-probe", **{**FAST, "epochs": 2})
    method = method_for(cfg)
    clf = method.build(copy.deepcopy(base), train.class_prompts)
    method.prepare(clf, train)
    method.start_epoch(0, 2)
    loss, _ = method.loss(clf, train.images[:4], train.labels[:4])
    loss.backward()
    assert clf.class_weight.grad is None and clf.model.image_proj.weight.grad is not None
    clf.zero_grad(set_to_none=True)
    method.start_epoch(1, 2)
    loss, _ = method.loss(clf, train.images[:4], train.labels[:4])
    loss.backward()
    assert clf.class_weight.grad is not None and clf.model.image_proj.weight.grad is None
    expected = F.cross_entropy(
        clf.logits(clf.eval().image_embeddings(train.images[:4])), train.labels[:4]
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("epochs", "kwargs"), [(1, {}), (2, {"fare_epochs": 2}), (3, {"fare_epochs": 5})]
)
def test_fare_probe_without_probe_epochs_fails_before_training(
    base: MiniClip, train: TrainData, epochs: int, kwargs: dict
) -> None:
    with pytest.raises(ConfigError, match="leaves none for the linear probe"):
        _two_epochs(base, train, "fare-probe", epochs=epochs, kwargs=kwargs)


def test_fare_probe_splits_a_step_budget_by_passes(base: MiniClip, train: TrainData) -> None:
    # 8 items in batches of 4: 2 steps a pass; 3 steps make 2 passes, FARE on the first
    with pytest.raises(ConfigError, match="FARE for 1 of the 1 passes"):
        run_method(base, train, "fare-probe", epochs=None, steps=2, batch_size=4)
    _, result = run_method(
        base, train, "fare-probe", epochs=None, steps=3, batch_size=4, log_every=1
    )
    assert [h["epoch"] for h in result.report["history"]] == [0, 0, 1]


def test_fare_probe_trains_its_head_at_probe_lr(base: MiniClip, train: TrainData) -> None:
    cfg = FineTuneConfig(
        method="fare-probe", kwargs={"probe_lr": 1e-2}, **{**FAST, "epochs": 2, "lr": 1e-9}
    )
    method = method_for(cfg)
    clf = method.build(copy.deepcopy(base), train.class_prompts)
    trainable = [p for p in clf.parameters() if p.requires_grad]
    tower, head = method.param_groups(clf, trainable)
    assert "lr" not in tower and head["lr"] == 1e-2
    assert {id(p) for p in head["params"]} == {id(clf.class_weight), id(clf.bias)}
    assert len(tower["params"]) + 2 == len(trainable)
    model, result = _two_epochs(base, train, "fare-probe", lr=1e-9, kwargs={"probe_lr": 1e-2})
    clf = result.classifier
    moved = (clf.class_weight - clf.zero_shot_embeddings).abs().max()
    tower_moved = (model.image_proj.weight - base.image_proj.weight).abs().max()
    assert moved > 1e-3 > 1e-6 > tower_moved


def _batchnorm_stats(model: MiniClip) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("method", ["tecoa", "full"])
def test_batchnorm_frozen_keeps_the_pretrained_statistics_and_trains_the_rest(
    base: MiniClip, train: TrainData, method: str
) -> None:
    before = _batchnorm_stats(base)
    assert before  # the tower has BatchNorm layers to freeze
    trained, _ = run_method(base, train, method, lr=1e-3)
    after = _batchnorm_stats(trained)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    frozen, _ = run_method(base, train, method, lr=1e-3, batchnorm="frozen")
    assert all(torch.equal(a, b) for a, b in zip(before, _batchnorm_stats(frozen), strict=True))
    norms = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    base_norms = [m for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(norms, base_norms, strict=True))


def test_batchnorm_setting_is_one_of_two_names() -> None:
    assert FineTuneConfig(method="tecoa").batchnorm == "train"
    with pytest.raises(ConfigError, match="batchnorm"):
        parse_finetune_config({"method": "tecoa", "batchnorm": "eval"})
