"""The copies of a fine-tuned classifier that evaluation and training attacks run on.

Evaluation only runs a trained classifier forward (and backward to its input, in the attacks),
and so does the adversary inside adversarial training (TRADES for RAN and the ``adv-*``
methods, the PGD of TeCoA and FARE), which crafts its images against the current model in eval
mode, on a copy made at every step. Both can use a copy in inference form: the same function,
computed with less work.

- Every peft LoRA layer (the ``lora`` / ``adv-lora`` methods, RAN's rectifiers) merged into its
  base weight and unwrapped, so the copy has the base architecture
  (:func:`~medshield.train.finetune.lora.merge_lora_layers`).
- Each BatchNorm of an EfficientNet image tower folded into the convolution before it
  (:func:`~medshield.models.mini_clip.fold_batchnorm`).
- 4-D weights in ``channels_last`` (NHWC) memory format, faster for these convolutions on the
  CPU as on GPUs.

Together these make an attack step on the ``mini-clip`` tower 2.3x faster on one CPU thread
(``benchmarks/tower_step.py``, docs/studies/throughput.md). Logits agree with the original
classifier's to float rounding (the tests check them); the rounding can flip an image that sits
on a decision boundary, so accuracies agree within the tolerance that page states (0.04 on 100
test images), not bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from medshield.models.base import eval_mode
from medshield.models.mini_clip import fold_batchnorm
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.lora import merge_lora_layers


class LeftOut(nn.Module):
    """Stands in for a text-tower stage that a copy for image attacks leaves out."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this copy of the classifier is for attacking images and leaves the text tower out; "
            "its class embeddings are the ones the classifier held when it was copied"
        )


def evaluation_copy(
    classifier: FineTunedClassifier, text_tower: bool = True
) -> FineTunedClassifier:
    """A copy of ``classifier`` in eval mode and inference form (see the module docstring), its
    parameters frozen; ``classifier`` itself is left as it is.

    With ``text_tower=False`` the copy is for crafting adversarial images, which only runs the
    image path: each stage of the text tower (``DualEncoder.text_blocks``) is a :class:`LeftOut`
    in the copy, so copying costs a quarter of the time (the ``mini-clip`` text tower holds
    most of the weights). The class embeddings are those ``classifier`` holds now (a live head
    is not re-encoded: refresh it first); a question-conditioned classifier's embeddings of the
    current questions (if set) are computed before copying, so the copy answers for those
    questions only.
    """
    memo: dict[int, Any] = {}
    if not text_tower:
        if classifier.conditioned and classifier.questions is not None:
            with torch.no_grad(), eval_mode(classifier):
                classifier.class_embeddings()  # fills the cache of the current questions
        for block in classifier.model.text_blocks():
            for stage in block if isinstance(block, nn.ModuleList) else [block]:
                memo[id(stage)] = LeftOut()
    deployed = copy.deepcopy(classifier, memo).eval().requires_grad_(False)
    merge_lora_layers(deployed)  # LoRA layers not merged yet are merged, then all unwrapped
    for tower in [m for m in deployed.modules() if isinstance(m, EfficientNet)]:
        fold_batchnorm(tower)
    return deployed.to(memory_format=torch.channels_last)
