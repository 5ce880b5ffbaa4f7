"""``linear-probe``: frozen encoders, a linear head on the image embeddings.

The classical transfer baseline of CLIP (Radford et al., "Learning Transferable Visual Models
From Natural Language Supervision", ICML 2021): both towers stay frozen and only a linear layer
on the unit image embeddings is trained with cross-entropy. The head starts from the class-prompt
embeddings (the zero-shot classifier), as in LP-FT (Kumar et al., ICLR 2022), so it begins at
the zero-shot accuracy instead of chance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.method import FineTuneMethod, freeze


@METHODS.register("linear-probe", "frozen encoders, a linear head (CLIP linear probe, LP-FT init)")
class LinearProbe(FineTuneMethod):
    paper = "Radford et al. ICML 2021 (CLIP linear probe); Kumar et al. ICLR 2022 (LP-FT init)"

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        freeze(model)
        return FineTunedClassifier(model, class_prompts, head="learned")

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            features = classifier.image_embeddings(images)
        return F.cross_entropy(classifier.logits(features), labels), {}
