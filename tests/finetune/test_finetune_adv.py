"""The adv-* baselines: registered, train on RAN's TRADES objective through the same functions
RAN uses (a non-zero KL term in the log), keep their clean namesake's trainable parameters, and
refuse a config without an adversary before training; the new baselines (with TeCoA and
fare-probe) train on a modality and on the VQA task and save and load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_support import FAST, run_method

from medshield.errors import ConfigError
from medshield.models.mini_clip import MiniClip
from medshield.registry import METHODS
from medshield.train.finetune import adv, load_finetuned, ran, save_finetuned, trades
from medshield.train.finetune.classifier import prompt_embeddings
from medshield.train.finetune.config import FineTuneConfig, parse_finetune_config
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.method import method_for

ADV = ("adv-lora", "adv-adapter", "adv-linear-probe")
QUICK = {"pgd_steps": 1}


def test_adv_methods_register_with_rans_adversary_defaults() -> None:
    ran_options = FineTuneConfig(method="ran").options
    for name in ADV:
        assert name in METHODS.names()
        options = FineTuneConfig(method=name).options
        for field in ("beta", "pgd_steps", "pgd_step"):
            assert getattr(options, field) == getattr(ran_options, field), (name, field)
    assert ran_options.pgd_steps == 5 and ran_options.pgd_step == 0.25


def test_ran_and_the_adv_methods_share_one_objective_and_adversary() -> None:
    assert ran.trades_kl is trades.trades_kl
    assert ran.trades_adversary is trades.trades_adversary
    assert adv.trades_loss is trades.trades_loss
    assert issubclass(ran.RANOptions, trades.TradesOptions)
    assert issubclass(adv.AdvOptions, trades.TradesOptions)


@pytest.mark.parametrize(
    ("method", "clean"),
    [("adv-lora", "lora"), ("adv-adapter", "adapter"), ("adv-linear-probe", "linear-probe")],
)
def test_adv_method_trains_its_namesakes_parameters_with_a_nonzero_kl(
    base: MiniClip, train: TrainData, method: str, clean: str
) -> None:
    _, result = run_method(base, train, method, lr=1e-2, kwargs=QUICK)
    _, reference = run_method(base, train, clean, lr=1e-2)
    assert result.report["trainable_params"] == reference.report["trainable_params"]
    epoch = result.report["history"][0]
    assert epoch["kl"] > 0 and epoch["task_clean"] > 0
    assert epoch["loss"] == pytest.approx(epoch["task_clean"] + 6.0 * epoch["kl"], rel=1e-5)
    assert result.report["overhead"]["flops_ratio"] == reference.report["overhead"]["flops_ratio"]


def test_adv_linear_probe_loss_is_clean_ce_plus_beta_kl_of_the_trades_adversary(
    base: MiniClip, train: TrainData
) -> None:
    cfg = FineTuneConfig(method="adv-linear-probe", kwargs={"beta": 2.0, **QUICK}, **FAST)
    method = method_for(cfg)
    clf = method.build(copy.deepcopy(base), train.class_prompts)
    images, labels = train.images[:4], train.labels[:4]
    torch.manual_seed(3)
    loss, parts = method.loss(clf, images, labels)
    torch.manual_seed(3)
    adv_images = trades.trades_adversary(clf, images, cfg.adversary.eps, cfg.options)
    assert not torch.equal(adv_images, images)
    assert (adv_images - images).abs().max() <= cfg.adversary.eps / 255 + 1e-6
    clean_logits = clf(images)
    kl = trades.trades_kl(clf(adv_images), F.log_softmax(clean_logits, dim=-1)).mean()
    expected = F.cross_entropy(clean_logits, labels) + 2.0 * kl
    torch.testing.assert_close(loss, expected)
    assert parts["kl"] == pytest.approx(float(kl.detach())) and parts["kl"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pgd_steps": 0}, "pgd_steps must be at least 1"),
        ({"beta": 0}, "an adv-\\* method trains against its adversary"),
        ({"beta": -1}, "beta must be >= 0"),
        ({"pgd_step": 0}, "pgd_step is a fraction of eps"),
        ({"rank": 4}, "Extra inputs are not permitted"),
    ],
)
def test_adv_method_without_an_adversary_is_a_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_finetune_config({"method": "adv-linear-probe", "kwargs": kwargs})


def test_adv_method_with_eps_zero_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="eps"):
        parse_finetune_config({"method": "adv-lora", "adversary": {"eps": 0}})


def test_adv_lora_keeps_loras_options() -> None:
    options = parse_finetune_config(
        {"method": "adv-lora", "kwargs": {"rank": 4, "beta": 1}}
    ).options
    assert options.rank == 4 and options.beta == 1 and options.merge


@pytest.mark.parametrize(
    ("method", "kwargs", "epochs"),
    [
        ("adv-lora", {"rank": 2, **QUICK}, 1),
        ("adv-adapter", QUICK, 1),
        ("tecoa", {}, 1),
        ("fare-probe", {}, 2),
    ],
)
@pytest.mark.parametrize("task", ["train", "vqa_train"])
def test_new_baselines_train_on_both_task_kinds_and_round_trip(
    base: MiniClip,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    method: str,
    kwargs: dict,
    epochs: int,
    task: str,
) -> None:
    items: TrainData = request.getfixturevalue(task)
    _, result = run_method(base, items, method, kwargs=kwargs, lr=1e-2, epochs=epochs)
    assert all(epoch["loss"] > 0 for epoch in result.report["history"])
    save_finetuned(result, tmp_path / method)
    loaded, _ = load_finetuned(tmp_path / method, model=copy.deepcopy(base))
    x, clf = items.images[:4], result.classifier
    if items.questions is not None:
        for c in (clf, loaded):
            c.set_questions(items.questions[:4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clf(x))


def test_the_adversary_of_a_live_head_sees_the_current_text_tower(
    base: MiniClip, train: TrainData
) -> None:
    cfg = FineTuneConfig(method="adv-lora", kwargs=QUICK, **FAST)
    clf = method_for(cfg).build(copy.deepcopy(base), train.class_prompts)
    with torch.no_grad():
        for name, p in clf.model.named_parameters():
            if "text_tower" in name and "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    stale = clf.class_weight.clone()
    trades.trades_adversary(clf, train.images[:2], cfg.adversary.eps, cfg.options)
    assert not torch.allclose(clf.class_weight, stale)
    with torch.no_grad():
        current = prompt_embeddings(clf.eval().model, train.class_prompts)
    torch.testing.assert_close(clf.class_weight, current)
