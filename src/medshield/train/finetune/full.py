"""``full``: full fine-tuning, every weight of both towers, the projections and the logit scale.

Cross-entropy over the class-prompt embeddings, which the text tower recomputes at every step
(the "live" head), i.e. the FLYP recipe (Goyal et al., "Finetune like you pretrain", CVPR 2023)
restricted to the class prompts; with a frozen text tower it would be standard full image-tower
fine-tuning (Wortsman et al., CVPR 2022). After training the class embeddings are frozen into a
buffer, so inference costs exactly what the base zero-shot classifier costs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.method import FineTuneMethod


@METHODS.register("full", "full fine-tuning of both towers with CE over live class prompts")
class FullFineTune(FineTuneMethod):
    paper = "Goyal et al. CVPR 2023 (FLYP); Wortsman et al. CVPR 2022"

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        for p in model.parameters():
            p.requires_grad_(True)
        return FineTunedClassifier(model, class_prompts, head="live")

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return F.cross_entropy(classifier(images), labels), {}
