"""Bad-input corpus, checkpoint family: each case runs the real CLI on a broken model directory
made in tmp_path and expects exit code 2, no traceback and a message that names the problem.

Models are tiny random hf-clip folders (and their saved medshield copies); one case saves a real
mini-clip to show that an edited ``image_size``, which changes no tensor shape, is caught.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from bad_input_support import run_cli, squash
from safetensors.torch import load_file
from test_models_backends import make_tiny_hf_clip_dir
from transformers import BertConfig

from medshield.models import save_model
from medshield.models.hf_clip import HFClipDualEncoder


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Hugging Face CLIP folder, its saved medshield copy and a saved mini-clip."""
    from medshield.models.mini_clip import MiniClip

    root = tmp_path_factory.mktemp("sources")
    hf = make_tiny_hf_clip_dir(root / "hf")
    saved = save_model(HFClipDualEncoder(str(hf)), root / "saved")
    mini = save_model(MiniClip(pretrained=False), root / "mini")
    return {"hf": hf, "saved": saved, "mini": mini}


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def pickle_only(directory: Path) -> None:
    """Replace a folder's safetensors weights with the same tensors as a pickle."""
    torch.save(load_file(str(directory / "model.safetensors")), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def garbage_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")


def truncated_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def wrong_architecture(directory: Path) -> None:
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        directory
    )


@dataclass
class Case:
    """``source`` (a key of the ``sources`` fixture, or None for an empty folder) is copied to
    tmp_path/model and broken by ``make``; ``args`` ({model} is that folder) run the CLI; the
    output must contain every ``expect`` string."""

    source: str | None
    make: Callable[[Path], None]
    args: list[str]
    expect: list[str]


EVALUATE = ["evaluate", "--checkpoint", "{model}"]
HF_CLIP = ["evaluate", "--set", "model.backend=hf-clip", "--set", "model.kwargs.path={model}"]
HF_CHAT = ["redteam", "--set", "model.backend=hf", "--set", "model.kwargs.path={model}"]
HF_CHAT += ["--set", "limit=1"]
META = "{model}/medshield_model.json"
WEIGHTS = "{model}/model.safetensors"
REFUSED = "refusing to unpickle pytorch_model.bin in {model}"


def nothing(directory: Path) -> None:
    pass


CASES: dict[str, Case] = {
    "missing checkpoint directory": Case(
        None, lambda d: d.rmdir(), EVALUATE, ["model directory {model} does not exist"]
    ),
    "checkpoint is a file": Case(
        None,
        lambda d: (d.rmdir(), d.write_text("x")),
        EVALUATE,
        ["model directory {model} is a file, not a directory"],
    ),
    "empty checkpoint directory": Case(
        None, nothing, EVALUATE, ["{model} is not a saved medshield model"]
    ),
    "pickle-only medshield directory": Case(
        None,
        lambda d: (d / "model.pt").write_bytes(b"\x80\x04never opened"),
        EVALUATE,
        ["refusing to unpickle model.pt", "safetensors only"],
    ),
    "metadata not JSON": Case(
        "saved",
        lambda d: (d / "medshield_model.json").write_text("{not json"),
        EVALUATE,
        [f"{META} is not valid JSON"],
    ),
    "unknown backend in metadata": Case(
        "saved",
        lambda d: edit_json(d / "medshield_model.json", backend="nope"),
        EVALUATE,
        [f"{META} names backend 'nope', which is not registered", "hf-clip, mini-clip"],
    ),
    "weights missing": Case(
        "saved",
        lambda d: (d / "model.safetensors").unlink(),
        EVALUATE,
        [f"{WEIGHTS} is missing", "no weights"],
    ),
    "corrupt safetensors": Case(
        "saved", garbage_weights, EVALUATE, [f"{WEIGHTS} is not a readable safetensors file"]
    ),
    "truncated safetensors": Case(
        "saved", truncated_weights, EVALUATE, [f"{WEIGHTS} is not a readable safetensors file"]
    ),
    "unknown init_kwargs keys": Case(
        "saved",
        lambda d: edit_json(d / "medshield_model.json", init_kwargs={"path": "x", "depth": 2}),
        EVALUATE,
        [f"{META}: init_kwargs has unknown key(s) depth", "accepts path"],
    ),
    "mini-clip metadata says 128 px, weights were trained at 64 px": Case(
        "mini",
        lambda d: edit_json(
            d / "medshield_model.json",
            init_kwargs={"embed_dim": 256, "image_size": 128, "max_text_tokens": 64},
        ),
        EVALUATE,
        [f"{META} says image_size=128 but the weights in {WEIGHTS} were saved with image_size=64"],
    ),
    "config.json of another shape than the weights": Case(
        "saved",
        lambda d: edit_json(d / "config.json", projection_dim=8),
        EVALUATE,
        [f"weights in {WEIGHTS} do not fit the 'hf-clip' model", "size mismatch"],
    ),
    "fine-tuning record not JSON": Case(
        None,
        lambda d: (d / "finetune.json").write_text("{bad"),
        EVALUATE,
        ["{model}/finetune.json is not valid JSON"],
    ),
    "fine-tuning record of another format": Case(
        None,
        lambda d: (d / "finetune.json").write_text('{"method": "ran"}'),
        EVALUATE,
        ["{model}/finetune.json is not a format-1 fine-tuning record"],
    ),
    "unknown backend name": Case(
        None, nothing, ["evaluate", "--set", "model.backend=nope"], ["unknown model 'nope'"]
    ),
    "hf-clip path missing": Case(
        None, lambda d: d.rmdir(), HF_CLIP, ["hf-clip path {model} is not a directory"]
    ),
    "hf-clip pickle-only directory": Case(
        "hf", pickle_only, HF_CLIP, [REFUSED, "safe_serialization=True"]
    ),
    "hf-clip directory without weights": Case(
        "hf",
        lambda d: (d / "model.safetensors").unlink(),
        HF_CLIP,
        ["cannot load CLIP weights from {model}: it holds no model.safetensors"],
    ),
    "hf-clip directory without config.json": Case(
        "hf",
        lambda d: (d / "config.json").unlink(),
        HF_CLIP,
        ["cannot read a CLIP config and tokenizer from {model}"],
    ),
    "hf-clip corrupt safetensors": Case(
        "hf", garbage_weights, HF_CLIP, ["cannot load CLIP weights from {model}", "corrupt"]
    ),
    "hf-clip wrong architecture": Case(
        "hf", wrong_architecture, HF_CLIP, ["{model} holds a 'bert' model, not 'clip'"]
    ),
    "hf chat pickle-only directory": Case("hf", pickle_only, HF_CHAT, [REFUSED]),
    "hf chat directory without weights": Case(
        "hf",
        lambda d: (d / "model.safetensors").unlink(),
        HF_CHAT,
        ["cannot load hf chat model weights from {model}: it holds no model.safetensors"],
    ),
    "hf chat wrong architecture": Case(
        "hf",
        nothing,
        HF_CHAT,
        ["cannot load an image-text-to-text model and processor from {model}", "chat VLM folder"],
    ),
}


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", CASES)
def test_bad_checkpoint_is_a_clear_error(
    name: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    case = CASES[name]
    model = tmp_path / "model"
    if case.source is None:
        model.mkdir()
    else:
        shutil.copytree(sources[case.source], model)
    case.make(model)
    args = [a.format(model=model) for a in case.args]
    args += ["--set", f"output_dir={tmp_path / 'runs'}"]
    if args[0] == "evaluate":  # no data: a model that loaded would fail later, not pass
        args += ["--set", f"data.data_dir={tmp_path}"]
    code, output = run_cli(args)
    assert "Traceback" not in output, output
    assert code == 2, output
    assert "error:" in output and "weights_only=False" not in output, output
    for expected in case.expect:
        assert squash(expected.format(model=model)) in squash(output), output
