"""Image-caption pairs over several modalities, for contrastive (CLIP-style) training.

Each item's caption is one of its modality's templates filled with its class phrase, drawn
deterministically from ``(seed, epoch, index)``: the same dataset gives the same captions, and
:meth:`ImageCaptionDataset.set_epoch` draws new ones (caption augmentation across epochs).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medshield.data.medmnist import class_balanced_indices, load_split
from medshield.data.modalities import Modality, get_modality
from medshield.errors import DataError


class ImageCaptionDataset(Dataset):
    """MedMNIST images of one or more modalities paired with template captions.

    Items are dicts ``{"image": float tensor (C, 28, 28) in [0, 1], "caption": str,
    "label": int, "modality": str, "index": int}``. With ``rgb=True`` (default) grey images are
    replicated to 3 channels so batches that mix modalities collate.

    Args:
        modalities: modality names (or MedMNIST subset names); duplicates are dropped.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seeds the per-class cap and the caption draws.
        per_class_cap: keep at most this many items per class of each modality (None: all).
        data_dir: data root (see :func:`medshield.data.data_root`).
        rgb: replicate grey images to 3 channels. With ``rgb=False`` all modalities must have
            the same channel count.
        skip_missing: leave out modalities whose split cannot be loaded, recording why in
            :attr:`skipped`, instead of raising.

    Attributes:
        modalities: the names of the modalities that were loaded, in request order.
        skipped: ``{modality: reason}`` for the modalities left out by ``skip_missing``.
        images: float tensor (N, C, 28, 28) in [0, 1].
        labels: int64 array (N,), class index within each item's modality.
        modality_of: the modality name of each item.
        per_class_cap: the cap the dataset was built with.
        source_indices: int64 array (N,), each item's row in its MedMNIST split.
        epoch: the epoch captions are drawn for (see :meth:`set_epoch`).

    Raises:
        DataError: empty ``modalities``; a modality without the split (unless ``skip_missing``);
            every modality skipped; mixed channel counts with ``rgb=False``.
        UnknownNameError: an unknown modality name.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        split: str = "train",
        seed: int = 0,
        per_class_cap: int | None = None,
        data_dir: str | Path | None = None,
        rgb: bool = True,
        skip_missing: bool = False,
    ) -> None:
        if isinstance(modalities, str):
            modalities = [modalities]
        if not modalities:
            raise DataError("ImageCaptionDataset needs at least one modality")
        requested = list(dict.fromkeys(get_modality(name).name for name in modalities))

        self.split = split
        self.seed = seed
        self.per_class_cap = per_class_cap
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        self.modalities: list[str] = []
        self._modality: dict[str, Modality] = {}
        images: list[torch.Tensor] = []
        labels: list[np.ndarray] = []
        sources: list[np.ndarray] = []
        for name in requested:
            try:
                data = load_split(name, split, data_dir)
            except DataError as exc:
                if not skip_missing:
                    raise
                self.skipped[name] = str(exc)
                warnings.warn(f"skipping modality {name!r}: {exc}", stacklevel=2)
                continue
            keep = class_balanced_indices(data.labels, per_class_cap, seed)
            tensor = data.tensor(keep)
            if rgb and tensor.shape[1] == 1:
                tensor = tensor.expand(-1, 3, -1, -1)
            images.append(tensor)
            labels.append(data.labels[keep])
            sources.append(keep)
            self.modalities.append(name)
            self._modality[name] = data.modality

        if not self.modalities:
            raise DataError(
                f"none of the requested modalities has a {split!r} split: "
                + "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())
            )
        channels = {name: int(t.shape[1]) for name, t in zip(self.modalities, images, strict=True)}
        if len(set(channels.values())) > 1:
            raise DataError(
                f"modalities have different channel counts {channels} and rgb=False; "
                "use rgb=True to replicate grey images to 3 channels"
            )
        self.images = torch.cat(images)
        self.labels = np.concatenate(labels)
        self.source_indices = np.concatenate(sources)
        self.modality_of: list[str] = [
            name for name, lab in zip(self.modalities, labels, strict=True) for _ in range(len(lab))
        ]

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Draw captions for ``epoch`` from now on (call once per training epoch)."""
        self.epoch = epoch

    def caption(self, index: int) -> str:
        """The caption item ``index`` gets at the current seed and epoch."""
        index = self._check_index(index)
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return self._modality[self.modality_of[index]].sample_caption(int(self.labels[index]), rng)

    def captions_for(self, index: int) -> list[str]:
        """Every template caption of item ``index``'s class (one per template)."""
        index = self._check_index(index)
        return self._modality[self.modality_of[index]].captions(int(self.labels[index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        return {
            "image": self.images[index],
            "caption": self.caption(index),
            "label": int(self.labels[index]),
            "modality": self.modality_of[index],
            "index": index,
        }

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        return int(index) % n
