"""create_model / save_model / load_model: round trips and refusals."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models_backends import (
    make_tiny_biomedclip_like_dir,
    make_tiny_hf_clip_dir,
    make_tiny_open_clip_dir,
)
from torch import nn

import medshield
from medshield.errors import DataError, UnknownNameError, UnsafeFileError
from medshield.models.base import DualEncoder
from medshield.models.hf_clip import HFClipDualEncoder
from medshield.models.io import create_model, load_model, read_record, save_model
from medshield.models.mini_llava import MiniLlava
from medshield.models.open_clip_backend import OpenClipDualEncoder
from medshield.registry import MODELS
from medshield.train.finetune.io import read_finetuned_meta

TEST_BACKEND = "test-io-tiny"


@MODELS.register(TEST_BACKEND, "test-only linear dual encoder")
class LinearEncoder(DualEncoder):
    """8 px linear image tower, bag-of-characters text tower; ``pretrained`` is accepted and
    ignored, like a backend whose weights are all trained by medshield."""

    backend = TEST_BACKEND
    image_size = 8
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)

    def __init__(self, embed_dim: int = 4, pretrained: bool = True) -> None:
        super().__init__()
        self.init_kwargs = {"embed_dim": embed_dim}
        self.image_proj = nn.Linear(3 * 8 * 8, embed_dim)
        self.text_embed = nn.EmbeddingBag(128, embed_dim)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(pixels.flatten(1))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([[ord(c) % 128 for c in t]]) for t in texts]
        return torch.cat([self.text_embed(i) for i in ids])


IMAGES = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
TEXTS = ["a chest x-ray", "pneumonia", "a normal scan"]


def assert_same_embeddings(a: DualEncoder, b: DualEncoder) -> None:
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(IMAGES), b.encode_image(IMAGES))
        torch.testing.assert_close(a.encode_text(TEXTS), b.encode_text(TEXTS))
        torch.testing.assert_close(a.logit_scale, b.logit_scale)


def test_create_model_builds_by_name_and_lists_names_when_unknown() -> None:
    model = create_model(TEST_BACKEND, embed_dim=6)
    assert isinstance(model, LinearEncoder) and model.init_kwargs == {"embed_dim": 6}
    with pytest.raises(UnknownNameError, match=f"unknown model 'nope'.*{TEST_BACKEND}"):
        create_model("nope")


def test_round_trip_writes_metadata_and_gives_identical_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(TEST_BACKEND, embed_dim=5)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # not the default: must come from the file
    assert save_model(model, tmp_path / "saved") == tmp_path / "saved"
    meta = json.loads((tmp_path / "saved" / "medshield_model.json").read_text())
    assert meta == {
        "format": 1,
        "backend": TEST_BACKEND,
        "init_kwargs": {"embed_dim": 5},
        "medshield_version": medshield.__version__,
        "embed_dim": 5,
    }
    torch.manual_seed(1)  # the rebuilt architecture starts from different random weights
    loaded = load_model(tmp_path / "saved")
    assert isinstance(loaded, LinearEncoder) and not loaded.training
    assert_same_embeddings(model, loaded)


def test_open_clip_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = OpenClipDualEncoder(
        f"local-dir:{make_tiny_open_clip_dir(tmp_path / 'src')}", pretrained=False
    )
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    save_model(model, tmp_path / "saved")
    loaded = load_model(tmp_path / "saved")
    assert isinstance(loaded, OpenClipDualEncoder)
    assert loaded.init_kwargs == model.init_kwargs
    assert loaded.model.logit_scale is loaded.logit_scale
    assert (loaded.image_mean, loaded.image_std) == (model.image_mean, model.image_std)
    assert_same_embeddings(model, loaded)


def test_open_clip_biomedclip_like_round_trip_needs_no_source_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = make_tiny_biomedclip_like_dir(tmp_path / "src")
    model = OpenClipDualEncoder(f"local-dir:{source}", pretrained=False)
    save_model(model, tmp_path / "saved")
    shutil.rmtree(source)  # the BERT config and tokenizer must travel with the saved model
    loaded = load_model(tmp_path / "saved")
    assert_same_embeddings(model, loaded)


def test_hf_clip_round_trip_needs_no_source_files(tmp_path: Path) -> None:
    source = make_tiny_hf_clip_dir(tmp_path / "src")
    model = HFClipDualEncoder(str(source))
    save_model(model, tmp_path / "saved")
    shutil.rmtree(source)
    loaded = load_model(tmp_path / "saved")
    assert isinstance(loaded, HFClipDualEncoder)
    assert loaded.init_kwargs == {"path": str(source)}
    assert (loaded.image_mean, loaded.image_std) == (model.image_mean, model.image_std)
    assert_same_embeddings(model, loaded)


def test_saved_dir_is_not_mistaken_for_a_backend_source(tmp_path: Path) -> None:
    model = HFClipDualEncoder(str(make_tiny_hf_clip_dir(tmp_path / "src")))
    save_model(model, tmp_path / "saved")
    with pytest.raises(DataError, match="load_model"):
        HFClipDualEncoder(str(tmp_path / "saved"))


def test_refuses_pickle_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 a pickle that must never be opened")
    with pytest.raises(UnsafeFileError, match=r"refusing to unpickle model\.pt.*safetensors"):
        load_model(tmp_path)


def test_missing_dir_and_dir_without_metadata(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(DataError, match="medshield_model.json is missing"):
        load_model(tmp_path)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_model(create_model(TEST_BACKEND, embed_dim=4), tmp_path / "saved")


def edit_meta(directory: Path, **changes: object) -> None:
    path = directory / "medshield_model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_corrupt_or_incomplete_metadata(saved: Path) -> None:
    meta = saved / "medshield_model.json"
    meta.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_model(saved)
    meta.write_text(json.dumps({"format": 1, "backend": TEST_BACKEND}))
    with pytest.raises(DataError, match="'init_kwargs'"):
        load_model(saved)
    meta.write_text(json.dumps({"format": 2, "backend": TEST_BACKEND, "init_kwargs": {}}))
    with pytest.raises(DataError, match="format 2"):
        load_model(saved)


@pytest.mark.parametrize(
    ("read", "file", "what"),
    [
        (lambda d: read_record(d, "x.json", "saved thing"), "x.json", "saved thing"),
        (load_model, "medshield_model.json", "saved medshield model"),
        (lambda d: MiniLlava(checkpoint=d), "medshield_chat_model.json", "saved mini-llava"),
        (read_finetuned_meta, "finetune.json", "fine-tuned medshield model"),
    ],
)
def test_every_saved_record_is_read_with_the_same_errors(
    tmp_path: Path, read: Callable[[Path], object], file: str, what: str
) -> None:
    with pytest.raises(DataError, match=f"is not a {what}: {file} is missing"):
        read(tmp_path)
    for content, message in [
        (b"{not json", "is not valid JSON"),
        (b'{"a": "\xff"}', "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object, got list"),
    ]:
        (tmp_path / file).write_bytes(content)
        with pytest.raises(DataError, match=message):
            read(tmp_path)


def test_read_record_returns_the_object(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": 1, "a": [2]}', encoding="utf-8")
    assert read_record(tmp_path, "x.json", "saved thing") == {"format": 1, "a": [2]}


def test_unknown_backend(saved: Path) -> None:
    edit_meta(saved, backend="no-such-backend")
    with pytest.raises(UnknownNameError, match="no-such-backend"):
        load_model(saved)


def test_edited_init_kwargs_are_caught_by_the_record_in_the_weights(saved: Path) -> None:
    edit_meta(saved, init_kwargs={"embed_dim": 7})
    with pytest.raises(
        DataError,
        match=r"says embed_dim=7 but the weights in .*model\.safetensors were saved "
        r"with embed_dim=4",
    ):
        load_model(saved)


def test_unknown_init_kwargs_keys_are_named(saved: Path) -> None:
    edit_meta(saved, init_kwargs={"embed_dim": 4, "depth": 3, "act": "gelu"})
    with pytest.raises(
        DataError,
        match=r"medshield_model\.json: init_kwargs has unknown key\(s\) act, depth; "
        r"the 'test-io-tiny' backend accepts embed_dim\.",
    ):
        load_model(saved)


def _strip_record(directory: Path) -> None:
    """Rewrite the weights as an older medshield saved them: no init_kwargs in the header."""
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    save_file(tensors, str(weights))


def test_weights_without_a_record_load_with_a_warning_naming_the_values_used(saved: Path) -> None:
    _strip_record(saved)
    with pytest.warns(UserWarning, match=r"older medshield.*using \{'embed_dim': 4\}"):
        assert load_model(saved).init_kwargs == {"embed_dim": 4}
    edit_meta(saved, init_kwargs={"embed_dim": "four"})
    with (
        pytest.warns(UserWarning, match="older medshield"),
        pytest.raises(DataError, match=r"cannot build the 'test-io-tiny' model from .*four"),
    ):
        load_model(saved)


def test_weights_that_do_not_fit(saved: Path) -> None:
    save_file({"unrelated": torch.zeros(2)}, str(saved / "model.safetensors"))
    with (
        pytest.warns(UserWarning, match="older medshield"),
        pytest.raises(DataError, match=r"(?s)model\.safetensors do not fit.*unrelated"),
    ):
        load_model(saved)
    (saved / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(DataError, match="no weights"):
        load_model(saved)


def test_pickle_only_hf_clip_dir_is_refused_before_transformers_sees_it(tmp_path: Path) -> None:
    source = make_tiny_hf_clip_dir(tmp_path / "src")
    tensors = load_file(str(source / "model.safetensors"))
    torch.save(tensors, source / "pytorch_model.bin")  # the layout of an older pickle-only port
    (source / "model.safetensors").unlink()
    with pytest.raises(UnsafeFileError, match=r"refusing to unpickle pytorch_model\.bin"):
        HFClipDualEncoder(str(source))
    (source / "pytorch_model.bin").unlink()
    with pytest.raises(DataError, match="holds no model.safetensors"):
        HFClipDualEncoder(str(source))
