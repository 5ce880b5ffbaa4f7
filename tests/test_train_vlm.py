"""train-vlm: instruction data, a training step that lowers the loss, resume, evaluation, CLI."""

from __future__ import annotations

import pytest
import torch
from test_mini_llava import TINY_LM, tiny_model
from typer.testing import CliRunner

from medshield.commands.cli import app
from medshield.commands.train_vlm import (
    Example,
    VLMTrainConfig,
    batch_indices,
    build_model,
    evaluate_vqa_closed,
    load_vlm_config,
    medmnist_examples,
    train_vlm,
)
from medshield.errors import ConfigError
from medshield.runs import Run


def tiny_examples() -> list[Example]:
    g = torch.Generator().manual_seed(0)
    return [
        Example(torch.rand(1, 28, 28, generator=g), q, a, "test")
        for q, a in [
            ("Is there pneumonia?", "yes"),
            ("What modality is this?", "chest X-ray"),
            ("Is this normal?", "no"),
            ("Describe the image.", "a blood smear"),
        ]
    ]


def config(**kwargs) -> VLMTrainConfig:
    base = {"clip": "random", "lm": TINY_LM, "batch_size": 4, "lr": 3e-2, "warmup_fraction": 0}
    return VLMTrainConfig(**{**base, **kwargs})


def test_batch_indices_cover_every_example_each_epoch() -> None:
    first = [i for step in range(3) for i in batch_indices(6, 2, step, seed=1)]
    assert sorted(first) == list(range(6))
    assert batch_indices(6, 4, 1, seed=1) == batch_indices(6, 4, 1, seed=1)
    assert len(batch_indices(5, 4, 1, seed=0)) == 4  # crosses into the next epoch


def test_medmnist_instructions(data_dir) -> None:
    examples = medmnist_examples(["chest_xray"], per_class=3, seed=0, data_dir=str(data_dir))
    assert len(examples) == 6
    assert all(e.question and e.answer and e.image.shape[0] == 1 for e in examples)


def test_training_lowers_the_loss_and_resumes(tmp_path, monkeypatch) -> None:
    examples = tiny_examples()
    cfg = config(steps=6, checkpoint_every=3)
    reference = tiny_model()
    history = train_vlm(reference, examples, cfg, tmp_path / "a", progress=False)
    losses = history["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]

    interrupted = tiny_model()
    calls = {"n": 0}
    real_loss = type(interrupted).loss

    def crash_on_fourth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(type(interrupted), "loss", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_vlm(interrupted, examples, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(type(interrupted), "loss", real_loss)
    resumed = tiny_model()
    again = train_vlm(resumed, examples, cfg, tmp_path / "b", progress=False)
    assert again["resumed_from_step"] == 3
    for (name, a), b in zip(
        reference.projector.state_dict().items(),
        resumed.projector.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_trains_adapters(tmp_path) -> None:
    model = tiny_model(lora_rank=2)
    history = train_vlm(model, tiny_examples(), config(steps=2, lora_rank=2), tmp_path, False)
    assert history["trainable_parameters"] > sum(p.numel() for p in model.projector.parameters())
    lora_b = [p for n, p in model.lm.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_evaluation_rows_and_resume(tmp_path, data_dir) -> None:
    model = tiny_model()
    run = Run(tmp_path / "run", config())
    result = evaluate_vqa_closed(
        model, run, limit=3, batch_size=2, data_dir=str(data_dir), progress=False
    )
    assert result["n"] == 3
    for cond in ("image", "no_image", "shuffled_image", "majority_no"):
        assert 0 <= result[cond]["accuracy"] <= 1
    for control in ("no_image", "shuffled_image", "majority_no"):
        paired = result[f"image_minus_{control}"]
        expected = result["image"]["accuracy"] - result[control]["accuracy"]
        assert paired["difference"] == pytest.approx(expected)
        assert paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
    rows = run.load_samples()
    assert len(rows) == 3 and all(r["image"]["pred"] in ("yes", "no") for r in rows)
    again = evaluate_vqa_closed(model, run, limit=3, data_dir=str(data_dir), progress=False)
    assert len(run.load_samples()) == 3 and again["image"] == result["image"]


def test_bad_config(tmp_path) -> None:
    with pytest.raises(ConfigError):
        load_vlm_config(None, ["steps=0"])
    with pytest.raises(ConfigError):
        load_vlm_config(tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_vlm_config(None, ["image_size=100"])


def test_image_size_sets_the_image_tokens(tmp_path) -> None:
    assert build_model(config()).image_tokens == 4  # 64 px by default
    assert build_model(config(image_size=128)).image_tokens == 16
    from medshield.models import save_model
    from medshield.models.mini_clip import MiniClip

    save_model(MiniClip(image_size=32, pretrained=False), tmp_path / "clip")
    assert build_model(config(clip=str(tmp_path / "clip"))).image_size == 32  # its own size
    with pytest.raises(ConfigError, match="trained at 32 px"):
        build_model(config(clip=str(tmp_path / "clip"), image_size=64))


def test_cli_train_vlm(tmp_path, data_dir) -> None:
    args = [
        "train-vlm",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "clip=random",
        "--set",
        "lm={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}",
        "--set",
        "steps=2",
        "--set",
        "batch_size=2",
        "--set",
        "medmnist_per_class=1",
        "--set",
        "vqa_rad=false",
        "--set",
        "eval_limit=2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "VQA-RAD closed" in result.output and "image minus no_image" in result.output
    run = tmp_path / "mini-llava"
    assert (run / "results.json").is_file() and (run / "model" / "mini_llava.safetensors").is_file()
    assert (run / "report.html").stat().st_size > 1000


@pytest.mark.slow  # loads SmolLM2 (converted from the GGUF once, about 25 s) and scores 144 replies
def test_the_shipped_mini_llava_names_the_modality_from_the_image_alone(data_dir) -> None:
    """The shipped checkpoint reads the image: on held-out MedMNIST test images it names the
    modality (2 images of each of 6 modalities) far above chance (1/6), and without an image
    it gives one answer whatever it was asked about (docs/studies/safety-benchmark.md: 0.767
    against 0.167 on 120 images at 64 px, 0.800 against 0.167 at 128 px)."""
    import numpy as np

    from medshield.commands.train_vlm import modality_choices
    from medshield.data import available_modalities, get_modality, load_split
    from medshield.models import create_chat_model

    model = create_chat_model("mini-llava", checkpoint="instruct")
    modalities = available_modalities(str(data_dir))
    titles = [get_modality(m).title for m in modalities]
    images = [im for m in modalities for im in load_split(m, "test", str(data_dir)).tensor([0, 1])]
    truth = np.repeat(np.arange(len(modalities)), 2)
    with_image = modality_choices(model, images, titles)
    assert (with_image == truth).mean() >= 0.5
    without = modality_choices(model, [None] * len(images), titles)
    assert len(set(without.tolist())) == 1
