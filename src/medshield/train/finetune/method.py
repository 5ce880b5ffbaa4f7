"""What a fine-tuning method is (:class:`FineTuneMethod`) and the helpers methods share.

A fine-tuning method (one file each, registered in :data:`medshield.registry.METHODS`) turns a
pretrained :class:`~medshield.models.DualEncoder` into a downstream classifier, an ``nn.Module``
mapping [0, 1] NCHW images to (N, num_classes) logits (usually a
:class:`~medshield.train.finetune.classifier.FineTunedClassifier`), and reports what it cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from medshield.attacks.base import Attack
from medshield.attacks.pgd import PGD
from medshield.config import StrictModel
from medshield.errors import InputError
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.config import BatchNormMode, FineTuneConfig
from medshield.train.finetune.data import TrainData


class NoOptions(StrictModel):
    """A method without options."""


class FineTuneMethod(ABC):
    """A fine-tuning method. Subclasses register with ``@METHODS.register(name, description)``.

    Class attributes:
        name: registry name, set by ``METHODS.register``.
        paper: the paper the method follows.
        Options: pydantic model validating ``FineTuneConfig.kwargs``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    adversarial: ClassVar[bool] = False
    """Trains against a PGD adversary (``FineTuneConfig.adversary`` may not be null, and the
    learning rate is picked by robust validation accuracy)."""

    def __init__(self, config: FineTuneConfig) -> None:
        self.config = config
        self.options = config.options

    def check(self, model: DualEncoder) -> None:
        """Refuse a model this method cannot adapt (raise a medshield error) before training."""
        if not isinstance(model, DualEncoder):
            raise InputError(f"fine-tuning needs a DualEncoder, got {type(model).__name__}")

    @abstractmethod
    def build(self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]) -> nn.Module:
        """Modify ``model`` in place as the method needs, set ``requires_grad`` on exactly the
        parameters that train, and return the classifier (usually a FineTunedClassifier)."""

    @abstractmethod
    def loss(
        self, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on one batch and its parts (for the log)."""

    def prepare(self, classifier: nn.Module, train: TrainData) -> None:  # noqa: B027
        """Hook run once before the first step (e.g. keep a frozen copy)."""

    def start_epoch(self, epoch: int, epochs: int) -> None:  # noqa: B027
        """Hook run at the start of every pass over the training items (0-based ``epoch`` of
        ``epochs``, the passes the budget starts, the last one possibly cut short by a step
        budget), before its first step; a method that cannot use that many passes raises a
        :class:`ConfigError` at pass 0, before the first step."""

    def training_attack(self, classifier: nn.Module) -> Attack | None:
        """The method's own training adversary as a cross-entropy PGD against ``classifier``
        (None for a clean method): it scores robust validation accuracy when the learning rate
        is picked (:mod:`medshield.train.finetune.select`). By default
        ``FineTuneConfig.adversary``'s eps, steps and step size."""
        if not self.adversarial or self.config.adversary is None:
            return None
        adv = self.config.adversary
        return PGD(classifier, eps=adv.eps, alpha=adv.step_size, steps=adv.steps)

    def param_groups(
        self, classifier: nn.Module, trainable: list[nn.Parameter]
    ) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group may set its own ``lr`` (by default one
        group at ``FineTuneConfig.lr``)."""
        return [{"params": trainable}]

    def finalize(self, classifier: nn.Module) -> nn.Module:
        """Turn the trained classifier into the inference classifier (fold, refresh buffers)."""
        if isinstance(classifier, FineTunedClassifier):
            classifier.refresh_class_embeddings()
        return classifier

    def restore_structure(self, classifier: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """Re-apply what :meth:`finalize` changed in the module structure (for loading)."""
        return classifier


def method_for(config: FineTuneConfig) -> FineTuneMethod:
    """The registered method of ``config``."""
    return METHODS.get(config.method)(config)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


BATCHNORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def eval_roots(module: nn.Module, batchnorm: BatchNormMode) -> list[nn.Module]:
    """The submodules of ``module`` that stay in eval mode while it trains: those with no
    trainable parameter (frozen BatchNorm statistics, no dropout in frozen parts) and, with
    ``batchnorm="frozen"``, every BatchNorm layer (see :attr:`FineTuneConfig.batchnorm`). Only
    the top-most of them are listed (their submodules follow them). Computed once per run, from
    the parameters a method left trainable in ``build``, for :func:`set_train_modes` at every
    step (walking every module's parameters at every step cost about 2% of a LoRA step)."""
    roots: list[nn.Module] = []
    covered: set[int] = set()
    for m in module.modules():  # parents before their children
        if id(m) in covered:
            continue
        frozen_norm = batchnorm == "frozen" and isinstance(m, BATCHNORM_LAYERS)
        if frozen_norm or not any(p.requires_grad for p in m.parameters()):
            roots.append(m)
            covered.update(id(sub) for sub in m.modules())
    return roots


def set_train_modes(module: nn.Module, roots: Sequence[nn.Module]) -> None:
    """Train mode for ``module``, eval mode for ``roots`` (:func:`eval_roots`) and below."""
    module.train()
    for m in roots:
        m.eval()
