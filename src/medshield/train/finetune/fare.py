"""``fare``: unsupervised adversarial fine-tuning of the image tower (Schlarmann et al., 2024).

Schlarmann, Singh, Croce and Hein, "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision
Embeddings for Robust Large Vision-Language Models", ICML 2024. The loss is

    || phi(x_adv) - phi_orig(x) ||_2^2,
    x_adv = argmax_{||d||_inf <= eps} || phi(x + d) - phi_orig(x) ||_2^2

with ``phi`` the (unnormalised) image embedding being trained and ``phi_orig`` a frozen copy of
the original model; the maximisation is PGD (``FineTuneConfig.adversary``). No labels are used,
and the text tower is untouched, so the classifier is the zero-shot classifier with the base
class-prompt embeddings. The labels of the downstream split are ignored (FARE is unsupervised).
The adversary is ``FineTuneConfig.adversary``, by default PGD-10 with steps of eps / 4, as in
the reference training (RobustVLM: 10 steps of 1/255 at eps 4/255, AdamW, lr 1e-5), crafted on
a copy of the current model in inference form made at every step (as TRADES's adversary,
:mod:`medshield.train.finetune.trades`).

``fare`` is scored as the zero-shot classifier it is; ``fare-probe`` (:class:`FAREProbe`)
trains FARE and then a linear probe on its frozen features, for the supervised comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.config import StrictModel
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder, eval_mode
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.deploy import evaluation_copy
from medshield.train.finetune.method import FineTuneMethod
from medshield.train.finetune.tecoa import image_side_trainable


class ImageEmbedder(nn.Module):
    """[0, 1] images -> unnormalised image embeddings of a dual encoder."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model._encode_pixels(self.model.preprocess(images))


def squared_l2(embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example squared L2 distance, (N, D) x (N, D) -> (N,)."""
    return ((embeddings - targets) ** 2).sum(dim=-1)


@METHODS.register("fare", "unsupervised adversarial fine-tuning, L2 to frozen clean embeddings")
class FARE(FineTuneMethod):
    paper = "Schlarmann et al. ICML 2024 (FARE)"
    adversarial = True

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        image_side_trainable(model)
        return FineTunedClassifier(model, class_prompts, head="fixed")

    def prepare(self, classifier: nn.Module, train: TrainData) -> None:
        # still untrained: the frozen target embeddings, from a copy in inference form
        self.original = ImageEmbedder(evaluation_copy(classifier, text_tower=False).model)
        self.embedder = ImageEmbedder(classifier.model)

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            targets = self.original(images)
        adv_cfg = self.config.adversary
        current = evaluation_copy(classifier, text_tower=False)  # the adversary's copy
        attack = PGD(
            ImageEmbedder(current.model),
            eps=adv_cfg.eps,
            alpha=adv_cfg.step_size,
            steps=adv_cfg.steps,
            loss_fn=squared_l2,
        )
        adv = attack(images, targets)
        return squared_l2(self.embedder(adv), targets).mean(), {}

    def finalize(self, classifier: nn.Module) -> nn.Module:
        self.original = None  # type: ignore[assignment]  # free the frozen copy
        return super().finalize(classifier)


class FAREProbeOptions(StrictModel):
    """``fare_epochs``: the passes over the training items of FARE before the probe (None: half
    of the passes the budget makes, at least 1; with a ``steps`` budget the last pass may be
    cut short);
    ``probe_lr``: the head's learning rate (None: ``FineTuneConfig.lr``, which the tower uses)."""

    fare_epochs: int | None = Field(None, ge=1)
    probe_lr: float | None = Field(None, gt=0)


@METHODS.register("fare-probe", "FARE, then a linear probe on its frozen image features")
class FAREProbe(FARE):
    """FARE for the first ``fare_epochs`` passes (unsupervised, the head untouched), then a
    linear probe (:mod:`~medshield.train.finetune.linear_probe`: the head learned with
    cross-entropy on the FARE features, computed in eval mode without gradients, so the tower
    stays as FARE left it) for the rest: FARE's supervised score, beside ``fare``'s zero-shot
    one. One optimiser serves both phases, the tower at ``FineTuneConfig.lr`` and the head at
    ``probe_lr`` (a probe needs a larger step than FARE's 1e-5 scale); a parameter without a
    gradient in a phase is left alone by AdamW, so each phase updates its own part only."""

    paper = "Schlarmann et al. ICML 2024 (FARE), then a CLIP linear probe (Radford et al. 2021)"
    Options = FAREProbeOptions

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        image_side_trainable(model)
        return FineTunedClassifier(model, class_prompts, head="learned")

    def param_groups(
        self, classifier: nn.Module, trainable: list[nn.Parameter]
    ) -> list[dict[str, Any]]:
        """The tower at ``FineTuneConfig.lr`` (FARE's), the head at ``probe_lr``."""
        head = {id(classifier.class_weight), id(classifier.bias)}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in trainable if id(p) not in head]},
            {"params": [p for p in trainable if id(p) in head]},
        ]
        if self.options.probe_lr is not None:
            groups[1]["lr"] = self.options.probe_lr
        return groups

    def prepare(self, classifier: nn.Module, train: TrainData) -> None:
        super().prepare(classifier, train)
        self.probing = False

    def start_epoch(self, epoch: int, epochs: int) -> None:
        fare_epochs = self.options.fare_epochs or max(1, epochs // 2)
        if epoch == 0 and fare_epochs >= epochs:
            raise ConfigError(
                f"fare-probe trains FARE for {fare_epochs} of the {epochs} passes over the "
                "training items its budget makes and leaves none for the linear probe: give a "
                "budget of at least 2 passes and fare_epochs below it"
            )
        self.probing = epoch >= fare_epochs

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.probing:
            return super().loss(classifier, images, labels)
        with torch.no_grad(), eval_mode(classifier.model):
            features = classifier.image_embeddings(images)
        return F.cross_entropy(classifier.logits(features), labels), {}
