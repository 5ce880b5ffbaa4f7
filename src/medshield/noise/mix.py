"""Noisy datasets at any ratio from one fully adversarial *pool*, without crafting again.

A noise-ratio sweep needs the same upstream pairs at ratios 0, 0.05, ..., 1. Crafting each
ratio separately repeats the attack on the same pairs; instead, craft the pool once at ratio 1
(:func:`~medshield.noise.craft_noisy_dataset` with ``ratio=1``) and take, for a ratio ``r`` and a
seed, the adversarial pair for the rows :func:`~medshield.noise.choose_perturbed` picks and the
clean pair for the rest. Because that choice is nested, a larger ratio only adds adversarial
pairs to a smaller one (with the same seed), which removes sampling noise from the sweep.

Items look like :class:`~medshield.noise.NoisyCaptionDataset` items, so pretraining reads a mix
as it reads any dataset. Captions are fixed, as in a crafted dataset: the clean rows keep the
caption crafting stored (the clean dataset's epoch-0 caption).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from medshield.data import ImageCaptionDataset
from medshield.errors import DataError, InputError
from medshield.noise.craft import choose_perturbed, describe_clean, epoch0_captions
from medshield.noise.dataset import NoisyCaptionDataset


class NoisyMix(Dataset):
    """``clean`` with a fraction ``ratio`` of its pairs taken from the adversarial ``pool``.

    Args:
        clean: the clean upstream dataset the pool was crafted from.
        pool: a noisy dataset crafted from ``clean`` with ``ratio=1`` (every pair adversarial);
            ``None`` only at ``ratio=0``, where no pair is taken from it.
        ratio: fraction of pairs that are adversarial, in [0, 1].
        seed: picks the adversarial rows (:func:`~medshield.noise.choose_perturbed`).

    Attributes:
        perturbed: bool array (N,), True where the pair is adversarial.

    Raises:
        DataError: the pool was crafted from another dataset, or not at ratio 1.
        InputError: ``ratio`` outside [0, 1], or no pool with ``ratio`` above 0.
    """

    def __init__(
        self,
        clean: ImageCaptionDataset,
        pool: NoisyCaptionDataset | None,
        ratio: float,
        seed: int,
    ) -> None:
        if pool is None:
            if ratio != 0:
                raise InputError(f"a mix at ratio {ratio:g} needs a pool; only ratio 0 needs none")
        elif pool.manifest["clean"]["content_sha256"] != describe_clean(clean)["content_sha256"]:
            raise DataError(
                f"the pool {pool.path} was crafted from another clean dataset (different "
                "modalities, cap, seed or images); craft it from this one"
            )
        elif not pool.perturbed.all():
            raise DataError(
                f"the pool {pool.path} must be crafted at ratio 1 (every pair adversarial); it "
                f"has {int(pool.perturbed.sum())} of {len(pool)} adversarial pairs"
            )
        self.clean, self.pool, self.ratio, self.seed = clean, pool, ratio, seed
        self.perturbed = np.zeros(len(clean), dtype=bool)
        self.perturbed[choose_perturbed(clean.modality_of, ratio, seed)] = True
        self.modality_of = clean.modality_of
        self._clean_captions = epoch0_captions(clean)

    def __len__(self) -> int:
        return len(self.clean)

    def set_epoch(self, epoch: int) -> None:
        """Do nothing: captions are fixed, as in a crafted noisy dataset."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.perturbed[index]:
            assert self.pool is not None  # ratio > 0 has a pool (checked in __init__)
            item = self.pool[index]
        else:
            item = dict(self.clean[index])
            item["caption"] = self._clean_captions[int(index) % len(self)]
            item["perturbed"] = False
        return item
