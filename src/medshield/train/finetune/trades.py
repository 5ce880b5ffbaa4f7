"""The noise-aware objective RAN and the ``adv-*`` baselines share: TRADES with a PGD adversary.

TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019): cross-entropy on clean images + ``beta`` x the KL divergence between the class
distributions of clean and adversarial images, ``sum p_clean (log p_clean - log p_adv)``, with
gradients through both. The adversarial images maximise that KL: PGD
(:class:`~medshield.attacks.pgd.PGD`, which runs the model in eval mode) against the current
classifier, L-inf ball of ``FineTuneConfig.adversary.eps``, ``pgd_steps`` steps of
``pgd_step`` x eps (default 5 steps of eps / 4) from a random start. The adversary runs on a
copy of the current classifier in inference form, made at every step
(:func:`~medshield.train.finetune.deploy.evaluation_copy` without the text tower): the same
function, with LoRA merged and BatchNorm folded, so its steps cost less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.config import StrictModel
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.deploy import evaluation_copy


class TradesOptions(StrictModel):
    """The TRADES weight ``beta`` and the adversary's ``pgd_steps`` steps of ``pgd_step`` x
    eps (eps is ``FineTuneConfig.adversary.eps``)."""

    beta: float = 6.0
    pgd_steps: int = 5
    pgd_step: float = 0.25

    @model_validator(mode="after")
    def _check_adversary(self) -> TradesOptions:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}; 0 switches the KL term off")
        if self.pgd_steps < 1:
            raise ValueError(
                f"pgd_steps must be at least 1, got {self.pgd_steps}: the noise-aware terms "
                "need a PGD adversary (the default is 5 steps of eps / 4)"
            )
        if not 0 < self.pgd_step <= 1:
            raise ValueError(f"pgd_step is a fraction of eps in (0, 1], got {self.pgd_step}")
        return self


def trades_attack(classifier: nn.Module, eps: float, options: TradesOptions) -> PGD:
    """The TRADES adversary's PGD (``pgd_steps`` steps of ``pgd_step`` x eps) with the
    cross-entropy loss: what scores a TRADES-trained method's robust validation accuracy."""
    return PGD(classifier, eps=eps, alpha=options.pgd_step * eps, steps=options.pgd_steps)


def trades_kl(adv_logits: torch.Tensor, clean_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-example ``sum p_clean (log p_clean - log p_adv)`` (TRADES's KL), (N,)."""
    adv_log_probs = F.log_softmax(adv_logits, dim=-1)
    return (clean_log_probs.exp() * (clean_log_probs - adv_log_probs)).sum(-1)


def trades_adversary(
    classifier: FineTunedClassifier, images: torch.Tensor, eps: float, options: TradesOptions
) -> torch.Tensor:
    """Adversarial images that maximise :func:`trades_kl` against the current classifier's
    clean class distribution, crafted in eval mode on a copy in inference form (a live head is
    refreshed from the current text tower first, so the adversary sees the model as it is
    now)."""
    if classifier.head == "live":
        classifier.refresh_class_embeddings()
    current = evaluation_copy(classifier, text_tower=False)
    with torch.no_grad():
        target = F.log_softmax(current(images), dim=-1)
    attack = PGD(
        current,
        eps=eps,
        alpha=options.pgd_step * eps,
        steps=options.pgd_steps,
        loss_fn=trades_kl,
    )
    return attack(images, target)


def trades_loss(
    classifier: FineTunedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    options: TradesOptions,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(clean) + beta x mean KL(adversarial || clean)`` on one batch, and both terms
    (``task_clean``, ``kl``, the names RAN's log uses)."""
    adv = trades_adversary(classifier, images, eps, options)
    clean_logits = classifier(images)
    task = F.cross_entropy(clean_logits, labels)
    kl = trades_kl(classifier(adv), F.log_softmax(clean_logits, dim=-1)).mean()
    total = task + options.beta * kl
    return total, {"task_clean": float(task.detach()), "kl": float(kl.detach())}
