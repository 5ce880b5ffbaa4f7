"""The interface of multimodal attacks on image-text pairs, and helpers they share.

A multimodal attack perturbs both halves of matched image-caption pairs against a surrogate
:class:`~medshield.models.DualEncoder`: each image gets a bounded L-inf perturbation (budgets in
/255 units, images in [0, 1], see docs/design.md) and each caption bounded word substitutions,
so that the pair moves apart in the surrogate's embedding space. Noisy upstream datasets are
crafted with them; :meth:`MultimodalAttack.config` gives the arguments a dataset manifest
records, and :func:`build_multimodal_attack` builds the attack a config names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medshield.attacks.base import attack_mode, check_budget, check_count
from medshield.attacks.text import WordSubstitutionAttack
from medshield.errors import ConfigError, InputError
from medshield.models.base import DualEncoder, check_images, check_texts
from medshield.registry import MULTIMODAL_ATTACKS


@dataclass
class MultimodalResult:
    """The adversarial pairs.

    Attributes:
        images: adversarial images, same shape, dtype and device as the input, in [0, 1], within
            ``eps`` (L-inf) of the input.
        captions: adversarial captions, one per image.
        text_edits: number of word (or phrase) substitutions in each caption.
    """

    images: torch.Tensor
    captions: list[str]
    text_edits: list[int]


class MultimodalAttack(ABC):
    """Base class of attacks on matched image-caption pairs.

    Call: ``attack(model, images, captions) -> MultimodalResult``.

    - model: the surrogate :class:`~medshield.models.DualEncoder`.
    - images: float (N, C, H, W) in [0, 1], C = 1 or 3.
    - captions: N non-empty strings, ``captions[i]`` paired with ``images[i]``.

    The model runs in eval mode with frozen parameters during the call (:func:`attack_mode`);
    every submodule's train/eval mode and every parameter's ``requires_grad`` flag are restored
    afterwards. Subclasses implement :meth:`perturb` and :meth:`config` and set ``paper`` and
    ``threat_model``; ``MULTIMODAL_ATTACKS.register`` sets ``name``, the registry key.

    Args (shared by the built-in attacks):
        eps: L-inf image budget in /255 units.
        alpha: image step size in /255 units.
        steps: image attack iterations.
        max_edits: most word substitutions per caption.
        min_similarity: smallest sentence-encoder (MiniLM) cosine similarity between a caption
            and its adversarial version.
    """

    name: str = ""
    paper: str = ""
    threat_model: str = ""

    def __init__(
        self,
        eps: float = 2.0,
        alpha: float = 0.5,
        steps: int = 10,
        max_edits: int = 2,
        min_similarity: float = 0.8,
    ) -> None:
        self.eps = check_budget(eps, "eps")
        self.alpha = check_budget(alpha, "alpha")
        self.steps = check_count(steps, "steps")
        if isinstance(min_similarity, bool) or not isinstance(min_similarity, (int, float)):
            raise InputError(f"min_similarity must be a number, got {min_similarity!r}")
        self.text_attack = WordSubstitutionAttack(max_edits, float(min_similarity))
        self.max_edits = max_edits
        self.min_similarity = float(min_similarity)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __call__(
        self, model: DualEncoder, images: torch.Tensor, captions: list[str]
    ) -> MultimodalResult:
        images, captions = check_pairs(model, images, captions)
        with attack_mode(model):
            return self.perturb(model, images, captions)

    @abstractmethod
    def perturb(
        self, model: DualEncoder, images: torch.Tensor, captions: list[str]
    ) -> MultimodalResult:
        """The attack proper, on validated inputs, with the model already in attack mode."""

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable (for dataset manifests)."""
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "max_edits": self.max_edits,
            "min_similarity": self.min_similarity,
        }

    def attack_texts(
        self, model: DualEncoder, captions: list[str], reference: torch.Tensor
    ) -> tuple[list[str], list[int]]:
        """Word-substitute each caption away from its (N, D) reference embedding; return the
        adversarial captions and their edit counts."""
        results = self.text_attack(model, captions, reference=reference)
        return [r.perturbed for r in results], [len(r.edits) for r in results]


def build_multimodal_attack(name: str, kwargs: dict[str, Any]) -> MultimodalAttack:
    """The registered multimodal attack ``name`` built with ``kwargs``, or a ConfigError."""
    attack_class = MULTIMODAL_ATTACKS.get(name)
    try:
        return attack_class(**kwargs)
    except (TypeError, InputError) as exc:
        raise ConfigError(f"the arguments {kwargs} do not fit attack {name!r}: {exc}") from None


def check_pairs(model: Any, images: Any, captions: Any) -> tuple[torch.Tensor, list[str]]:
    """Validate a surrogate model and a batch of image-caption pairs.

    Raises:
        InputError: ``model`` is not a DualEncoder; bad images (see
            :func:`~medshield.models.base.check_images`); empty caption list or an empty caption;
            a different number of images and captions.
    """
    if not isinstance(model, DualEncoder):
        raise InputError(
            f"multimodal attacks need a DualEncoder surrogate, got {type(model).__name__}"
        )
    images = check_images(images).detach()
    captions = check_texts(captions)
    if len(images) != len(captions):
        raise InputError(f"got {len(images)} images for {len(captions)} captions")
    return images, captions


def check_caption_sets(
    captions: list[str], caption_sets: Sequence[Sequence[str]] | None, n_captions: int
) -> list[list[str]]:
    """The guidance set of each pair: its caption, then the distinct other captions of
    ``caption_sets[i]``, at most ``n_captions`` in all.

    Raises:
        InputError: ``caption_sets`` is not one list of strings per caption, or holds an empty
            string.
    """
    if caption_sets is None:
        return [[c] for c in captions]
    if isinstance(caption_sets, str) or not isinstance(caption_sets, Sequence):
        raise InputError("caption_sets must be a list with one list of captions per image")
    if len(caption_sets) != len(captions):
        raise InputError(f"got {len(caption_sets)} caption sets for {len(captions)} captions")
    sets = []
    for i, (caption, extra) in enumerate(zip(captions, caption_sets, strict=True)):
        if isinstance(extra, str) or not isinstance(extra, Sequence):
            raise InputError(f"caption_sets[{i}] must be a list of strings")
        others = check_texts(extra) if len(extra) else []
        sets.append(list(dict.fromkeys([caption, *others]))[:n_captions])
    return sets
