"""Bad-input corpus, data family: each case runs the real CLI on broken MedMNIST data made in
tmp_path and expects exit code 2, no traceback and a message that names the problem.

The model is a tiny random hf-clip folder, so every case costs well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from bad_input_support import run_cli, squash
from test_models_backends import make_tiny_hf_clip_dir


def arrays(split: str, n: int = 6, classes: int = 2, shape: tuple[int, ...] = (28, 28)) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"{split}_images": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        f"{split}_labels": (np.arange(n) % classes).astype(np.uint8).reshape(n, 1),
    }


def write_npz(root: Path, name: str, **named: np.ndarray) -> Path:
    path = root / "medmnist" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **named)
    return path


def breast(root: Path, **named: np.ndarray) -> None:
    write_npz(root, "breastmnist.npz", **named)


@dataclass
class Case:
    """``make(data_root)`` writes the broken data; the output must contain every ``expect``
    string ({data} stands for the data root)."""

    command: str
    make: Callable[[Path], None]
    expect: list[str]
    sets: list[str] = field(default_factory=list)
    use_env: bool = False  # pass the data root as MEDSHIELD_DATA_DIR, not data.data_dir


def nothing(root: Path) -> None:
    pass


def empty_folder(root: Path) -> None:
    (root / "medmnist").mkdir(parents=True)


def garbage(root: Path) -> None:
    empty_folder(root)
    (root / "medmnist" / "breastmnist.npz").write_bytes(b"<html>404 not found</html>")


def truncated(root: Path) -> None:
    path = write_npz(root, "breastmnist.npz", **arrays("train"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def npy_as_npz(root: Path) -> None:
    empty_folder(root)
    with (root / "medmnist" / "breastmnist.npz").open("wb") as f:
        np.save(f, np.zeros((3, 28, 28), np.uint8))


def corrupt_vqa(root: Path) -> None:
    (root / "vqa_rad").mkdir(parents=True)
    (root / "vqa_rad" / "testset.json").write_text('[{"qid": 1, "question": ')


BREAST = ["--set", "data.modalities=[breast_ultrasound]"]
MISSING = "no MedMNIST file with a 'train' split in {data}/medmnist (which does not exist)"
FIXES = ["MEDSHIELD_DATA_DIR", "pip install -e", "online extra"]

CASES: dict[str, Case] = {
    "no data folder": Case("pretrain", nothing, [MISSING, "pneumoniamnist.npz", *FIXES]),
    "no data folder via MEDSHIELD_DATA_DIR": Case(
        "pretrain", nothing, [MISSING, "bloodmnist.npz", *FIXES], use_env=True
    ),
    "empty medmnist folder, evaluate": Case(
        "evaluate",
        empty_folder,
        ["no MedMNIST file with a 'test' split in {data}/medmnist;", "organamnist.npz", *FIXES],
    ),
    "empty medmnist folder, craft-noise": Case(
        "craft-noise", empty_folder, ["with a 'train' split in {data}/medmnist;", *FIXES]
    ),
    "no data folder, redteam": Case(
        "redteam",
        nothing,
        ["the safety benchmark is empty", "{data}/vqa_rad", "with a 'test' split in {data}/"],
    ),
    "VQA-RAD missing, redteam on radiology": Case(
        "redteam",
        nothing,
        ["VQA-RAD file {data}/vqa_rad/testset.json not found", "MEDSHIELD_DATA_DIR"],
        ["--set", "modalities=[radiology]"],
    ),
    "VQA-RAD json corrupt, redteam on radiology": Case(
        "redteam",
        corrupt_vqa,
        ["cannot read VQA-RAD file {data}/vqa_rad/testset.json"],
        ["--set", "modalities=[radiology]"],
    ),
    "subset file missing for a named modality": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train")),
        ["no MedMNIST file for modality 'dermatoscopy' in {data}/medmnist", "dermamnist.npz"],
        ["--set", "data.modalities=[dermatoscopy]"],
    ),
    "corrupt npz": Case(
        "pretrain", garbage, ["cannot read {data}/medmnist/breastmnist.npz", "corrupt"], BREAST
    ),
    "corrupt npz, only file among available": Case(
        "pretrain",
        garbage,
        ["Found but unusable: cannot read {data}/medmnist/breastmnist.npz", *FIXES],
    ),
    "truncated npz": Case(
        "pretrain", truncated, ["cannot read {data}/medmnist/breastmnist.npz"], BREAST
    ),
    "single .npy array named .npz": Case(
        "pretrain", npy_as_npz, ["{data}/medmnist/breastmnist.npz holds a single array"], BREAST
    ),
    "empty train split": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train", n=0)),
        ["{data}/medmnist/breastmnist.npz: the 'train' split of breastmnist is empty"],
        BREAST,
    ),
    "empty test split, evaluate": Case(
        "evaluate",
        lambda root: breast(root, **arrays("test", n=0)),
        ["{data}/medmnist/breastmnist.npz: the 'test' split of breastmnist is empty"],
    ),
    "split missing from the file": Case(
        "pretrain",
        lambda root: breast(root, **arrays("test")),
        ["no 'train' split", "breastmnist.npz has keys ['test_images', 'test_labels']"],
        BREAST,
    ),
    "images of the wrong size": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train", n=4, shape=(32, 32))),
        ["breastmnist.npz: train_images has shape (4, 32, 32)"],
        BREAST,
    ),
    "images with two channels": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train", n=4, shape=(28, 28, 2))),
        ["train_images has shape (4, 28, 28, 2)", "C = 1 or 3"],
        BREAST,
    ),
    "float images": Case(
        "pretrain",
        lambda root: breast(
            root, train_images=np.zeros((4, 28, 28), np.float32), train_labels=np.zeros((4, 1))
        ),
        ["breastmnist.npz: train_images has dtype float32"],
        BREAST,
    ),
    "fewer labels than images": Case(
        "pretrain",
        lambda root: breast(
            root, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros(3, np.uint8)
        ),
        ["breastmnist.npz: 4 train images but 3 train labels"],
        BREAST,
    ),
    "labels out of range": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train", classes=5)),
        ["train_labels has values in [0, 4]", "has 2 classes"],
        BREAST,
    ),
    "multi-label labels": Case(
        "pretrain",
        lambda root: breast(
            root,
            train_images=np.zeros((4, 28, 28), np.uint8),
            train_labels=np.zeros((4, 14), np.uint8),
        ),
        ["train_labels has shape (4, 14)", "multi-label"],
        BREAST,
    ),
    "dataset smaller than one batch": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train", n=6)),
        ["6 image-caption pairs, fewer than one batch of pretrain.batch_size=64"],
        [*BREAST, "--set", "pretrain.batch_size=64"],
    ),
    "unknown modality": Case(
        "pretrain",
        lambda root: breast(root, **arrays("train")),
        ["unknown modality 'xray'", "chest_xray"],
        ["--set", "data.modalities=[xray]"],
    ),
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf_clip_dir(tmp_path_factory.mktemp("model") / "hf")


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", CASES)
def test_bad_data_is_a_clear_error(name: str, tiny_clip: Path, tmp_path: Path) -> None:
    case = CASES[name]
    data = tmp_path / "data"
    case.make(data)
    args = [case.command, "--set", f"output_dir={tmp_path / 'runs'}", *case.sets]
    if case.command != "redteam":  # a chat model: the default one, never built (data first)
        args += ["--set", "model.backend=hf-clip", "--set", f"model.kwargs.path={tiny_clip}"]
    env = {"MEDSHIELD_DATA_DIR": str(data)} if case.use_env else None
    if not case.use_env:
        data_key = "data_dir" if case.command == "redteam" else "data.data_dir"
        args += ["--set", f"{data_key}={data}"]
    code, output = run_cli(args, env)
    assert "Traceback" not in output, output
    assert code == 2, output
    assert "error:" in output and "allow_pickle" not in output, output
    for expected in case.expect:
        assert squash(expected.format(data=data)) in squash(output), output
