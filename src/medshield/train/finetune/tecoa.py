"""``tecoa``: text-guided contrastive adversarial fine-tuning (Mao et al., ICLR 2023).

Mao, Geng, Yang, Wang and Vondrick, "Understanding Zero-Shot Adversarial Robustness for Large
Vision-Language Models", ICLR 2023. The image tower (and its projection) is fine-tuned on PGD
examples crafted on the fly against the current model, with the cross-entropy of
``logit_scale * <image embedding, class-prompt embedding>`` (the text-guided loss); the text
tower stays frozen, so the class-prompt embeddings are fixed. The adversary is
``FineTuneConfig.adversary`` (L-inf PGD, ``eps``/``alpha`` in /255, ``steps``; the paper trains
with eps 1/255 and 2 steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medshield.attacks.pgd import PGD
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.common import FineTunedClassifier, FineTuneMethod, freeze


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
    name = "tecoa"
    paper = "Mao et al. ICLR 2023 (TeCoA)"

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        image_side_trainable(model)
        return FineTunedClassifier(model, class_prompts, head="fixed")

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        adv_cfg = self.config.adversary
        attack = PGD(classifier, eps=adv_cfg.eps, alpha=adv_cfg.step_size, steps=adv_cfg.steps)
        adv = attack(images, labels)
        return F.cross_entropy(classifier(adv), labels), {}
