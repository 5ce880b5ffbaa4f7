"""``adv-lora``, ``adv-adapter``, ``adv-linear-probe``: the fair adversarial baselines of RAN.

Each is its clean namesake (:mod:`~medshield.train.finetune.lora`,
:mod:`~medshield.train.finetune.adapter`, :mod:`~medshield.train.finetune.linear_probe`: the same
trainable parameters, head and merge) trained on RAN's noise-aware objective instead of the
clean cross-entropy: TRADES, clean cross-entropy + ``beta`` x KL(adversarial || clean), with
the same PGD adversary and the same defaults as RAN (:mod:`medshield.train.finetune.trades`,
one function for all of them). What they lack is RAN's dynamic re-alignment and contrastive
disentanglement, so a comparison with RAN isolates those parts from adversarial training.

An ``adv-*`` method needs its adversary: ``beta`` 0 (no adversarial term) is refused, as is
``pgd_steps`` 0 (by :class:`~medshield.train.finetune.trades.TradesOptions`).
"""

from __future__ import annotations

import torch
from pydantic import model_validator
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.registry import METHODS
from medshield.train.finetune.adapter import Adapter, AdapterOptions
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.linear_probe import LinearProbe
from medshield.train.finetune.lora import Lora, LoraOptions
from medshield.train.finetune.method import NoOptions
from medshield.train.finetune.trades import TradesOptions, trades_attack, trades_loss


class AdvOptions(TradesOptions):
    """:class:`TradesOptions` with an adversary that must be there (``beta`` above 0)."""

    @model_validator(mode="after")
    def _check_beta(self) -> AdvOptions:
        if self.beta <= 0:
            raise ValueError(
                f"an adv-* method trains against its adversary, but beta is {self.beta}: set "
                "beta above 0 (default 6), or use the clean method (lora, adapter, linear-probe)"
            )
        return self


class AdvLoraOptions(LoraOptions, AdvOptions):
    """LoRA's options and the TRADES adversary's."""


class AdvAdapterOptions(AdapterOptions, AdvOptions):
    """The adapters' options and the TRADES adversary's."""


class AdvLinearProbeOptions(NoOptions, AdvOptions):
    """The TRADES adversary's options (the linear probe has none)."""


class TradesMixin:
    """The loss of an ``adv-*`` method (:func:`~medshield.train.finetune.trades.trades_loss`)
    and its training adversary."""

    adversarial = True

    def training_attack(self, classifier: nn.Module) -> PGD:
        return trades_attack(classifier, self.config.adversary.eps, self.options)

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return trades_loss(classifier, images, labels, self.config.adversary.eps, self.options)


@METHODS.register("adv-lora", "LoRA trained on RAN's TRADES objective and PGD adversary")
class AdvLora(TradesMixin, Lora):
    paper = "Hu et al. ICLR 2022 (LoRA) on TRADES (Zhang et al. ICML 2019)"
    Options = AdvLoraOptions


@METHODS.register("adv-adapter", "adapters trained on RAN's TRADES objective and PGD adversary")
class AdvAdapter(TradesMixin, Adapter):
    paper = "Houlsby et al. ICML 2019 (adapters) on TRADES (Zhang et al. ICML 2019)"
    Options = AdvAdapterOptions


@METHODS.register(
    "adv-linear-probe", "linear probe trained on RAN's TRADES objective and PGD adversary"
)
class AdvLinearProbe(TradesMixin, LinearProbe):
    paper = "Radford et al. ICML 2021 (CLIP linear probe) on TRADES (Zhang et al. ICML 2019)"
    Options = AdvLinearProbeOptions
