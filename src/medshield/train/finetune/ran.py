"""``ran``: Rectify Adversarial Noise, medshield's light-weight robust fine-tuning method.

**Where the rectifiers live** (``placement``):

- ``tower`` (the default): low-rank rectifiers *inside* the image tower. At each block named in
  ``depths`` (``all``, the default, ``early``, ``middle``, ``late``, or indices into the model's
  ``image_blocks()``)
  every 1x1 stride-1 convolution and every linear layer the block calls gets a LoRA update
  ``W + (alpha / r) B A`` through ``peft`` (the same injection as the ``lora`` method,
  :func:`~medshield.train.finetune.lora.inject_lora`), and so does the image projection with
  ``projection: true``. The rest of the model, the text tower included, stays frozen; the head
  is learned, initialised from the class-prompt embeddings. After training peft merges each ``B A``
  into its base weight and the LoRA wrappers are dropped
  (:func:`~medshield.train.finetune.lora.merge_lora_layers`), so the deployed classifier is the base
  architecture with other weights: zero parameters and zero FLOPs of overhead. Why low-rank *weight*
  updates: they merge exactly, which a nonlinear adapter cannot; why not after the tower: a 2/255
  perturbation moves the frozen tower's embedding further than the gap between class centres
  (docs/studies/finetune.md), so a rectifier there has nothing left to rectify.
- ``head`` (the ablation, the first design): a residual rectifier ``r(z) = z + g(z)`` on the
  unnormalised embedding ``z`` of the frozen model, ``rectifier: linear``
  (``(I + U V) z``, rank ``rank``, ``null`` = full; folded into the image projection after
  training with ``fold``, :func:`fold_linear_rectifier`) or ``rectifier: mlp``
  (``z + W2 GELU(W1 z + b1) + b2``, ``hidden`` units; it cannot fold).

**The objective** (the same for both placements; each weight an option, a weight of 0 switches
its term off, and the mean of every active term over each history entry's steps is in the
run's history):

(a) noise-aware fine-tuning, TRADES (Zhang et al., ICML 2019): ``task_clean`` x the
    cross-entropy on clean images + ``beta`` x ``kl``, the KL divergence between the class
    distributions of clean and adversarial images, with the PGD adversary of
    :mod:`medshield.train.finetune.trades` (default 5 steps of eps / 4, in eval mode); the
    ``adv-*`` baselines train on the same objective and adversary without (b) and (c);
(b) dynamic re-alignment: ``align`` x ``||f(x_adv) - f_ema(x)||^2`` pulls the adversarial
    unit image features onto the clean features of an EMA teacher ``f_ema``, a copy whose
    trainable weights follow the student's with momentum ``ema_momentum`` (default 0.9,
    updated at the start of every step), and ``keep`` x ``||f(x) - f_0(x)||^2`` keeps the
    clean features near those of a frozen copy ``f_0`` of the model as training began (the
    pretrained features). ``keep`` is 0 by default: the pretrained features are the
    non-robust ones, and anchoring to them cost 18 points of robust accuracy at 1/255 on top
    of ``align`` (chest X-ray, docs/studies/finetune.md); a teacher that follows the student
    with momentum 0 (the target is the student itself) collapsed onto one class at lr 1e-2;
(c) contrastive feature disentanglement, on the clean features: ``cov`` x the mean squared
    off-diagonal entry of the batch correlation matrix (scale-free, in [0, 1]), ``svd`` x
    ``-sum_{i<=k} s_i / sum_i s_i`` over the singular values of the centred batch (NMTune,
    Chen et al., ICLR 2024; ``k`` = ``svd_top_k``, default the number of classes), and
    ``contrastive`` x the symmetric image-text InfoNCE against the frozen class-prompt
    embedding of each image's class (CLIP's loss, same-class pairs as positives; on the VQA
    task the embedding of the item's own question with its answer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from medshield.attacks.pgd import PGD
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.data import TrainData
from medshield.train.finetune.deploy import evaluation_copy
from medshield.train.finetune.lora import inject_lora, merge_lora_layers
from medshield.train.finetune.method import FineTuneMethod, freeze
from medshield.train.finetune.trades import (
    TradesOptions,
    trades_adversary,
    trades_attack,
    trades_kl,
)
from medshield.train.pretrain import contrastive_loss

Depth = int | Literal["all", "early", "middle", "late"]
TOWER_ONLY = frozenset({"depths", "projection", "alpha"})
HEAD_ONLY = frozenset({"rectifier", "hidden", "fold"})


class RANOptions(TradesOptions):
    """RAN's options (see the module docstring): where the rectifiers live, their size, the
    loss weights (:data:`RAN_TERMS`), and, from :class:`TradesOptions`, ``beta`` and the
    training adversary's steps."""

    placement: Literal["tower", "head"] = "tower"
    # tower placement
    # every block: on chest X-ray (seed 0, 80 steps, lr 3e-3) 5.0 [1.0, 9.5] points more worst-case
    # accuracy at 2/255 than early / middle / late alone (195,074 trainable parameters, not
    # 39,298); a rank of 32 at three depths did not help (docs/studies/finetune.md)
    depths: list[Depth] = ["all"]
    projection: bool = True
    alpha: float = 16.0
    # both placements: the LoRA rank (tower) or the linear rectifier's rank (head, null = full)
    rank: int | None = 8
    # head placement
    rectifier: Literal["linear", "mlp"] = "mlp"
    hidden: int = 64
    fold: bool = True
    # loss weights (0 switches a term off; beta is TradesOptions') and the EMA teacher's momentum
    task_clean: float = 1.0
    # keep is off by default: anchoring the clean features to the pretrained (non-robust)
    # ones cost 18.0 points of worst-case accuracy at 1/255 on top of align, 41.5 alone
    # (chest X-ray, seed 0, 80 steps; configs/study_finetune_realignment.yaml); the EMA
    # teacher at 0.9 gained 8.0 over no re-alignment at lr 1e-2 (momentum 0 collapsed)
    keep: float = 0.0
    # at 320 steps (4x the headline) on chest X-ray align and disentanglement are neutral at
    # 1e-3 (each within a point) and cost 2.5 and 1.8 points at 2/255 at 3e-3, the rate a
    # 600-item validation set picks; align gains 3.0 on blood cells (3 seeds each; a cosine
    # fade of align did not help): docs/studies/finetune.md
    align: float = 1.0
    # disentanglement at a tenth of its first weights (1.0 / 0.1 / 0.5): at full weight the three
    # terms together cost 8.7 points at 2/255 (3 seeds); at a tenth they cost nothing (seed 0:
    # +9.5 [+5.5, +14.0] over full weight) and each still moves in the per-term log
    cov: float = 0.1
    svd: float = 0.01
    contrastive: float = 0.05
    ema_momentum: float = 0.9
    svd_top_k: int | None = None

    @model_validator(mode="after")
    def _check(self) -> RANOptions:
        for name in RAN_TERMS:
            if getattr(self, name) < 0:
                raise ValueError(
                    f"RAN loss weight {name} must be >= 0, got {getattr(self, name)}; "
                    "0 switches its term off"
                )
        if self.task_clean == 0 and self.contrastive == 0:
            raise ValueError(
                "RAN needs a term that teaches the labels: task_clean and contrastive cannot "
                "both be 0 (an ablation switches off one of them at most)"
            )
        if not 0 <= self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        for name, value in (("hidden", self.hidden), ("rank", self.rank), ("alpha", self.alpha)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.svd_top_k is not None and self.svd_top_k < 1:
            raise ValueError(f"svd_top_k must be at least 1, got {self.svd_top_k}")
        wrong = (HEAD_ONLY if self.placement == "tower" else TOWER_ONLY) & self.model_fields_set
        if wrong:
            other = "head" if self.placement == "tower" else "tower"
            raise ValueError(
                f"{', '.join(sorted(wrong))} only apply with placement: {other}; "
                f"this config has placement: {self.placement}"
            )
        if self.placement == "tower":
            if self.rank is None:
                raise ValueError("tower rectifiers are low rank: set rank to a number")
            if not self.depths and not self.projection:
                raise ValueError("no rectifier: give depths or set projection: true")
        return self


RAN_TERMS = ("task_clean", "beta", "keep", "align", "cov", "svd", "contrastive")
"""RAN's loss weights, the terms a study ablates (``ran-no_<term>``)."""

RAN_PARTS: dict[str, tuple[str, ...]] = {
    "noise_aware": ("beta",),
    "realignment": ("keep", "align"),
    "disentanglement": ("contrastive", "cov", "svd"),
}
"""RAN's three parts and their loss terms: noise-aware fine-tuning (the TRADES KL), dynamic
re-alignment (clean features kept near the pretrained ones, adversarial ones pulled onto the
EMA teacher) and contrastive disentanglement (image-text contrastive, decorrelation and
spectrum terms). A study ablates a part by switching all its terms off (``ran-no_<part>``)."""


def ablation_terms(name: str) -> tuple[str, ...]:
    """The loss terms that ``ran-no_<name>`` switches off: a part's terms, or the one term."""
    return RAN_PARTS.get(name, (name,))


_LOG_NAME = {"beta": "kl"}  # the history logs the KL term under its own name
RAN_LOG_TERMS = tuple(_LOG_NAME.get(t, t) for t in RAN_TERMS)
"""The names RAN's loss terms carry in a run's ``history`` (``beta``'s term is ``kl``)."""


# --- tower placement ----------------------------------------------------------------------------


def _rectifiable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
    )


def _block_targets(model: nn.Module, block: nn.Module) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    inside_attention = {
        id(child)
        for m in block.modules()
        if isinstance(m, nn.MultiheadAttention)
        for child in m.modules()
    }
    return [
        names[id(m)] for m in block.modules() if _rectifiable(m) and id(m) not in inside_attention
    ]


def tower_targets(model: DualEncoder, options: RANOptions) -> list[str]:
    """Full names of the layers the tower rectifiers adapt: the 1x1 stride-1 convolutions and
    linear layers of each block in ``depths`` (not the linears ``nn.MultiheadAttention`` reads
    as raw weights, which a LoRA wrapper would never see), and ``image_proj``.

    A depth is an index into ``image_blocks()`` or a name, counted over the blocks that hold
    such a layer: ``all`` (every one), ``early`` (a quarter in), ``middle`` (halfway), ``late``
    (the last).

    Raises:
        ConfigError: a depth the tower does not have, a block without such a layer, or no
            ``nn.Linear`` image projection with ``projection: true``.
    """
    blocks = model.image_blocks()
    per_block = [_block_targets(model, block) for block in blocks]
    candidates = [i for i, found in enumerate(per_block) if found]
    targets: list[str] = []
    for depth in options.depths:
        if isinstance(depth, str):
            if not candidates:
                raise ConfigError(
                    f"{type(model).__name__}'s image blocks hold no 1x1 convolution or linear "
                    "layer for a low-rank rectifier; use placement: head"
                )
            named = {"early": len(candidates) // 4, "middle": len(candidates) // 2, "late": -1}
            indices = candidates if depth == "all" else [candidates[named[depth]]]
        elif 0 <= depth < len(blocks):
            indices = [depth]
        else:
            raise ConfigError(
                f"ran depth {depth} does not exist: the image tower has {len(blocks)} blocks "
                f"(0-{len(blocks) - 1}); use an index in that range or all, early, middle, late"
            )
        for index in indices:
            if not per_block[index]:
                raise ConfigError(
                    f"ran depth {depth!r} (image block {index}) has no 1x1 convolution or linear "
                    f"layer for a low-rank rectifier; blocks that have one: {candidates}"
                )
            targets.extend(name for name in per_block[index] if name not in targets)
    if options.projection:
        if not isinstance(getattr(model, "image_proj", None), nn.Linear):
            raise ConfigError(
                f"ran projection: true needs an nn.Linear `image_proj`, which "
                f"{type(model).__name__} does not have; set projection: false"
            )
        targets.append("image_proj")
    return targets


# --- head placement -----------------------------------------------------------------------------


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


# --- losses -------------------------------------------------------------------------------------


def covariance_penalty(features: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the batch *correlation* matrix, in [0, 1].

    Scale-free: the covariance itself (the first design's term) is about ``1 / D^2`` per
    entry on unit-norm D-dimensional features, so it logged 0.000 and could not move the loss.
    """
    centred = features - features.mean(0, keepdim=True)
    standardised = centred / centred.std(0, keepdim=True).clamp_min(1e-6)
    corr = standardised.T @ standardised / max(len(features) - 1, 1)
    width = features.shape[1]
    off = corr - torch.diag(torch.diagonal(corr))
    return (off**2).sum() / max(width * (width - 1), 1)


def singular_value_penalty(features: torch.Tensor, top_k: int) -> torch.Tensor:
    """``-sum of the top-k singular values / sum of all`` of the centred batch (NMTune)."""
    centred = features - features.mean(0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    return -s[:top_k].sum() / s.sum().clamp_min(1e-8)


def _frozen_copy(module: nn.Module) -> nn.Module:
    copied = copy.deepcopy(module).eval()
    freeze(copied)
    return copied


@METHODS.register("ran", "RAN: low-rank rectifiers merged into the tower, TRADES + re-alignment")
class RAN(FineTuneMethod):
    paper = (
        "medshield RAN; losses after TRADES (Zhang et al. ICML 2019), NMTune (Chen et al. ICLR "
        "2024), CLIP (Radford et al. ICML 2021); rectifiers are peft LoRA (Hu et al. ICLR 2022)"
    )
    Options = RANOptions
    adversarial = True

    def training_attack(self, classifier: nn.Module) -> PGD:
        return trades_attack(classifier, self.config.adversary.eps, self.options)

    def check(self, model: DualEncoder) -> None:
        super().check(model)
        o: RANOptions = self.options
        if o.placement == "tower":
            tower_targets(model, o)
        elif o.rectifier == "linear" and o.fold:
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
        self.top_k = o.svd_top_k or len(class_prompts)
        if o.placement == "tower":
            assert o.rank is not None  # RANOptions refuses a tower without a rank
            inject_lora(model, tower_targets(model, o), o.rank, o.alpha)
            return FineTunedClassifier(model, class_prompts, head="learned")
        freeze(model)
        dim = int(model.embed_dim)
        if o.rectifier == "linear":
            rank = None if o.rank is None or o.rank >= dim else o.rank
            rectifier: nn.Module = LinearRectifier(dim, rank)
        else:
            rectifier = MLPRectifier(dim, o.hidden)
        return FineTunedClassifier(model, class_prompts, head="learned", rectifier=rectifier)

    def prepare(self, classifier: nn.Module, train: TrainData) -> None:
        """Keep the frozen copy of the starting model (in inference form: it only embeds
        images) and start the EMA teacher from it."""
        self.pretrained = evaluation_copy(classifier, text_tower=False)
        self.teacher = _frozen_copy(classifier)
        self.ema_pairs = [
            (t, s)
            for t, s in zip(self.teacher.parameters(), classifier.parameters(), strict=True)
            if s.requires_grad
        ]

    @torch.no_grad()
    def update_teacher(self) -> None:
        """``teacher <- m teacher + (1 - m) student`` over the trainable weights."""
        m = self.options.ema_momentum
        for teacher, student in self.ema_pairs:
            teacher.lerp_(student.detach(), 1 - m)

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        o: RANOptions = self.options
        self.update_teacher()
        clean = classifier.image_embeddings(images)
        clean_logits = classifier.logits(clean)
        terms: dict[str, torch.Tensor] = {}
        if o.task_clean > 0:
            terms["task_clean"] = F.cross_entropy(clean_logits, labels)
        if o.beta > 0 or o.align > 0:
            adv_images = trades_adversary(classifier, images, self.config.adversary.eps, o)
            adv = classifier.image_embeddings(adv_images)
            if o.beta > 0:
                clean_log_probs = F.log_softmax(clean_logits, dim=-1)
                terms["beta"] = trades_kl(classifier.logits(adv), clean_log_probs).mean()
            if o.align > 0:
                with torch.no_grad():
                    teacher = self.teacher.image_embeddings(images)
                terms["align"] = ((adv - teacher) ** 2).sum(-1).mean()
        if o.keep > 0:
            with torch.no_grad():
                pretrained = self.pretrained.image_embeddings(images)
            terms["keep"] = ((clean - pretrained) ** 2).sum(-1).mean()
        if o.cov > 0:
            terms["cov"] = covariance_penalty(clean)
        if o.svd > 0:
            terms["svd"] = singular_value_penalty(clean, self.top_k)
        if o.contrastive > 0:
            text = classifier.label_embeddings(labels)
            captions = [str(int(y)) for y in labels]
            scale = classifier.model.logit_scale.exp()
            terms["contrastive"] = contrastive_loss(clean, text, scale, captions)
        total = sum(getattr(o, name) * value for name, value in terms.items())
        return total, {_LOG_NAME.get(k, k): float(v.detach()) for k, v in terms.items()}

    def finalize(self, classifier: nn.Module) -> nn.Module:
        self.pretrained = self.teacher = None  # type: ignore[assignment]  # free the copies
        self.ema_pairs = []
        classifier = super().finalize(classifier)
        o: RANOptions = self.options
        if o.placement == "tower":
            merge_lora_layers(classifier)
            classifier.structure_meta = {"merged": True}
        elif o.rectifier == "linear" and o.fold:
            fold_linear_rectifier(classifier)
        return classifier

    def restore_structure(self, classifier: nn.Module, meta: dict[str, Any]) -> nn.Module:
        if meta.get("merged"):  # the saved weights already hold B A: drop the wrappers only
            merge_lora_layers(classifier, merge=False)
            classifier.structure_meta = {"merged": True}
        if meta.get("folded"):
            classifier.rectifier = None
            classifier.structure_meta = {"folded": True}
        return classifier
