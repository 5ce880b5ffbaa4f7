"""The copy of a fine-tuned classifier that evaluation runs on.

Evaluation only runs a trained classifier forward (and backward to its input, in the attacks),
so it can use a copy in inference form: the same function, computed with less work.

- Every peft LoRA layer (the ``lora`` / ``adv-lora`` methods, RAN's rectifiers) merged into its
  base weight and unwrapped, so the copy has the base architecture
  (:func:`~medshield.train.finetune.ran.merge_rectifiers`).
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

import torch
from efficientnet_lite_pytorch import EfficientNet

from medshield.models.mini_clip import fold_batchnorm
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.ran import merge_rectifiers


def evaluation_copy(classifier: FineTunedClassifier) -> FineTunedClassifier:
    """A copy of ``classifier`` in eval mode and inference form (see the module docstring);
    ``classifier`` itself is left as it is."""
    deployed = copy.deepcopy(classifier).eval()
    merge_rectifiers(deployed)  # LoRA layers not merged yet are merged, then all unwrapped
    for tower in [m for m in deployed.modules() if isinstance(m, EfficientNet)]:
        fold_batchnorm(tower)
    return deployed.to(memory_format=torch.channels_last)
