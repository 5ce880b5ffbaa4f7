"""``tecoa``: text-guided contrastive adversarial fine-tuning (Mao et al., ICLR 2023).

Mao, Geng, Yang, Wang and Vondrick, "Understanding Zero-Shot Adversarial Robustness for Large
Vision-Language Models", ICLR 2023. The image tower (and its projection) is fine-tuned on PGD
examples crafted on the fly against the current model, with the cross-entropy of
``logit_scale * <image embedding, class-prompt embedding>`` (the text-guided loss); the text
tower stays frozen, so the class-prompt embeddings are fixed.

Two settings follow the reference code (RobustVLM's ``adversarial_training_clip.py --loss ce``,
Schlarmann et al. 2024, which trains TeCoA as its baseline):

- ``logit_scale`` (default 100, CLIP's trained scale) is the scale of the training loss and of
  the adversary's loss, not the model's own scale: mini-clip's is about 14, and with chest
  X-ray class prompts at cosine 0.92 to each other that caps the logit gap at
  ``14 ||c_1 - c_2|| = 5.6`` (1.9 on abdominal CT), so the cross-entropy cannot get small
  however well the images separate. The deployed classifier keeps the model's scale (the same
  prediction: the head is fixed and its bias zero).
- The adversary is ``FineTuneConfig.adversary``, by default PGD-10 with steps of eps / 4
  (``steps`` and ``alpha`` configurable, /255 units), crafted in eval mode, on a copy of the
  current classifier in inference form made at every step (as TRADES's adversary,
  :mod:`medshield.train.finetune.trades`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.config import StrictModel
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.deploy import evaluation_copy
from medshield.train.finetune.method import FineTuneMethod, freeze


class TeCoAOptions(StrictModel):
    """``logit_scale``: the scale of the training (and adversary's) cross-entropy."""

    logit_scale: float = Field(100.0, gt=0)


class ScaledLogits(nn.Module):
    """A :class:`FineTunedClassifier`'s logits at a fixed ``scale`` (images -> logits)."""

    def __init__(self, classifier: FineTunedClassifier, scale: float) -> None:
        super().__init__()
        self.classifier, self.scale = classifier, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.classifier.image_embeddings(images)
        return self.classifier.logits(features, scale=self.scale)


def image_side_trainable(model: DualEncoder) -> None:
    """Train every image-tower parameter and the image projection; freeze the rest."""
    freeze(model)
    for block in model.image_blocks():
        for p in block.parameters():
            p.requires_grad_(True)
    proj = getattr(model, "image_proj", None)
    if proj is not None:
        for p in proj.parameters():
            p.requires_grad_(True)


@METHODS.register("tecoa", "adversarial fine-tuning, CE over class prompts on PGD (Mao 2023)")
class TeCoA(FineTuneMethod):
    paper = "Mao et al. ICLR 2023 (TeCoA); settings of Schlarmann et al. ICML 2024 (RobustVLM)"
    Options = TeCoAOptions
    adversarial = True

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        image_side_trainable(model)
        return FineTunedClassifier(model, class_prompts, head="fixed")

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        scale = self.options.logit_scale
        current = ScaledLogits(evaluation_copy(classifier, text_tower=False), scale)
        adv_cfg = self.config.adversary
        attack = PGD(current, eps=adv_cfg.eps, alpha=adv_cfg.step_size, steps=adv_cfg.steps)
        adv = attack(images, labels)
        return F.cross_entropy(ScaledLogits(classifier, scale)(adv), labels), {}
