"""ImageCaptionDataset: determinism, caption augmentation, class caps, mixed-modality batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medshield.data import ImageCaptionDataset, get_modality, load_split
from medshield.errors import DataError, UnknownNameError

CAP = 20


@pytest.fixture(scope="module")
def mixed(data_dir: Path) -> ImageCaptionDataset:
    """Grey chest X-rays and RGB blood cells, 20 per class."""
    return ImageCaptionDataset(
        ["chest_xray", "blood_cell"], split="val", seed=0, per_class_cap=CAP, data_dir=data_dir
    )


def _captions(ds: ImageCaptionDataset) -> list[str]:
    return [ds[i]["caption"] for i in range(len(ds))]


def test_per_class_cap_is_exact(mixed: ImageCaptionDataset) -> None:
    counts = Counter(zip(mixed.modality_of, mixed.labels.tolist(), strict=True))
    assert len(counts) == 2 + 8
    assert set(counts.values()) == {CAP}
    assert len(mixed) == 10 * CAP and mixed.modalities == ["chest_xray", "blood_cell"]


def test_item_contents(mixed: ImageCaptionDataset) -> None:
    for i in (0, len(mixed) - 1):
        item = mixed[i]
        modality = get_modality(item["modality"])
        assert item["image"].shape == (3, 28, 28) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["index"] == i and isinstance(item["label"], int)
        assert item["caption"] in mixed.captions_for(i)
        assert modality.class_names[item["label"]] in item["caption"]
        assert mixed.captions_for(i) == modality.captions(item["label"])
    grey = mixed[0]["image"]
    assert mixed.modality_of[0] == "chest_xray"
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])


def test_items_match_source_rows(mixed: ImageCaptionDataset, data_dir: Path) -> None:
    blood = load_split("blood_cell", "val", data_dir)
    i = len(mixed) - 1
    assert mixed.labels[i] == blood.labels[mixed.source_indices[i]]
    assert torch.equal(mixed[i]["image"], blood.tensor([mixed.source_indices[i]])[0])


def test_captions_are_deterministic(data_dir: Path, mixed: ImageCaptionDataset) -> None:
    again = ImageCaptionDataset(
        ["chest_xray", "blood_cell"], split="val", seed=0, per_class_cap=CAP, data_dir=data_dir
    )
    assert _captions(again) == _captions(mixed)
    assert np.array_equal(again.source_indices, mixed.source_indices)
    other_seed = ImageCaptionDataset(
        ["chest_xray", "blood_cell"], split="val", seed=1, per_class_cap=CAP, data_dir=data_dir
    )
    assert not np.array_equal(other_seed.source_indices, mixed.source_indices)


def test_set_epoch_resamples_captions(mixed: ImageCaptionDataset) -> None:
    epoch0 = _captions(mixed)
    mixed.set_epoch(1)
    try:
        epoch1 = _captions(mixed)
    finally:
        mixed.set_epoch(0)
    changed = sum(a != b for a, b in zip(epoch0, epoch1, strict=True))
    assert 0 < changed < len(mixed)
    assert _captions(mixed) == epoch0


def test_mixed_batch_collates(mixed: ImageCaptionDataset) -> None:
    loader = DataLoader(
        mixed, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (64, 3, 28, 28)
    assert len(batch["caption"]) == 64 and batch["label"].shape == (64,)
    assert set(batch["modality"]) == {"chest_xray", "blood_cell"}


def test_native_channels(data_dir: Path) -> None:
    grey = ImageCaptionDataset(
        ["chest_xray"], split="val", per_class_cap=3, data_dir=data_dir, rgb=False
    )
    assert grey[0]["image"].shape == (1, 28, 28)
    with pytest.raises(DataError, match="different channel counts"):
        ImageCaptionDataset(
            ["chest_xray", "fundus"], split="val", per_class_cap=3, data_dir=data_dir, rgb=False
        )


def test_bad_requests(data_dir: Path) -> None:
    with pytest.raises(DataError, match="at least one modality"):
        ImageCaptionDataset([], data_dir=data_dir)
    with pytest.raises(UnknownNameError, match="unknown modality 'ultrasound'"):
        ImageCaptionDataset(["chest_xray", "ultrasound"], data_dir=data_dir)
    with pytest.raises(DataError, match="pathmnist_test718.npz"):
        ImageCaptionDataset(["chest_xray", "colon_pathology"], split="train", data_dir=data_dir)


def test_index_out_of_range(mixed: ImageCaptionDataset) -> None:
    with pytest.raises(IndexError):
        mixed[len(mixed)]
    assert mixed[-1]["index"] == len(mixed) - 1


def test_skip_missing(data_dir: Path) -> None:
    with pytest.warns(UserWarning, match="skipping modality 'colon_pathology'"):
        ds = ImageCaptionDataset(
            ["breast_ultrasound", "colon_pathology"],
            split="train",
            data_dir=data_dir,
            skip_missing=True,
        )
    assert ds.modalities == ["breast_ultrasound"] and len(ds) == 546
    assert list(ds.skipped) == ["colon_pathology"]
    assert "pathmnist_test718.npz" in ds.skipped["colon_pathology"]
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the requested"):
        ImageCaptionDataset(
            ["colon_pathology", "dermatoscopy"], split="train", data_dir=data_dir, skip_missing=True
        )
