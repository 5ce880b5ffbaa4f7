"""Read a noisy upstream dataset written by :func:`medshield.noise.craft_noisy_dataset`.

:class:`NoisyCaptionDataset` gives items in the same format as
:class:`medshield.data.ImageCaptionDataset` (plus ``perturbed``), so anything that trains on a
clean dataset, such as :func:`medshield.train.pretrain.pretrain`, trains on a noisy one unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medshield.errors import DataError
from medshield.noise.craft import CLEAN_SHARD, FORMAT, MANIFEST, ROWS, file_sha256, read_shard


class NoisyCaptionDataset(Dataset):
    """A crafted noisy dataset: fixed captions, uint8 images, a manifest of what was perturbed.

    Items are dicts ``{"image": float tensor (C, H, W) in [0, 1], "caption": str, "label": int,
    "modality": str, "index": int, "perturbed": bool}``. Captions are fixed: an adversarial
    caption is the data, so :meth:`set_epoch` changes nothing.

    Args:
        path: the directory :func:`~medshield.noise.craft_noisy_dataset` wrote.
        verify: check every file against the manifest's sha256 before loading.

    Attributes:
        manifest: the parsed ``manifest.json``.
        images: uint8 tensor (N, C, H, W), as stored.
        labels: int64 array (N,).
        modality_of: each item's modality name.
        captions: each item's stored caption.
        perturbed: bool array (N,), True where the pair is adversarial.

    Raises:
        DataError: the manifest is missing (crafting unfinished) or malformed, a file is missing
            or fails its checksum, or the shards do not cover every row exactly once.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(
                f"{self.path} is an incomplete or not a noisy dataset ({MANIFEST} is missing); "
                "rerun craft-noise with the same arguments to finish it"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise DataError(
                f"{manifest_path} has format {self.manifest.get('format')!r}; "
                f"this medshield reads format {FORMAT}"
            )
        if verify:
            self._verify()

        rows = [json.loads(line) for line in (self.path / ROWS).read_text().splitlines()]
        n = int(self.manifest["num_rows"])
        if [r["index"] for r in rows] != list(range(n)):
            raise DataError(f"{self.path / ROWS} does not list rows 0..{n - 1} in order")
        self.labels = np.array([r["label"] for r in rows], dtype=np.int64)
        self.modality_of: list[str] = [r["modality"] for r in rows]
        self.captions: list[str] = [r["caption"] for r in rows]
        self.perturbed = np.array([r["perturbed"] for r in rows], dtype=bool)

        shape = self.manifest["clean"]["image_shape"]
        self.images = torch.zeros((n, *shape), dtype=torch.uint8)
        filled = np.zeros(n, dtype=np.int64)
        for name in [CLEAN_SHARD, *self.manifest["shards"]]:
            images, indices, _ = read_shard(self.path / name)
            if tuple(images.shape) != (len(indices), *shape) or images.dtype != torch.uint8:
                raise DataError(f"{self.path / name} holds images of an unexpected shape or type")
            self.images[indices] = images
            np.add.at(filled, indices, 1)
        if not (filled == 1).all():
            raise DataError(f"the shards in {self.path} do not hold every row exactly once")

    def _verify(self) -> None:
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise DataError(f"{file} is missing from the noisy dataset {self.path}")
            if file_sha256(file) != expected:
                raise DataError(
                    f"{file} fails its checksum (the manifest records sha256 {expected}); the "
                    "file is corrupt or was changed: craft the dataset again"
                )

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Do nothing: a noisy dataset's captions are fixed (kept for interface parity)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index = int(index) % n
        return {
            "image": self.images[index].float() / 255.0,
            "caption": self.captions[index],
            "label": int(self.labels[index]),
            "modality": self.modality_of[index],
            "index": index,
            "perturbed": bool(self.perturbed[index]),
        }
