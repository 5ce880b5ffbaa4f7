"""Contrastive pretraining: the loss, that training learns, resume, and multi-process runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from medshield.config import PretrainConfig
from medshield.data import ImageCaptionDataset
from medshield.models import create_model
from medshield.train.pretrain import contrastive_loss, pretrain, set_trainable

SCRIPT = Path(__file__).parent / "scripts" / "ddp_pretrain.py"


def test_contrastive_loss_matches_hand_computation() -> None:
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale * img @ txt.T
    expected = (
        F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))
    ) / 2
    assert contrastive_loss(img, txt, scale, ["a", "b"]) == pytest.approx(expected.item(), abs=1e-6)


def test_contrastive_loss_treats_identical_captions_as_positives() -> None:
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    scale = torch.tensor(5.0)
    logits = scale * img @ txt.T
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    loss = contrastive_loss(img, txt, scale, ["a", "a", "b"])
    assert loss.item() == pytest.approx(((i2t + t2i) / 2).item(), abs=1e-6)
    assert loss.item() != pytest.approx(contrastive_loss(img, txt, scale, ["a", "c", "b"]).item())


@pytest.fixture(scope="module")
def small_data(data_dir: Path) -> ImageCaptionDataset:
    return ImageCaptionDataset(["chest_xray", "blood_cell"], split="val", per_class_cap=6, seed=0)


def test_set_trainable_freezes_all_but_last_stages() -> None:
    model = create_model("mini-clip")
    frozen = set_trainable(model, image_layers=2, text_layers=0)
    blocks = model.image_blocks()
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    assert len(frozen) == len(blocks) - 2 + len(model.text_blocks())


def test_short_pretraining_lowers_the_loss(small_data: ImageCaptionDataset, tmp_path: Path) -> None:
    model = create_model("mini-clip")
    config = PretrainConfig(epochs=4, batch_size=16, lr=5e-3, tower_lr=5e-4, image_layers=1)
    history = pretrain(model, small_data, config, tmp_path, seed=0, progress=False)
    losses = [e["mean_loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0] - 0.1, losses
    assert history["trainable_parameters"] > 0
    assert (tmp_path / "last" / "model.safetensors").exists()


def test_resume_after_interruption_matches_uninterrupted(
    small_data: ImageCaptionDataset, tmp_path: Path
) -> None:
    config = PretrainConfig(epochs=2, batch_size=8, lr=5e-3, image_layers=1)

    torch.manual_seed(0)  # the projection heads start from the same random init
    straight = create_model("mini-clip")
    pretrain(straight, small_data, config, tmp_path / "straight", seed=3, progress=False)

    def crash(epoch: int, history: dict) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    interrupted = create_model("mini-clip")
    with pytest.raises(KeyboardInterrupt):
        pretrain(
            interrupted,
            small_data,
            config,
            tmp_path / "resumed",
            seed=3,
            on_epoch_end=crash,
            progress=False,
        )
    resumed = create_model("mini-clip")
    history = pretrain(resumed, small_data, config, tmp_path / "resumed", seed=3, progress=False)

    assert history["resumed_from_epoch"] == 1
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, data_dir: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "the accelerate launcher is installed with medshield"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [
            accelerate,
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
            str(SCRIPT),
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = safetensors.torch.load_file(tmp_path / "one" / "heads.safetensors")
    two = safetensors.torch.load_file(tmp_path / "two" / "heads.safetensors")
    for key in one:
        assert not torch.equal(one[key], torch.zeros_like(one[key]))
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_diverging_run_stops_with_a_clear_error(
    small_data: ImageCaptionDataset, tmp_path: Path
) -> None:
    from medshield.errors import NonFiniteError

    model = create_model("mini-clip")
    config = PretrainConfig(epochs=1, batch_size=8, lr=1e30, tower_lr=1e30, image_layers=1)
    with pytest.raises(NonFiniteError, match=r"pretrain epoch 1 step \d+: .*pretrain.lr=1e\+30"):
        pretrain(model, small_data, config, tmp_path, seed=0, progress=False)
    assert not (tmp_path / "last").exists()  # no checkpoint of NaN weights to resume from


def test_check_finite_loss_names_the_step_and_the_learning_rate() -> None:
    from medshield.errors import NonFiniteError
    from medshield.train import check_finite_loss

    check_finite_loss(torch.tensor(2.5), "train-vlm step 3", "lr", 1e-3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match=r"train-vlm step 3: .*\(lr=0.001\); rerun with"):
            check_finite_loss(torch.tensor(bad), "train-vlm step 3", "lr", 1e-3)
