"""``hf-clip``: a transformers ``CLIPModel`` from a local directory as a medshield DualEncoder.

The directory is a Hugging Face CLIP checkpoint: ``config.json``, ``model.safetensors`` (a
directory holding only a pickle ``pytorch_model.bin`` is refused: unpickling can run code),
tokenizer files and optionally ``preprocessor_config.json``.
PubMedCLIP ports (e.g. ``flaviagiammarino/pubmed-clip-vit-base-patch32``) and OpenAI CLIP have
this layout; fetch one on a machine with internet with
``huggingface-cli download REPO --local-dir DIR`` and pass ``DIR``.

The input size is the vision tower's ``image_size``; mean and std come from
``preprocessor_config.json`` (``image_mean`` / ``image_std``), the OpenAI CLIP constants when the
file is absent. The wrapper resizes the whole image to a square (see
:meth:`DualEncoder.preprocess`) rather than CLIPImageProcessor's resize + center crop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from medshield.errors import DataError
from medshield.models.base import DualEncoder
from medshield.models.io import META_FILE, require_hf_safetensors
from medshield.registry import MODELS

PREPROCESSOR_FILE = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@MODELS.register(
    "hf-clip", "transformers CLIPModel from a local Hugging Face directory (e.g. a PubMedCLIP port)"
)
class HFClipDualEncoder(DualEncoder):
    """A transformers ``CLIPModel`` with its tokenizer, loaded from a local directory.

    Args:
        path: directory of a Hugging Face CLIP checkpoint (see the module docstring).
        pretrained: load the weights in ``path`` (``False`` builds the architecture from
            ``config.json`` with random weights, used by ``load_model``).

    The transformers model is ``self.model``; its ``logit_scale`` is the same parameter as
    ``self.logit_scale``.

    Example::

        model = HFClipDualEncoder("/models/pubmed-clip-vit-base-patch32")
        logits = ZeroShotClassifier(model, ["a normal chest X-ray", "pneumonia"])(images)
    """

    def __init__(self, path: str, pretrained: bool = True) -> None:
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise DataError(
                f"hf-clip path {directory} is not a directory; hf-clip loads local Hugging Face "
                "CLIP folders (get one with `huggingface-cli download REPO --local-dir DIR`)"
            )
        if pretrained and (directory / META_FILE).is_file():
            raise DataError(
                f"{directory} is a saved medshield model; load it with medshield.models.load_model"
            )
        try:
            config = AutoConfig.from_pretrained(directory)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read a CLIP config and tokenizer from {directory}: {e}") from e
        if config.model_type != "clip":
            raise DataError(f"{directory} holds a {config.model_type!r} model, not 'clip'")
        preprocessor = _read_preprocessor(directory)
        if pretrained:
            model = _load_weights(CLIPModel, directory, config)
        else:
            model = CLIPModel(config)

        super().__init__(init_logit_scale=model.logit_scale.item())
        model.logit_scale = self.logit_scale  # one shared parameter, used by both APIs
        self.model = model
        self.tokenizer = tokenizer
        self.init_kwargs = {"path": str(path)}
        self._preprocessor = preprocessor
        self.image_size = int(config.vision_config.image_size)
        self.image_mean = tuple(float(m) for m in self._preprocessor["image_mean"])
        self.image_std = tuple(float(s) for s in self._preprocessor["image_std"])
        self.embed_dim = int(config.projection_dim)
        self.max_text_tokens = int(config.text_config.max_position_embeddings)

    @classmethod
    def for_loading(cls, directory: Path, init_kwargs: dict[str, Any]) -> HFClipDualEncoder:
        """Rebuild the architecture, with random weights, from what :meth:`save_extra` wrote."""
        model = cls(str(directory), pretrained=False)
        model.init_kwargs = dict(init_kwargs)
        return model

    def save_extra(self, directory: Path) -> None:
        """Write ``config.json``, the tokenizer files and ``preprocessor_config.json``."""
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        text = json.dumps(self._preprocessor, indent=2)
        (directory / PREPROCESSOR_FILE).write_text(text, encoding="utf-8")

    # --- DualEncoder ---------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(self.logit_scale.device)
        return _features(
            self.model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        )

    def image_blocks(self) -> list[nn.Module]:
        """[patch embedding + pre-norm, *encoder layers, post-norm]."""
        vision = self.model.vision_model
        stem = nn.ModuleList([vision.embeddings, vision.pre_layrnorm])
        return [stem, *vision.encoder.layers, vision.post_layernorm]

    def text_blocks(self) -> list[nn.Module]:
        """[token + position embedding, *encoder layers, final norm]."""
        text = self.model.text_model
        return [text.embeddings, *text.encoder.layers, text.final_layer_norm]

    def head_parameters(self) -> list[nn.Parameter]:
        """logit_scale and the image and text projections."""
        return [
            self.logit_scale,
            *self.model.visual_projection.parameters(),
            *self.model.text_projection.parameters(),
        ]


def _load_weights(model_cls: Any, directory: Path, config: Any) -> nn.Module:
    """``from_pretrained`` of safetensors weights only, that raises, rather than warns and
    initialises randomly, when weights are missing or do not fit the config."""
    require_hf_safetensors(directory, "CLIP")
    try:
        model, info = model_cls.from_pretrained(
            directory,
            config=config,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            use_safetensors=True,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise DataError(
            f"cannot load CLIP weights from {directory}: {e}. The safetensors file may be "
            "corrupt or truncated; download it again"
        ) from e
    bad = sorted(info["missing_keys"]) + sorted(str(k[0]) for k in info["mismatched_keys"])
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"weights in {directory} do not fit its config.json: missing or mis-shaped {shown}"
        )
    return model


def _read_preprocessor(directory: Path) -> dict[str, Any]:
    """``preprocessor_config.json`` as a dict, with OpenAI CLIP mean/std when absent."""
    path = directory / PREPROCESSOR_FILE
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON: {e}") from e
    config.setdefault("image_processor_type", "CLIPImageProcessor")
    config.setdefault("image_mean", list(OPENAI_CLIP_MEAN))
    config.setdefault("image_std", list(OPENAI_CLIP_STD))
    for key in ("image_mean", "image_std"):
        value = config[key]
        if isinstance(value, (int, float)):
            config[key] = value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3):
            raise DataError(f"{path}: {key} must be a list of 3 numbers, got {value!r}")
    return config


def _features(output: Any) -> torch.Tensor:
    """Projected features: transformers 5 returns a model output, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
