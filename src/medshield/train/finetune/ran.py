"""``ran``: Rectify Adversarial Noise, medshield's light-weight robust fine-tuning method.

The backbone (both towers and their projections) stays frozen. A small residual *rectifier*
``r(z) = z + g(z)`` acts on the unnormalised image embedding ``z`` of the frozen model, and a
linear head (initialised from the class-prompt embeddings) classifies ``normalize(r(z))``.
The rectifier and the head are trained with (weights in :class:`RANWeights`, each term off at 0):

(a) ``task_clean`` / ``task_adv``: cross-entropy on clean images and on PGD examples crafted on
    the fly against the current classifier (noise-aware fine-tuning; the adversary is
    ``FineTuneConfig.adversary``, as in adversarial training, Madry et al., ICLR 2018);
(b) ``keep``: ``||n(r(z)) - n(z)||^2`` keeps rectified features close to the pretrained ones,
    and ``align``: ``||n(r(z_adv)) - sg(n(r(z)))||^2`` pulls adversarial features onto clean
    ones (the feature-matching idea of TRADES / FARE applied to the rectified features);
(c) ``cov``: the squared off-diagonal covariance of the batch of rectified features (divided by
    the width), which decorrelates feature dimensions, and ``svd``:
    ``-sum_{i<=k} s_i / sum_i s_i`` over the singular values of the centred batch, which
    restores the dominance of the top-k singular directions; both reshape the feature spectrum
    that noisy pretraining flattens, as in NMTune (Chen et al., "Understanding and Mitigating
    the Label Noise in Pre-training on Downstream Tasks", ICLR 2024), ``k`` defaults to the
    number of classes;
(d) ``contrastive``: the symmetric image-text InfoNCE between rectified features and the frozen
    class-prompt text embeddings of each image's class (CLIP's loss, Radford et al., 2021,
    with same-class pairs as positives; on the VQA task the embedding of the item's own
    question with its answer), which keeps the rectified space aligned with the text tower,
    i.e. keeps zero-shot use possible.

Rectifiers (``kwargs.rectifier``):

- ``linear``: ``r(z) = (I + U V) z`` (``rank`` r; ``rank: null`` means a full D x D matrix).
  After training it is folded into the image projection, ``W_proj <- (I + U V) W_proj``, so
  the deployed model has exactly the base architecture: zero parameters and zero FLOPs of
  overhead (:func:`fold_linear_rectifier`).
- ``mlp``: ``r(z) = z + W2 GELU(W1 z + b1) + b2`` with ``hidden`` units; it cannot fold, and
  its cost (``4 D hidden`` FLOPs per image) is a tiny fraction of the tower's; the report
  measures it with ``torch.utils.flop_counter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.config import StrictModel
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.common import (
    FineTunedClassifier,
    FineTuneMethod,
    RANWeights,
    freeze,
)
from medshield.train.pretrain import contrastive_loss


class RANOptions(StrictModel):
    """``rectifier``: linear | mlp; ``rank`` (linear, null = full), ``hidden`` (mlp),
    ``svd_top_k`` (null = number of classes), ``fold`` (fold a linear rectifier after training)."""

    rectifier: Literal["linear", "mlp"] = "mlp"
    rank: int | None = Field(16, ge=1)
    hidden: int = Field(64, ge=1)
    svd_top_k: int | None = Field(None, ge=1)
    fold: bool = True


class LinearRectifier(nn.Module):
    """``z + (z V^T) U^T`` (low rank) or ``z + z A^T`` (full); zero at initialisation."""

    def __init__(self, dim: int, rank: int | None) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(dim, dim))
        else:
            self.down = nn.Parameter(torch.randn(rank, dim) / dim**0.5)
            self.up = nn.Parameter(torch.zeros(dim, rank))

    def delta(self) -> torch.Tensor:
        """The (D, D) matrix ``M - I``."""
        return self.weight if self.rank is None else self.up @ self.down

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return z + z @ self.weight.T
        return z + (z @ self.down.T) @ self.up.T


class MLPRectifier(nn.Module):
    """``z + W2 GELU(W1 z + b1) + b2``; ``W2``, ``b2`` start at zero (identity at init)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(F.gelu(self.down(z)))


def _image_projection(model: DualEncoder) -> nn.Linear:
    proj = getattr(model, "image_proj", None)
    if not isinstance(proj, nn.Linear) or proj.bias is not None:
        raise ConfigError(
            f"ran with a linear rectifier folds it into the image projection, but "
            f"{type(model).__name__} has no bias-free nn.Linear `image_proj`; use "
            "kwargs.rectifier: mlp for this architecture"
        )
    return proj


@torch.no_grad()
def fold_linear_rectifier(classifier: FineTunedClassifier) -> FineTunedClassifier:
    """Fold a :class:`LinearRectifier` into the image projection and drop it (in place).

    ``normalize((I + D) W f) == normalize(W' f)`` with ``W' = (I + D) W``, so logits are
    unchanged and the classifier is the base architecture again.
    """
    rectifier = classifier.rectifier
    if not isinstance(rectifier, LinearRectifier):
        raise ConfigError("only a linear rectifier can be folded")
    proj = _image_projection(classifier.model)
    eye = torch.eye(rectifier.dim, dtype=proj.weight.dtype, device=proj.weight.device)
    matrix = eye + rectifier.delta().to(proj.weight)
    proj.weight.copy_(matrix @ proj.weight)
    classifier.rectifier = None
    classifier.structure_meta = {"folded": True}
    return classifier


def covariance_penalty(features: torch.Tensor) -> torch.Tensor:
    """Squared off-diagonal entries of the batch covariance, summed, divided by the width."""
    centred = features - features.mean(0, keepdim=True)
    cov = centred.T @ centred / max(len(features) - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return (off**2).sum() / features.shape[1]


def singular_value_penalty(features: torch.Tensor, top_k: int) -> torch.Tensor:
    """``-sum of the top-k singular values / sum of all`` of the centred batch (NMTune)."""
    centred = features - features.mean(0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    return -s[:top_k].sum() / s.sum().clamp_min(1e-8)


@METHODS.register("ran", "RAN: frozen backbone, residual rectifier, robust + spectral losses")
class RAN(FineTuneMethod):
    name = "ran"
    paper = (
        "medshield RAN; losses after Madry et al. ICLR 2018, NMTune (Chen et al. ICLR 2024), "
        "CLIP (Radford et al. ICML 2021)"
    )
    Options = RANOptions

    def check(self, model: DualEncoder) -> None:
        super().check(model)
        o: RANOptions = self.options
        if o.rectifier == "linear" and o.fold:
            proj = _image_projection(model)
            if proj.out_features != model.embed_dim:
                raise ConfigError(
                    f"image_proj maps to {proj.out_features} dims but the model's embed_dim is "
                    f"{model.embed_dim}: the checkpoint does not fit its architecture"
                )

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        o: RANOptions = self.options
        freeze(model)
        dim = int(model.embed_dim)
        if o.rectifier == "linear":
            rank = None if o.rank is None or o.rank >= dim else o.rank
            rectifier: nn.Module = LinearRectifier(dim, rank)
        else:
            rectifier = MLPRectifier(dim, o.hidden)
        self.top_k = o.svd_top_k or len(class_prompts)
        return FineTunedClassifier(model, class_prompts, head="learned", rectifier=rectifier)

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        w: RANWeights = self.config.ran
        model = classifier.model
        with torch.no_grad():
            z = model._encode_pixels(model.preprocess(images))
        rect = F.normalize(classifier.rectifier(z), dim=-1)
        terms: dict[str, torch.Tensor] = {}
        if w.task_adv > 0 or w.align > 0:
            adv_cfg = self.config.adversary
            attack = PGD(classifier, eps=adv_cfg.eps, alpha=adv_cfg.step_size, steps=adv_cfg.steps)
            adv = attack(images, labels)
            with torch.no_grad():
                z_adv = model._encode_pixels(model.preprocess(adv))
            rect_adv = F.normalize(classifier.rectifier(z_adv), dim=-1)
            if w.task_adv > 0:
                terms["task_adv"] = F.cross_entropy(classifier.logits(rect_adv), labels)
            if w.align > 0:
                terms["align"] = ((rect_adv - rect.detach()) ** 2).sum(-1).mean()
        if w.task_clean > 0:
            terms["task_clean"] = F.cross_entropy(classifier.logits(rect), labels)
        if w.keep > 0:
            terms["keep"] = ((rect - F.normalize(z, dim=-1)) ** 2).sum(-1).mean()
        if w.cov > 0:
            terms["cov"] = covariance_penalty(rect)
        if w.svd > 0:
            terms["svd"] = singular_value_penalty(rect, self.top_k)
        if w.contrastive > 0:
            text = classifier.label_embeddings(labels)
            captions = [str(int(y)) for y in labels]
            scale = model.logit_scale.exp()
            terms["contrastive"] = contrastive_loss(rect, text, scale, captions)
        total = sum(getattr(w, name) * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def finalize(self, classifier: nn.Module) -> nn.Module:
        classifier = super().finalize(classifier)
        if self.options.rectifier == "linear" and self.options.fold:
            fold_linear_rectifier(classifier)
        return classifier

    def restore_structure(self, classifier: nn.Module, meta: dict[str, Any]) -> nn.Module:
        if meta.get("folded"):
            classifier.rectifier = None
            classifier.structure_meta = {"folded": True}
        return classifier
