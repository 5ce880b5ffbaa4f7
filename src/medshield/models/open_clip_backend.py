"""``open_clip``: any OpenCLIP model as a medshield :class:`DualEncoder`.

Three kinds of source, as in ``open_clip.create_model``:

- a built-in architecture name (``"ViT-B-32"``, ``"RN50"``, ... see ``open_clip.list_models()``),
  optionally with a pretrained tag (``"laion2b_s34b_b79k"``) or a checkpoint file path;
- ``"hf-hub:org/repo"``: config and weights from the Hugging Face Hub, e.g.
  ``"hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"`` (timm ViT image tower,
  PubMedBERT text tower);
- ``"local-dir:/path"``: a folder holding ``open_clip_config.json`` and the weights, e.g. a hub
  repo downloaded on a machine with internet. A relative ``text_cfg.hf_model_name`` in that
  config is resolved against the folder, so a Hugging Face text tower can ship with it.

open_clip reads checkpoints as safetensors, or with ``torch.load(weights_only=True)`` for
``.bin`` / ``.pth`` files, so no pickled code runs.

Image size, mean and std come from the model's own preprocess config (the tag's or repo's), so
the wrapper normalises exactly like open_clip does. The wrapper resizes the whole image to a
square with bilinear antialiasing (see :meth:`DualEncoder.preprocess`) instead of open_clip's
bicubic resize + center crop; the two agree on square inputs up to the interpolation kernel.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medshield.errors import ConfigError, DataError, UnknownNameError
from medshield.models.base import DualEncoder
from medshield.models.io import META_FILE
from medshield.registry import MODELS

OPEN_CLIP_CONFIG = "open_clip_config.json"  # the file open_clip's local-dir: schema reads
HF_TEXT_CONFIG_DIR = "hf_text_config"  # where save_extra puts a Hugging Face text tower config

_VIT_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
_VIT_END = ("attn_pool", "attn_pool_contrastive", "ln_post")
_RESNET_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
_TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb")
_TEXT_END = ("ln_final",)
_HEADS = ("proj", "head", "text_projection", "logit_bias")


@MODELS.register(
    "open_clip",
    "any open_clip model: built-in name + pretrained tag, hf-hub: id (e.g. BiomedCLIP), "
    "or local-dir: folder",
)
class OpenClipDualEncoder(DualEncoder):
    """An OpenCLIP model (see the module docstring for the accepted sources).

    Args:
        model_name: built-in architecture name, ``"hf-hub:org/repo"`` or ``"local-dir:/path"``.
        pretrained: where the weights come from.
            ``None`` (default): the weights an ``hf-hub:`` / ``local-dir:`` source brings (an
            error if it has none); a bare architecture name starts from random weights.
            A string: a pretrained tag or checkpoint file for a bare architecture name.
            ``True``: like ``None`` but a bare name without a tag is an error.
            ``False``: random weights whatever the source (used by ``load_model``).
        image_size: override the input resolution (open_clip's ``force_image_size``).

    The open_clip model is ``self.model``; its ``logit_scale`` is the same parameter as
    ``self.logit_scale`` (initialised from open_clip's value, counted once).

    Example::

        model = OpenClipDualEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
        # offline, from a downloaded hub repo:
        model = OpenClipDualEncoder("local-dir:/models/BiomedCLIP")
        emb = model.encode_image(torch.rand(4, 1, 28, 28))  # (4, 512), unit norm
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | bool | None = None,
        image_size: int | None = None,
    ) -> None:
        import open_clip

        schema, identifier = open_clip.factory.parse_model_name(model_name)
        if schema is None:
            model_name = identifier.replace("/", "-")  # as open_clip does: "ViT-B/32" -> "ViT-B-32"
        if (
            schema == "local-dir"
            and pretrained is not False
            and (Path(identifier) / META_FILE).is_file()
        ):
            raise DataError(
                f"{identifier} is a saved medshield model; load it with "
                "medshield.models.load_model, not as an open_clip local-dir: source"
            )
        tag = _check_pretrained(open_clip, model_name, schema, pretrained)
        config = _model_config(open_clip, model_name, schema, identifier)
        # weights must load unless random init is asked for (False) or implied (a bare name)
        require = tag is not None or (schema is not None and pretrained is not False)
        overrides = _local_text_tower(config, identifier) if schema == "local-dir" else {}
        try:
            with _quiet_random_init(enabled=pretrained is False):
                model = open_clip.create_model(
                    model_name,
                    pretrained=tag,
                    load_weights=pretrained is not False,
                    require_pretrained=require,
                    pretrained_text=False,  # text weights come with the CLIP weights or not at all
                    force_image_size=image_size,
                    **overrides,
                )
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError) as e:
            hint = ""
            if tag is not None and not Path(tag).is_file():
                hint = (
                    "; without network access the tag's weights cannot be downloaded: fetch the "
                    "checkpoint on a machine with internet and pass its path as pretrained=PATH"
                )
            raise DataError(f"could not build open_clip model {model_name!r}: {e}{hint}") from e

        logit_scale = model.logit_scale.detach().flatten()[0].item()
        super().__init__(init_logit_scale=logit_scale)
        model.logit_scale = self.logit_scale  # one shared parameter, used by both APIs
        self.model = model
        self.tokenizer = tokenizer
        self.init_kwargs = {
            "model_name": model_name,
            "pretrained": pretrained,
            "image_size": image_size,
        }
        if image_size is not None:
            config["vision_cfg"]["image_size"] = image_size
        config.get("text_cfg", {}).update(overrides.get("text_cfg", {}))
        self._config = config
        self._preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        self.image_size = _square_size(self._preprocess_cfg["size"], model_name)
        self.image_mean = tuple(float(m) for m in self._preprocess_cfg["mean"])
        self.image_std = tuple(float(s) for s in self._preprocess_cfg["std"])
        self.embed_dim = int(config["embed_dim"])

    @classmethod
    def for_loading(cls, directory: Path, init_kwargs: dict[str, Any]) -> OpenClipDualEncoder:
        """Rebuild the architecture, with random weights, from what :meth:`save_extra` wrote."""
        if not (directory / OPEN_CLIP_CONFIG).is_file():
            raise DataError(f"{directory / OPEN_CLIP_CONFIG} is missing; cannot rebuild the model")
        model = cls(f"local-dir:{directory}", pretrained=False)
        model.init_kwargs = dict(init_kwargs)
        return model

    def save_extra(self, directory: Path) -> None:
        """Write ``open_clip_config.json`` (+ tokenizer and HF text config) into ``directory``.

        The result is an open_clip ``local-dir:`` folder, so loading needs no hub access.
        """
        config = copy.deepcopy(self._config)
        if config.get("text_cfg", {}).get("hf_model_name"):  # a Hugging Face text tower
            self.model.text.config.save_pretrained(directory / HF_TEXT_CONFIG_DIR)
            config["text_cfg"]["hf_model_name"] = HF_TEXT_CONFIG_DIR
        payload = {"model_cfg": config, "preprocess_cfg": self._preprocess_cfg}
        (directory / OPEN_CLIP_CONFIG).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        save_tokenizer = getattr(self.tokenizer, "save_pretrained", None)
        if save_tokenizer is not None:  # Hugging Face tokenizers; open_clip's BPE one is built in
            save_tokenizer(str(directory))

    # --- DualEncoder ---------------------------------------------------------------------------
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.logit_scale.device)
        return self.model.encode_text(tokens)

    def image_blocks(self) -> list[nn.Module]:
        """ViT: [patch embedding stem, *residual blocks, final norm]; ResNet: [stem, 4 stages,
        attention pool]; timm trunk (BiomedCLIP): [stem, *blocks or stages, final norm];
        other towers: the whole tower as one stage."""
        visual = self.model.visual
        if hasattr(visual, "transformer"):
            return [
                _stage(visual, _VIT_STEM),
                *visual.transformer.resblocks,
                _stage(visual, _VIT_END),
            ]
        if hasattr(visual, "layer4"):
            stages = [getattr(visual, f"layer{i}") for i in range(1, 5)]
            return [_stage(visual, _RESNET_STEM), *stages, visual.attnpool]
        trunk = getattr(visual, "trunk", None)
        body = next((n for n in ("blocks", "stages") if hasattr(trunk, n)), None)
        if body is not None:  # timm registers children in forward order
            children = [name for name, _ in trunk.named_children()]
            before, after = children[: children.index(body)], children[children.index(body) + 1 :]
            own = [name for name, _ in trunk.named_parameters(recurse=False)]  # cls/pos tokens
            return [
                _stage(trunk, (*own, *before)),
                *getattr(trunk, body),
                _stage(trunk, tuple(after)),
            ]
        return [visual]

    def text_blocks(self) -> list[nn.Module]:
        """Transformer: [token + position embedding, *residual blocks, final norm]; Hugging Face
        BERT-like towers: [embeddings, *layers]; others: the whole tower as one stage."""
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP has .text, CLIP inlines it
        if hasattr(text, "token_embedding"):
            return [
                _stage(text, _TEXT_STEM),
                *text.transformer.resblocks,
                _stage(text, _TEXT_END),
            ]
        hf = text.transformer
        if hasattr(hf, "embeddings") and hasattr(getattr(hf, "encoder", None), "layer"):
            return [hf.embeddings, *hf.encoder.layer]
        return [hf]

    def head_parameters(self) -> list[nn.Parameter]:
        """logit_scale (and SigLIP's logit_bias), the image and text projections."""
        owners = [self.model, self.model.visual, getattr(self.model, "text", self.model)]
        params: dict[int, nn.Parameter] = {id(self.logit_scale): self.logit_scale}
        for owner in owners:
            for name in _HEADS:
                part = getattr(owner, name, None)
                found = [part] if isinstance(part, nn.Parameter) else []
                if isinstance(part, nn.Module):
                    found = list(part.parameters())
                params.update((id(p), p) for p in found)
        return list(params.values())


def _check_pretrained(
    open_clip: Any, model_name: str, schema: str | None, pretrained: str | bool | None
) -> str | None:
    """Validate ``pretrained`` against the source; return the tag / file open_clip should load."""
    if schema is not None:
        if isinstance(pretrained, str):
            raise ConfigError(
                f"pretrained={pretrained!r} applies to built-in architecture names only; "
                f"{model_name!r} brings its own weights (pass pretrained=None, or False for "
                "random weights)"
            )
        return None
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is True:
        raise ConfigError(
            f"pretrained=True needs a weight source for the bare architecture {model_name!r}: "
            f"name a tag ({', '.join(tags) or 'none known'}) or a checkpoint file"
        )
    if isinstance(pretrained, str):
        if pretrained not in tags and not Path(pretrained).is_file():
            raise UnknownNameError(
                f"unknown pretrained tag {pretrained!r} for open_clip {model_name!r} (and no such "
                f"file); known tags: {', '.join(tags) or 'none'}"
            )
        return pretrained
    return None


def _model_config(
    open_clip: Any, model_name: str, schema: str | None, identifier: str
) -> dict[str, Any]:
    """The architecture config, fetched up front so that errors are clear."""
    if schema is None:
        config = open_clip.get_model_config(model_name)
        if config is None:
            known = open_clip.list_models()
            close = difflib.get_close_matches(model_name, known, n=5)
            raise UnknownNameError(
                f"unknown open_clip architecture {model_name!r}; close matches: "
                f"{', '.join(close) or 'none'} (open_clip.list_models() has all {len(known)}); "
                "use 'hf-hub:org/repo' or 'local-dir:/path' for other models"
            )
        return config
    if schema == "local-dir":
        path = Path(identifier) / OPEN_CLIP_CONFIG
        if not path.is_file():
            raise DataError(f"local-dir: source needs {path}, which does not exist")
        try:
            return open_clip.get_model_config(model_name)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON: {e}") from e
    try:
        return open_clip.get_model_config(model_name)
    except Exception as e:  # huggingface_hub raises many types: offline, 404, gated, network
        raise DataError(
            f"cannot fetch {model_name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Without network access (or with HF_HUB_OFFLINE=1) the hub is unreachable: on a "
            f"machine with internet run `huggingface-cli download {identifier} --local-dir DIR`, "
            "copy DIR here and pass model_name='local-dir:DIR'"
        ) from e


def _local_text_tower(config: dict[str, Any], directory: str) -> dict[str, Any]:
    """Resolve a relative Hugging Face text tower path against a local-dir: folder.

    Returns ``create_model`` overrides (empty when the text tower is not a Hugging Face model).
    The tower never loads its own base weights: they come with the CLIP weights.
    """
    text_cfg = dict(config.get("text_cfg", {}))
    name = text_cfg.get("hf_model_name")
    if not name:
        return {}
    local = Path(directory) / name
    if not Path(name).is_absolute() and local.is_dir():
        text_cfg["hf_model_name"] = str(local.resolve())
    text_cfg["hf_model_pretrained"] = False
    return {"text_cfg": text_cfg}


def _square_size(size: int | list[int] | tuple[int, int], model_name: str) -> int:
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ConfigError(
            f"open_clip model {model_name!r} takes non-square {height}x{width} input; "
            "medshield dual encoders need square input"
        )
    return int(height)


class _DropRandomInitWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "initialized randomly" not in message and "no CLIP weights found" not in message


@contextmanager
def _quiet_random_init(enabled: bool) -> Iterator[None]:
    """Silence open_clip's 'initialized randomly' root-logger warnings when random weights are
    what was asked for (``pretrained=False``, e.g. inside ``load_model``)."""
    if not enabled:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarnings()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _stage(owner: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Group ``owner``'s named sub-modules and parameters into one stage (shared, not copied)."""
    stage = nn.Module()
    for name in names:
        part = getattr(owner, name, None)
        if isinstance(part, nn.Parameter):
            stage.register_parameter(name, part)
        elif isinstance(part, nn.Module):
            stage.add_module(name, part)
    return stage
