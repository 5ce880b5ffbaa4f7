"""SGA: set-level guidance attack on image-caption pairs (Lu et al., ICCV 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medshield.attacks.base import attack_mode, check_count
from medshield.attacks.multimodal import (
    MultimodalAttack,
    MultimodalResult,
    check_caption_sets,
    check_pairs,
)
from medshield.attacks.pgd import PGD
from medshield.errors import InputError
from medshield.models.base import DualEncoder
from medshield.registry import MULTIMODAL_ATTACKS

NOISE_STD = 0.05
"""Gaussian noise added to each rescaled copy before resizing, as in the authors' code."""


def rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """A noisy copy of ``images`` resized by ``scale`` and back to the original size, in [0, 1]
    (bilinear with antialiasing both ways, so differentiable and without overshoot)."""
    height, width = images.shape[-2:]
    size = (max(1, round(scale * height)), max(1, round(scale * width)))
    noisy = (images + NOISE_STD * torch.randn_like(images)).clamp(0.0, 1.0)
    small = F.interpolate(noisy, size=size, mode="bilinear", align_corners=False, antialias=True)
    back = F.interpolate(
        small, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return back.clamp(0.0, 1.0)


class ScaledCopies(nn.Module):
    """[0, 1] images (N, C, H, W) -> (N, 1 + len(scales), D) unit embeddings of each image and of
    its rescaled noisy copies (:func:`rescale`)."""

    def __init__(self, model: DualEncoder, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.scales = scales

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        copies = [images, *(rescale(images, s) for s in self.scales)]
        embeddings = self.model.encode_image(torch.cat(copies))
        return embeddings.view(len(copies), len(images), -1).transpose(0, 1)


def away_from_set(embeddings: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N,) loss to maximise: minus the cosine similarity of the (N, K, D) embeddings of each
    image's copies to the (N, D) mean embedding of its caption set, averaged over the copies."""
    return -(embeddings @ texts.unsqueeze(-1)).squeeze(-1).mean(-1)


def check_scales(scales: Any) -> tuple[float, ...]:
    """Validate resize factors: a sequence of finite numbers > 0, possibly empty."""
    if isinstance(scales, str) or not isinstance(scales, Sequence):
        raise InputError(f"scales must be a sequence of positive numbers, got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise InputError(f"scales must be finite numbers > 0, got {s!r} in {list(scales)}")
    return tuple(float(s) for s in scales)


@MULTIMODAL_ATTACKS.register(
    "sga",
    "Set-level Guidance Attack: scale-invariant L-inf PGD guided by a set of adversarial "
    "captions, then word substitution against the adversarial image set (Lu et al., 2023)",
)
class SGA(MultimodalAttack):
    r"""SGA in the paper 'Set-level Guidance Attack: Boosting Adversarial Transferability of
    Vision-Language Pre-training Models' [https://arxiv.org/abs/2307.14061] (Lu, Wang, Wang and
    Liu, ICCV 2023), for dual encoders.

    Distance Measure : Linf (image), bounded word substitutions (text)

    1. Caption set: each image is guided by a *set* of captions, its own caption followed by the
       other captions of ``caption_sets[i]`` (e.g. the other templates of its class), at most
       ``n_captions``. Each caption of the set gets word substitutions away from the *clean*
       image embedding.
    2. Image (set-level, scale-invariant): ``steps`` iterations of L-inf PGD from the clean image
       (no random start) maximising ``-mean_k cos(E(x_k), mean_j E(t'_j))``, where ``x_0`` is the
       adversarial image, ``x_k`` (k >= 1) its copies resized by ``scales[k-1]`` and back (with
       Gaussian noise of std 0.05, as in the authors' code) and ``t'_j`` the adversarial
       captions of the set. With ``scales=()`` only the image itself is used (no augmentation).
    3. Text: each pair's caption is attacked again from the original, now away from the mean
       embedding of the adversarial image and its rescaled copies (the adversarial image set).

    Simplifications vs the paper: greedy medical-synonym substitution
    (:class:`~medshield.attacks.text.WordSubstitutionAttack`) replaces BERT-Attack; the image
    loss uses the mean of the set's caption embeddings, which for unit vectors has the same
    gradient direction as the paper's sum of similarities to each caption; resizing is bilinear
    with antialiasing rather than bicubic (no overshoot outside [0, 1]); only the first caption
    of each pair is returned, rather than an adversarial version of every caption in the set.

    Threat model: white-box on the image tower (gradients of ``model.encode_image``), black-box
    on the text tower (only ``model.encode_text`` outputs); untargeted.

    Arguments:
        eps (float): L-inf image budget in /255 units. (Default: 2)
        alpha (float): image step size in /255 units. (Default: 0.5)
        steps (int): image PGD iterations. (Default: 10)
        max_edits (int): most word substitutions per caption. (Default: 2)
        min_similarity (float): smallest MiniLM cosine similarity between a caption and its
            adversarial version. (Default: 0.8)
        scales (Sequence[float]): resize factors of the augmented copies, each > 0; may be
            empty. (Default: (0.5, 0.75, 1.25, 1.5))
        n_captions (int): most captions in a guidance set, the pair's own included.
            (Default: 5, as in the paper's COCO / Flickr30k sets)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - captions: list of N non-empty strings.
        - caption_sets: optional list of N lists of strings (may be empty lists).
        - output: :class:`~medshield.attacks.multimodal.MultimodalResult` with images of the
          same shape, dtype and device, in [0, 1], within ``eps``; N captions; N edit counts.

    Examples::
        >>> modality = medshield.data.get_modality("chest_xray")
        >>> attack = SGA(eps=2, alpha=0.5, steps=10)
        >>> result = attack(model, images, captions,
        ...                 caption_sets=[modality.captions(int(y)) for y in labels])
    """

    paper = (
        "Lu, Wang, Wang and Liu. Set-level Guidance Attack: Boosting Adversarial Transferability "
        "of Vision-Language Pre-training Models. ICCV 2023"
    )
    threat_model = "white-box image tower (L-inf), black-box text tower (word substitution)"

    def __init__(
        self,
        eps: float = 2.0,
        alpha: float = 0.5,
        steps: int = 10,
        max_edits: int = 2,
        min_similarity: float = 0.8,
        scales: Sequence[float] = (0.5, 0.75, 1.25, 1.5),
        n_captions: int = 5,
    ) -> None:
        super().__init__(eps, alpha, steps, max_edits, min_similarity)
        self.scales = check_scales(scales)
        self.n_captions = check_count(n_captions, "n_captions")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "scales": list(self.scales), "n_captions": self.n_captions}

    def __call__(
        self,
        model: DualEncoder,
        images: torch.Tensor,
        captions: list[str],
        caption_sets: Sequence[Sequence[str]] | None = None,
    ) -> MultimodalResult:
        """Attack the pairs; ``caption_sets[i]`` are extra guidance captions for image i."""
        images, captions = check_pairs(model, images, captions)
        sets = check_caption_sets(captions, caption_sets, self.n_captions)
        with attack_mode(model):
            return self.perturb(model, images, captions, sets)

    def perturb(
        self,
        model: DualEncoder,
        images: torch.Tensor,
        captions: list[str],
        caption_sets: list[list[str]] | None = None,
    ) -> MultimodalResult:
        """The attack on validated inputs; ``caption_sets`` are the full guidance sets
        (default: each caption alone)."""
        sets = caption_sets if caption_sets is not None else [[c] for c in captions]
        copies = ScaledCopies(model, self.scales)
        with torch.no_grad():
            clean_images = model.encode_image(images)
        flat = [c for s in sets for c in s]
        owner = torch.tensor([i for i, s in enumerate(sets) for _ in s], device=images.device)
        adv_set, _ = self.attack_texts(model, flat, clean_images[owner])
        with torch.no_grad():
            set_embeddings = model.encode_text(adv_set)
            guidance = torch.zeros_like(clean_images).index_add_(0, owner, set_embeddings)
        pgd = PGD(
            copies,
            eps=self.eps,
            alpha=self.alpha,
            steps=self.steps,
            random_start=False,
            loss_fn=away_from_set,
        )
        adv_images = pgd(images, F.normalize(guidance, dim=-1))
        with torch.no_grad():
            adv_set_embeddings = F.normalize(copies(adv_images).mean(1), dim=-1)
        adv_captions, edits = self.attack_texts(model, captions, adv_set_embeddings)
        return MultimodalResult(adv_images, adv_captions, edits)
