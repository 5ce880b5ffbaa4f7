"""The open_clip and hf-clip backends, on tiny randomly initialised models built offline.

The ``make_tiny_*`` builders are also used by test_models_io.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertTokenizerFast,
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
)

from medshield.errors import ConfigError, DataError, UnknownNameError
from medshield.models.base import DualEncoder
from medshield.models.hf_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, HFClipDualEncoder
from medshield.models.open_clip_backend import OpenClipDualEncoder

OC_MEAN, OC_STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
HF_MEAN, HF_STD = [0.3, 0.2, 0.1], [0.6, 0.5, 0.4]
WORDS = "a an the photo of chest x ray x-ray normal pneumonia scan with".split()
TINY_VIT = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}


def make_tiny_open_clip_dir(root: Path) -> Path:
    """An open_clip ``local-dir:`` folder: tiny ViT + transformer text tower, no weights."""
    root.mkdir(parents=True)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": TINY_VIT,
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OC_MEAN, "std": OC_STD}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    return root


def make_tiny_biomedclip_like_dir(root: Path) -> Path:
    """A BiomedCLIP-like ``local-dir:`` folder: timm's 0.3M-parameter ``test_vit`` image tower
    (BiomedCLIP uses timm's ``vit_base_patch16_224``) + a tiny Hugging Face BERT text tower.

    The BERT config sits in a sub-folder named by a relative ``hf_model_name``; the tokenizer
    files sit in the folder itself, where open_clip's local-dir: schema looks for them.
    """
    (root / "bert").mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "-", *WORDS]
    (root / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    ).save_pretrained(root / "bert")
    model_cfg = {
        "embed_dim": 16,
        "custom_text": True,
        "vision_cfg": {
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,  # test_vit's native size
        },
        "text_cfg": {
            "hf_model_name": "bert",
            "hf_tokenizer_name": "bert",
            "hf_proj_type": "linear",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 16,
        },
    }
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return root


def tiny_clip_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS/EOS, built without downloads; AutoTokenizer reloads it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


def tiny_clip_config() -> CLIPConfig:
    text = {
        "vocab_size": len(WORDS) + 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "bos_token_id": 2,
        "eos_token_id": 3,  # != 2: pool at the first EOS, as current CLIP ports do
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def make_tiny_hf_clip_dir(root: Path, preprocessor: bool = True) -> Path:
    """A Hugging Face CLIP folder (config, safetensors weights, tokenizer, preprocessor)."""
    torch.manual_seed(0)
    CLIPModel(tiny_clip_config()).save_pretrained(root)
    tiny_clip_tokenizer().save_pretrained(root)
    if preprocessor:
        config = {"image_processor_type": "CLIPImageProcessor", "image_mean": HF_MEAN}
        config |= {"image_std": HF_STD, "crop_size": {"height": 32, "width": 32}}
        (root / "preprocessor_config.json").write_text(json.dumps(config))
    return root


BUILDERS: dict[str, Callable[[Path], DualEncoder]] = {
    "open_clip": lambda tmp: OpenClipDualEncoder(
        f"local-dir:{make_tiny_open_clip_dir(tmp / 'oc')}", pretrained=False
    ),
    "open_clip-biomedclip-like": lambda tmp: OpenClipDualEncoder(
        f"local-dir:{make_tiny_biomedclip_like_dir(tmp / 'oc-bio')}", pretrained=False
    ),
    "hf-clip": lambda tmp: HFClipDualEncoder(str(make_tiny_hf_clip_dir(tmp / "hf"))),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DualEncoder:
    torch.manual_seed(0)
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param)).eval()


# --- every backend --------------------------------------------------------------------------------
def test_encodes_to_unit_vectors_of_embed_dim(tiny: DualEncoder) -> None:
    with torch.no_grad():
        images = tiny.encode_image(torch.rand(3, 3, 40, 40))
        texts = tiny.encode_text(["a chest x-ray", "pneumonia", "a normal scan of the chest"])
    assert images.shape == texts.shape == (3, 16)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(texts[0], texts[1])


def test_gray_input_equals_replicated_rgb(tiny: DualEncoder) -> None:
    gray = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny.encode_image(gray), tiny.encode_image(gray.expand(-1, 3, -1, -1))
        )


def test_gradients_reach_pixels(tiny: DualEncoder) -> None:
    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    text = tiny.encode_text(["pneumonia"]).detach()
    (tiny.encode_image(images) @ text.T).sum().backward()
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_blocks_and_heads_cover_every_parameter_once(tiny: DualEncoder) -> None:
    image_blocks, text_blocks, heads = (
        tiny.image_blocks(),
        tiny.text_blocks(),
        tiny.head_parameters(),
    )
    assert len(image_blocks) >= 4 and len(text_blocks) >= 3  # >= 2 layers + stem (+ final norm)
    assert any(p is tiny.logit_scale for p in heads)
    covered = {id(p) for b in [*image_blocks, *text_blocks] for p in b.parameters()}
    covered |= {id(p) for p in heads}
    assert covered == {id(p) for p in tiny.parameters()}


def test_logit_scale_is_shared_not_duplicated(tiny: DualEncoder) -> None:
    inner = tiny.model  # type: ignore[attr-defined]
    assert inner.logit_scale is tiny.logit_scale
    assert sum(p.numel() for p in tiny.parameters()) == sum(p.numel() for p in inner.parameters())


# --- open_clip ------------------------------------------------------------------------------------
def test_open_clip_normalises_like_open_clip(tmp_path: Path) -> None:
    model = OpenClipDualEncoder(
        f"local-dir:{make_tiny_open_clip_dir(tmp_path / 'oc')}", pretrained=False
    )
    cfg = open_clip.get_model_preprocess_cfg(model.model)
    assert model.image_size == 32
    assert list(model.image_mean) == list(cfg["mean"]) == OC_MEAN
    assert list(model.image_std) == list(cfg["std"]) == OC_STD
    assert model.embed_dim == 16
    images = torch.rand(2, 3, 32, 32)
    manual = (images - torch.tensor(OC_MEAN).view(1, 3, 1, 1)) / torch.tensor(OC_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = F.normalize(model.model.encode_image(manual), dim=-1)
        torch.testing.assert_close(model.encode_image(images), expected)
        tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(["a chest x-ray"])
        expected = F.normalize(model.model.encode_text(tokens), dim=-1)
        torch.testing.assert_close(model.encode_text(["a chest x-ray"]), expected)


def test_open_clip_image_size_override(tmp_path: Path) -> None:
    source = f"local-dir:{make_tiny_open_clip_dir(tmp_path / 'oc')}"
    model = OpenClipDualEncoder(source, pretrained=False, image_size=48)
    assert model.image_size == 48
    assert model.encode_image(torch.rand(1, 1, 28, 28)).shape == (1, 16)


def test_open_clip_builtin_architecture_builds_offline() -> None:
    model = OpenClipDualEncoder("RN50", pretrained=False)  # ResNet image tower, no download
    assert model.image_size == 224 and model.embed_dim == 1024
    assert len(model.image_blocks()) == 6  # stem, 4 stages, attention pool
    assert model.init_kwargs == {"model_name": "RN50", "pretrained": False, "image_size": None}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_name": "ViT-B-33"}, UnknownNameError, "close matches: ViT-B-32"),
        ({"pretrained": "no-such-tag"}, UnknownNameError, "known tags: .*laion2b_s34b_b79k"),
        ({"pretrained": True}, ConfigError, "needs a weight source"),
        ({"model_name": "hf-hub:org/repo", "pretrained": "openai"}, ConfigError, "own weights"),
        ({"model_name": "local-dir:/no/such/dir"}, DataError, "open_clip_config.json"),
    ],
    ids=["unknown-architecture", "unknown-tag", "true-without-tag", "tag-with-hub", "missing-dir"],
)
def test_open_clip_rejects_bad_sources(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        OpenClipDualEncoder(**kwargs)


def test_open_clip_hub_id_offline_says_how_to_use_a_local_copy() -> None:
    with pytest.raises(DataError, match=r"Hub.*local-dir:DIR") as info:
        OpenClipDualEncoder("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert "huggingface-cli download microsoft/BiomedCLIP" in str(info.value)


def test_open_clip_source_without_weights_is_an_error_not_random(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="could not build"):
        OpenClipDualEncoder(f"local-dir:{make_tiny_open_clip_dir(tmp_path / 'oc')}")


# --- hf-clip --------------------------------------------------------------------------------------
def test_hf_clip_matches_transformers_with_preprocessor_constants(tmp_path: Path) -> None:
    path = make_tiny_hf_clip_dir(tmp_path)
    model = HFClipDualEncoder(str(path)).eval()
    assert (model.image_size, model.embed_dim) == (32, 16)
    assert list(model.image_mean) == HF_MEAN and list(model.image_std) == HF_STD
    reference = CLIPModel.from_pretrained(path).eval()
    tokenizer = tiny_clip_tokenizer()
    images = torch.rand(2, 3, 32, 32)
    manual = (images - torch.tensor(HF_MEAN).view(1, 3, 1, 1)) / torch.tensor(HF_STD).view(
        1, 3, 1, 1
    )
    texts = ["a chest x-ray", "pneumonia"]
    with torch.no_grad():
        image_out = reference.get_image_features(pixel_values=manual)
        text_out = reference.get_text_features(
            **tokenizer(texts, padding=True, return_tensors="pt")
        )
        image_ref = getattr(image_out, "pooler_output", image_out)  # transformers 5 / 4
        text_ref = getattr(text_out, "pooler_output", text_out)
        torch.testing.assert_close(model.encode_image(images), F.normalize(image_ref, dim=-1))
        torch.testing.assert_close(model.encode_text(texts), F.normalize(text_ref, dim=-1))


def test_hf_clip_defaults_to_openai_constants(tmp_path: Path) -> None:
    model = HFClipDualEncoder(str(make_tiny_hf_clip_dir(tmp_path, preprocessor=False)))
    assert model.image_mean == OPENAI_CLIP_MEAN and model.image_std == OPENAI_CLIP_STD


def test_hf_clip_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        HFClipDualEncoder(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="cannot read a CLIP config"):
        HFClipDualEncoder(str(tmp_path))


def test_hf_clip_refuses_missing_or_misfit_weights(tmp_path: Path) -> None:
    path = make_tiny_hf_clip_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["projection_dim"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="projection"):
        HFClipDualEncoder(str(path))
    (path / "model.safetensors").unlink()
    with pytest.raises(DataError, match="cannot load CLIP weights"):
        HFClipDualEncoder(str(path))
    assert HFClipDualEncoder(str(path), pretrained=False).embed_dim == 8


def test_hf_clip_rejects_other_model_types(tmp_path: Path) -> None:
    path = make_tiny_hf_clip_dir(tmp_path)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    with pytest.raises(DataError, match="'bert' model, not 'clip'"):
        HFClipDualEncoder(str(path))
