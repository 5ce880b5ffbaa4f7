"""MedMNIST 2D loaders: local ``.npz`` files first, the ``medmnist`` package as a fallback.

Files live in ``<data root>/medmnist/``. For each subset of a modality (see
:mod:`medshield.data.modalities`) the loader accepts ``<subset>.npz`` and then partial files named
``<subset>_*.npz`` (e.g. ``pathmnist_test718.npz``, which holds only the test split). Every file
uses the MedMNIST keys ``train_images``, ``train_labels``, ``val_*`` and ``test_*``.

The data root is, in order: the ``data_dir`` argument, the ``MEDSHIELD_DATA_DIR`` environment
variable, ``$XDG_CACHE_HOME/medshield/data`` (``~/.cache/medshield/data`` by default).
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from medshield.data.modalities import MODALITIES, Modality, get_modality
from medshield.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_SIZE = 28

# What np.load raises on a truncated, corrupt or non-npz file.
_READ_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error)

# The second fix every missing-data error offers (the `online` extra is the medmnist package).
ONLINE_FIX = (
    "run `pip install -e '.[online]'` (the online extra: the medmnist package) on a machine "
    "with network access"
)


def data_root(data_dir: str | Path | None = None) -> Path:
    """The directory that holds medshield's data (``medmnist/``, ``vqa_rad/``, ...).

    Args:
        data_dir: explicit directory; wins over everything else.

    Returns:
        ``data_dir``, else ``$MEDSHIELD_DATA_DIR``, else ``$XDG_CACHE_HOME/medshield/data``
        (``~/.cache/medshield/data`` when ``XDG_CACHE_HOME`` is unset).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MEDSHIELD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "medshield" / "data"


@dataclass(frozen=True, eq=False)
class MedMNISTSplit:
    """One split of one MedMNIST subset, validated.

    Attributes:
        images: uint8 array (N, 28, 28, C), C = 1 (grey) or 3 (RGB); read-only (shared cache).
        labels: int64 array (N,) of class indices into ``modality.class_names``; read-only.
        modality: the modality the subset belongs to.
        subset: the MedMNIST subset name, e.g. ``"pneumoniamnist"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        path: the ``.npz`` file the arrays were read from.
    """

    images: np.ndarray
    labels: np.ndarray
    modality: Modality
    subset: str
    split: str
    path: Path

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        """1 for grey images, 3 for RGB."""
        return int(self.images.shape[-1])

    def tensor(self, indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Images as a float32 tensor (N, C, 28, 28) in [0, 1].

        Args:
            indices: rows to take (all rows when None).
        """
        images = self.images
        if indices is not None:
            images = images[np.asarray(indices, dtype=np.int64).reshape(-1)]
        return torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2).contiguous() / 255.0


def load_split(
    modality: str, split: str, data_dir: str | Path | None = None, *, download: bool | None = None
) -> MedMNISTSplit:
    """Load one split of a modality from the first local file that has it.

    Args:
        modality: a modality name (``"chest_xray"``) or one MedMNIST subset name
            (``"organcmnist"``: then only that subset is tried).
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_dir: data root (see :func:`data_root`).
        download: when no local file has the split, ``<subset>.npz`` of the first subset is
            absent and the ``medmnist`` package is importable, download that file into
            ``<data root>/medmnist/`` (a partial file such as ``pathmnist_test718.npz`` does
            not block the download of the full ``pathmnist.npz``). ``None`` (default): download
            unless the environment sets ``MEDSHIELD_OFFLINE=1`` (the test suite and CI do).

    Raises:
        UnknownNameError: unknown modality.
        DataError: bad split name; no file; no file with that split; corrupt or malformed file;
            failed download.
    """
    mod = get_modality(modality)
    _check_split(split)
    subsets = (modality,) if modality in mod.subsets else mod.subsets
    directory = data_root(data_dir) / "medmnist"

    without_split: list[tuple[Path, list[str]]] = []
    for subset, path in _candidate_files(directory, subsets):
        keys = _npz_keys(path)
        if f"{split}_images" in keys and f"{split}_labels" in keys:
            return _make_split(mod, subset, split, path)
        without_split.append((path, keys))

    full_file = directory / f"{subsets[0]}.npz"
    if download is None:
        download = os.environ.get("MEDSHIELD_OFFLINE", "0") in ("", "0")
    medmnist = _import_medmnist() if download and not full_file.exists() else None
    if medmnist is not None:
        path = _download(medmnist, subsets[0], split, directory)
        return _make_split(mod, subsets[0], split, path)

    if without_split:
        listing = "; ".join(f"{path} has keys {keys}" for path, keys in without_split)
        raise DataError(
            f"no {split!r} split for modality {mod.name!r}: {listing}. Fix: put the full "
            f"{subsets[0]}.npz in {directory}, or point MEDSHIELD_DATA_DIR at a folder whose "
            f"medmnist/ subfolder holds it, or {ONLINE_FIX} so medshield downloads it."
        )
    expected = ", ".join(f"{s}.npz or {s}_*.npz" for s in subsets)
    raise DataError(
        f"no MedMNIST file for modality {mod.name!r} in {_searched(directory)}; expected "
        f"{expected}. Fix: point MEDSHIELD_DATA_DIR at a folder whose medmnist/ subfolder holds "
        f"one of these files, or {ONLINE_FIX} so medshield downloads it."
    )


def missing_data_error(
    split: str, data_dir: str | Path | None = None, select: str = "data.modalities"
) -> DataError:
    """The error for "no modality has a usable local ``split``" (``modalities: available``).

    It names the folder searched, the files expected, every file found there but unusable
    (with the reason) and both fixes: point ``MEDSHIELD_DATA_DIR`` at the files, or install
    the ``online`` extra and name the modalities to download in the config key ``select``.
    """
    directory = data_root(data_dir) / "medmnist"
    expected = ", ".join(f"{s}.npz" for m in MODALITIES.values() for s in m.subsets)
    unusable = []
    for name, mod in MODALITIES.items():
        if _candidate_files(directory, mod.subsets):
            try:
                load_split(name, split, data_dir, download=False)
            except DataError as exc:
                unusable.append(str(exc).rstrip("."))
    found = f" Found but unusable: {' | '.join(unusable)}." if unusable else ""
    return DataError(
        f"no MedMNIST file with a {split!r} split in {_searched(directory)}; expected one or "
        f"more of {expected} (or partial files <subset>_*.npz holding {split}_images and "
        f"{split}_labels).{found} Fix: point MEDSHIELD_DATA_DIR at a folder whose medmnist/ "
        f"subfolder holds these files, or {ONLINE_FIX} and list the modalities to download in "
        f"{select} (e.g. --set '{select}=[chest_xray]'; by default only files already on disk "
        "are used)."
    )


def _searched(directory: Path) -> str:
    """``directory`` as absolute path, saying when it does not exist."""
    absolute = directory.absolute()
    return str(absolute) if directory.is_dir() else f"{absolute} (which does not exist)"


def available_modalities(data_dir: str | Path | None = None, split: str = "test") -> list[str]:
    """Names of the modalities with a loadable local file holding ``split`` (never downloads).

    Returned in :data:`MODALITIES` order.
    """
    _check_split(split)
    names = []
    for name in MODALITIES:
        try:
            load_split(name, split, data_dir, download=False)
        except DataError:
            continue
        names.append(name)
    return names


def class_balanced_indices(
    labels: Sequence[int] | np.ndarray, per_class_cap: int | None, seed: int
) -> np.ndarray:
    """Sorted indices that keep at most ``per_class_cap`` items of each class.

    Classes with more items are subsampled without replacement with
    ``numpy.random.default_rng(seed)``; the same inputs always give the same indices.
    ``per_class_cap=None`` keeps every index.
    """
    labels = np.asarray(labels).reshape(-1)
    if per_class_cap is None:
        return np.arange(len(labels), dtype=np.int64)
    if per_class_cap < 1:
        raise ValueError(f"per_class_cap must be a positive integer or None, got {per_class_cap}")
    rng = np.random.default_rng(seed)
    chosen = [np.empty(0, dtype=np.int64)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) > per_class_cap:
            idx = rng.choice(idx, size=per_class_cap, replace=False)
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _candidate_files(directory: Path, subsets: Sequence[str]) -> list[tuple[str, Path]]:
    """(subset, file) pairs present in ``directory``: ``<subset>.npz`` then ``<subset>_*.npz``."""
    found = []
    for subset in subsets:
        exact = directory / f"{subset}.npz"
        if exact.is_file():
            found.append((subset, exact))
        found.extend((subset, p) for p in sorted(directory.glob(f"{subset}_*.npz")) if p.is_file())
    return found


def _read_error(path: Path, exc: BaseException) -> DataError:
    # numpy's own advice for such a file is to allow pickle: never repeat it
    detail = "numpy sees no array in it" if "pickle" in str(exc) else f"{type(exc).__name__}: {exc}"
    return DataError(
        f"cannot read {path} ({detail}); the file is corrupt, truncated or not an .npz archive. "
        "Delete it and download it again."
    )


def _npz_keys(path: Path) -> list[str]:
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive with train_/val_/test_ keys. "
            "Delete it and download it again."
        )
    with archive:
        return sorted(archive.files)


def _make_split(mod: Modality, subset: str, split: str, path: Path) -> MedMNISTSplit:
    stat = path.stat()
    images, labels = _read_split(str(path), split, (stat.st_mtime_ns, stat.st_size))
    if not len(labels):
        raise DataError(
            f"{path}: the {split!r} split of {subset} is empty ({split}_images has shape "
            f"{images.shape}, zero images). Replace the file with a complete {subset}.npz."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= mod.num_classes):
        raise DataError(
            f"{path}: {split}_labels has values in [{labels.min()}, {labels.max()}] but modality "
            f"{mod.name!r} has {mod.num_classes} classes (0..{mod.num_classes - 1})"
        )
    return MedMNISTSplit(images, labels, mod, subset, split, path)


@functools.lru_cache(maxsize=32)
def _read_split(path_str: str, split: str, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one split; cached per file, split and file stamp (mtime, size)."""
    path = Path(path_str)
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
    except _READ_ERRORS as exc:
        raise _read_error(path, exc) from exc

    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: {split}_images has dtype {images.dtype}; MedMNIST images must be uint8 "
            "(0-255)"
        )
    shape = images.shape
    if images.ndim == 3:
        images = images[..., None]
    shape_ok = (
        images.ndim == 4
        and images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE)
        and images.shape[3] in (1, 3)
    )
    if not shape_ok:
        raise DataError(
            f"{path}: {split}_images has shape {shape}; expected (N, 28, 28) or "
            "(N, 28, 28, C) with C = 1 or 3"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels has dtype {labels.dtype}; expected integers")
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}; expected (N, 1) or (N,) "
            "(multi-label subsets are not supported)"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} {split} images but {len(labels)} {split} labels")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _import_medmnist() -> ModuleType | None:
    try:
        import medmnist
    except ImportError:
        return None
    return medmnist


def _download(medmnist: ModuleType, subset: str, split: str, directory: Path) -> Path:
    """Download ``<subset>.npz`` (28x28) into ``directory`` with the medmnist package."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data_class = getattr(medmnist, medmnist.INFO[subset]["python_class"])
        data_class(split=split, download=True, root=str(directory))
    except Exception as exc:  # network, permissions, medmnist API changes: all end the same way
        raise DataError(
            f"could not download {subset} with the medmnist package into {directory} "
            f"({type(exc).__name__}: {exc}). On a machine without internet, copy {subset}.npz "
            "there or set MEDSHIELD_DATA_DIR to a directory whose medmnist/ folder holds it."
        ) from exc
    path = directory / f"{subset}.npz"
    if not path.is_file():
        raise DataError(f"the medmnist package reported success but {path} does not exist")
    return path
