"""MedMNIST loaders on the real files in shared/data and on broken files made in tmp_path."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from medshield.data import (
    available_modalities,
    class_balanced_indices,
    data_root,
    load_split,
    missing_data_error,
)
from medshield.errors import DataError, UnknownNameError


@pytest.fixture
def no_medmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import medmnist` fail, whether or not the package is installed."""
    monkeypatch.setitem(sys.modules, "medmnist", None)


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    (tmp_path / "medmnist").mkdir()
    return tmp_path


def _arrays(split: str = "test", n: int = 6, channels: int | None = None, classes: int = 2):
    rng = np.random.default_rng(0)
    shape = (n, 28, 28) if channels is None else (n, 28, 28, channels)
    return {
        f"{split}_images": rng.integers(0, 256, shape, dtype=np.uint8),
        f"{split}_labels": (np.arange(n) % classes).astype(np.uint8).reshape(n, 1),
    }


def _write(root: Path, name: str, **arrays: np.ndarray) -> Path:
    path = root / "medmnist" / name
    with path.open("wb") as f:  # a file object, so numpy does not rename the file
        np.savez(f, **arrays)
    return path


# --- data_root -------------------------------------------------------------------------------


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSHIELD_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("MEDSHIELD_DATA_DIR")
    assert data_root() == tmp_path / "xdg" / "medshield" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "medshield" / "data"


# --- real files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "split", "n", "channels", "subset"),
    [
        ("chest_xray", "train", 4708, 1, "pneumoniamnist"),
        ("chest_xray", "val", 524, 1, "pneumoniamnist"),
        ("chest_xray", "test", 624, 1, "pneumoniamnist"),
        ("breast_ultrasound", "train", 546, 1, "breastmnist"),
        ("fundus", "test", 400, 3, "retinamnist"),
        ("blood_cell", "train", 6000, 3, "bloodmnist"),
        ("abdominal_ct", "val", 1000, 1, "organamnist"),
        ("colon_pathology", "test", 718, 3, "pathmnist"),
    ],
)
def test_real_split_shapes(
    data_dir: Path, modality: str, split: str, n: int, channels: int, subset: str
) -> None:
    data = load_split(modality, split, data_dir)
    assert len(data) == n
    assert data.images.shape == (n, 28, 28, channels)
    assert data.images.dtype == np.uint8
    assert data.labels.shape == (n,) and data.labels.dtype == np.int64
    assert 0 <= data.labels.min() and data.labels.max() < data.modality.num_classes
    assert (data.modality.name, data.subset, data.split) == (modality, subset, split)
    assert data.path.is_file() and data.path.parent == data_dir / "medmnist"


def test_data_dir_defaults_to_env(data_dir: Path) -> None:
    assert load_split("breast_ultrasound", "val").path == data_dir / "medmnist" / "breastmnist.npz"


def test_tensor_is_nchw_float_in_unit_range(data_dir: Path) -> None:
    data = load_split("fundus", "val", data_dir)
    x = data.tensor([3, 0, 7])
    assert x.shape == (3, 3, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    expected = torch.from_numpy(data.images[[3, 0, 7]].astype(np.float32) / 255).permute(0, 3, 1, 2)
    assert torch.allclose(x, expected)
    assert data.tensor().shape == (120, 3, 28, 28)


def test_loaded_arrays_are_cached_and_read_only(data_dir: Path) -> None:
    first = load_split("chest_xray", "val", data_dir)
    second = load_split("chest_xray", "val", data_dir)
    assert first.images is second.images
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 1


def test_subset_name_selects_that_subset(data_dir: Path) -> None:
    data = load_split("pneumoniamnist", "test", data_dir)
    assert data.modality.name == "chest_xray" and data.subset == "pneumoniamnist"


def test_path_has_no_train_split(data_dir: Path, no_medmnist: None) -> None:
    with pytest.raises(DataError, match=r"pathmnist_test718\.npz has keys \['test_images'"):
        load_split("colon_pathology", "train", data_dir)


def test_bad_split_and_unknown_modality(data_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_split("chest_xray", "validation", data_dir)
    with pytest.raises(UnknownNameError, match="unknown modality 'mri'"):
        load_split("mri", "test", data_dir)


def test_available_modalities(data_dir: Path) -> None:
    expected = [
        "chest_xray",
        "fundus",
        "breast_ultrasound",
        "blood_cell",
        "colon_pathology",
        "abdominal_ct",
    ]
    assert available_modalities(data_dir) == expected
    assert available_modalities(data_dir, split="train") == [
        m for m in expected if m != "colon_pathology"
    ]
    assert available_modalities(data_dir.parent / "no-such-dir") == []


# --- class_balanced_indices ------------------------------------------------------------------


def test_class_balanced_indices() -> None:
    labels = np.array([0] * 50 + [1] * 5 + [2] * 30)
    idx = class_balanced_indices(labels, 10, seed=3)
    assert np.array_equal(idx, np.sort(idx))
    assert np.bincount(labels[idx]).tolist() == [10, 5, 10]
    assert np.array_equal(idx, class_balanced_indices(labels, 10, seed=3))
    assert not np.array_equal(idx, class_balanced_indices(labels, 10, seed=4))
    assert np.array_equal(class_balanced_indices(labels, None, seed=0), np.arange(85))
    with pytest.raises(ValueError, match="per_class_cap"):
        class_balanced_indices(labels, 0, seed=0)


# --- local files made in tmp_path ------------------------------------------------------------


def test_valid_tiny_files_load(fake_root: Path) -> None:
    _write(fake_root, "breastmnist.npz", **_arrays(n=6))
    _write(fake_root, "retinamnist_part.npz", **_arrays("val", n=4, channels=3, classes=5))
    grey = load_split("breast_ultrasound", "test", fake_root)
    assert grey.images.shape == (6, 28, 28, 1)
    assert grey.labels.tolist() == [0, 1, 0, 1, 0, 1]
    rgb = load_split("fundus", "val", fake_root)
    assert rgb.images.shape == (4, 28, 28, 3) and rgb.path.name == "retinamnist_part.npz"


def test_rewritten_file_is_reread(fake_root: Path) -> None:
    _write(fake_root, "breastmnist.npz", **_arrays(n=6))
    assert len(load_split("breast_ultrasound", "test", fake_root)) == 6
    _write(fake_root, "breastmnist.npz", **_arrays(n=8))
    assert len(load_split("breast_ultrasound", "test", fake_root)) == 8


def test_truncated_npz(fake_root: Path) -> None:
    path = _write(fake_root, "breastmnist.npz", **_arrays(n=6))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"breastmnist\.npz.*download it again"):
        load_split("breast_ultrasound", "test", fake_root)


def test_not_a_zip(fake_root: Path) -> None:
    (fake_root / "medmnist" / "breastmnist.npz").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match=r"breastmnist\.npz.*corrupt"):
        load_split("breast_ultrasound", "test", fake_root)


def test_single_array_npy_disguised_as_npz(fake_root: Path) -> None:
    with (fake_root / "medmnist" / "breastmnist.npz").open("wb") as f:
        np.save(f, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="single array"):
        load_split("breast_ultrasound", "test", fake_root)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 32, 32), np.uint8), np.zeros((4, 1), np.uint8), r"shape \(4, 32, 32\)"),
        (np.zeros((4, 28, 28, 2), np.uint8), np.zeros((4, 1), np.uint8), "C = 1 or 3"),
        (np.zeros((4, 28, 28), np.float32), np.zeros((4, 1), np.uint8), "dtype float32"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "4 test images but 3"),
        (np.zeros((4, 28, 28), np.uint8), np.full((4, 1), 2, np.uint8), "2 classes"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros((4, 14), np.uint8), "multi-label"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros((4, 1), np.float64), "expected integers"),
    ],
)
def test_malformed_arrays(
    fake_root: Path, images: np.ndarray, labels: np.ndarray, message: str
) -> None:
    _write(fake_root, "breastmnist.npz", test_images=images, test_labels=labels)
    with pytest.raises(DataError, match=message) as info:
        load_split("breast_ultrasound", "test", fake_root)
    assert "breastmnist.npz" in str(info.value)


def test_missing_split_key(fake_root: Path, no_medmnist: None) -> None:
    _write(fake_root, "breastmnist.npz", **_arrays("train"))
    with pytest.raises(DataError, match=r"breastmnist\.npz has keys \['train_images'"):
        load_split("breast_ultrasound", "test", fake_root)


def test_missing_files_without_medmnist(tmp_path: Path, no_medmnist: None) -> None:
    with pytest.raises(DataError) as info:
        load_split("dermatoscopy", "train", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "medmnist") in message
    assert "dermamnist.npz" in message
    assert "MEDSHIELD_DATA_DIR" in message and "pip install -e '.[online]'" in message


def test_empty_split_names_the_file_and_the_split(fake_root: Path) -> None:
    _write(fake_root, "breastmnist.npz", **_arrays(n=0))
    with pytest.raises(DataError, match=r"breastmnist\.npz: the 'test' split .* zero images"):
        load_split("breast_ultrasound", "test", fake_root)


def test_missing_data_error_names_folder_files_reasons_and_fixes(tmp_path: Path) -> None:
    message = str(missing_data_error("test", tmp_path))
    assert f"{(tmp_path / 'medmnist').absolute()} (which does not exist)" in message
    assert "pneumoniamnist.npz" in message and "organsmnist.npz" in message
    assert "MEDSHIELD_DATA_DIR" in message and "pip install -e '.[online]'" in message
    assert "Found but unusable" not in message

    (tmp_path / "medmnist").mkdir()
    (tmp_path / "medmnist" / "bloodmnist.npz").write_bytes(b"not a zip")
    _write(tmp_path, "breastmnist.npz", **_arrays(n=0))
    message = str(missing_data_error("test", tmp_path))
    assert "(which does not exist)" not in message
    assert "bloodmnist.npz" in message and "corrupt" in message
    assert "breastmnist.npz: the 'test' split" in message


# --- download through the medmnist package (faked: no network) -------------------------------


def _fake_medmnist(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> list[dict]:
    calls: list[dict] = []

    class BreastMNIST:
        def __init__(self, split: str, download: bool, root: str) -> None:
            calls.append({"split": split, "download": download, "root": root})
            if fail:
                raise RuntimeError("network unreachable")
            with (Path(root) / "breastmnist.npz").open("wb") as f:
                np.savez(f, **_arrays(split, n=5))

    module = types.ModuleType("medmnist")
    module.INFO = {"breastmnist": {"python_class": "BreastMNIST"}}
    module.BreastMNIST = BreastMNIST
    monkeypatch.setitem(sys.modules, "medmnist", module)
    monkeypatch.delenv("MEDSHIELD_OFFLINE")  # conftest forbids downloads; these fake one
    return calls


def test_download_with_medmnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_medmnist(monkeypatch)
    data = load_split("breast_ultrasound", "val", tmp_path)
    assert len(data) == 5 and data.path == tmp_path / "medmnist" / "breastmnist.npz"
    assert calls == [{"split": "val", "download": True, "root": str(tmp_path / "medmnist")}]


def test_partial_file_does_not_block_download(
    monkeypatch: pytest.MonkeyPatch, fake_root: Path
) -> None:
    calls = _fake_medmnist(monkeypatch)
    _write(fake_root, "breastmnist_test_only.npz", **_arrays("test"))
    assert load_split("breast_ultrasound", "train", fake_root).path.name == "breastmnist.npz"
    assert [c["split"] for c in calls] == ["train"]


def test_no_download_when_disabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_medmnist(monkeypatch)
    with pytest.raises(DataError, match="no MedMNIST file"):
        load_split("breast_ultrasound", "val", tmp_path, download=False)
    assert available_modalities(tmp_path) == []
    assert calls == []


def test_offline_environment_disables_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake_medmnist(monkeypatch)
    monkeypatch.setenv("MEDSHIELD_OFFLINE", "1")
    with pytest.raises(DataError, match="no MedMNIST file"):
        load_split("breast_ultrasound", "val", tmp_path)
    assert calls == []


def test_failed_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_medmnist(monkeypatch, fail=True)
    with pytest.raises(DataError, match="could not download breastmnist.*network unreachable"):
        load_split("breast_ultrasound", "val", tmp_path)
