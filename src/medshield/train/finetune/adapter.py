"""``adapter``: bottleneck residual adapters in both towers.

Adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019; one
adapter per block after its output as in Pfeiffer et al., EACL 2021) add
``x + up(GELU(down(x)))`` after a frozen block; ``up`` starts at zero, so training starts from
the pretrained model exactly. In the image tower the adapter works on (N, C, H, W) feature maps
with 1x1 convolutions (as in Rebuffi et al., "Learning multiple visual domains with residual
adapters", NeurIPS 2017); in the text tower on (N, L, D) hidden states with linears.

Why a small module of ours: AdapterHub's ``adapters`` library only adapts transformers models
(it cannot reach the EfficientNet image tower), and ``peft`` has no bottleneck adapter for
arbitrary modules (its adapter-like tuners, IA3 and LoRA, are other methods). The adapters are
attached as child modules named ``adapter`` of each adapted block and applied by a forward hook,
so state-dict names are stable and saving / loading needs no custom code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medshield.config import StrictModel
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder, eval_mode
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier, clear_text_cache
from medshield.train.finetune.method import FineTuneMethod, freeze


class AdapterOptions(StrictModel):
    """``reduction``: bottleneck = max(``min_bottleneck``, width // reduction);
    ``image_layers`` / ``text_layers``: adapt the last n blocks (-1 all, 0 none)."""

    reduction: int = Field(8, ge=1)
    min_bottleneck: int = Field(4, ge=1)
    image_layers: int = Field(-1, ge=-1)
    text_layers: int = Field(-1, ge=-1)


class BottleneckAdapter(nn.Module):
    """``x + up(GELU(down(x)))`` over the channel dim (dim 1, ``conv=True``) or the last dim."""

    def __init__(self, width: int, bottleneck: int, conv: bool) -> None:
        super().__init__()
        if conv:
            self.down: nn.Module = nn.Conv2d(width, bottleneck, 1)
            self.up: nn.Module = nn.Conv2d(bottleneck, width, 1)
        else:
            self.down = nn.Linear(width, bottleneck)
            self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def _apply_adapter(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def _callable_blocks(blocks: list[nn.Module]) -> list[nn.Module]:
    return [b for b in blocks if not isinstance(b, (nn.ModuleList, nn.ModuleDict))]


def _last(blocks: list[nn.Module], n: int) -> list[nn.Module]:
    return blocks if n == -1 else blocks[len(blocks) - min(n, len(blocks)) :]


@METHODS.register("adapter", "bottleneck residual adapters after image and text tower blocks")
class Adapter(FineTuneMethod):
    paper = "Houlsby et al. ICML 2019; Pfeiffer et al. EACL 2021; Rebuffi et al. NeurIPS 2017"
    Options = AdapterOptions

    def _targets(self, model: DualEncoder) -> tuple[list[nn.Module], list[nn.Module]]:
        o: AdapterOptions = self.options
        image = _last(_callable_blocks(model.image_blocks()), o.image_layers)
        text = _last(_callable_blocks(model.text_blocks())[1:], o.text_layers)  # not embeddings
        if o.image_layers == 0:
            image = []
        if o.text_layers == 0:
            text = []
        return image, text

    def check(self, model: DualEncoder) -> None:
        super().check(model)
        image, text = self._targets(model)
        if not image and not text:
            raise ConfigError(
                f"adapter: {type(model).__name__} exposes no image or text blocks to adapt "
                "(image_blocks()/text_blocks() are empty, or both layer counts are 0)"
            )

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        o: AdapterOptions = self.options
        image, text = self._targets(model)
        freeze(model)
        widths: dict[int, tuple[int, bool]] = {}

        def record(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            conv = out.ndim == 4
            widths[id(module)] = (out.shape[1] if conv else out.shape[-1], conv)

        handles = [b.register_forward_hook(record) for b in (*image, *text)]
        try:
            with torch.no_grad(), eval_mode(model):
                clear_text_cache(model)
                size = (1, 3, model.image_size, model.image_size)
                model.encode_image(torch.zeros(size, device=next(model.parameters()).device))
                model.encode_text(["an image"])
        finally:
            for h in handles:
                h.remove()
            clear_text_cache(model)
        for block in (*image, *text):
            width, conv = widths[id(block)]
            bottleneck = max(o.min_bottleneck, width // o.reduction)
            block.add_module("adapter", BottleneckAdapter(width, bottleneck, conv))
            block.register_forward_hook(_apply_adapter)
        head = "live" if text else "fixed"
        return FineTunedClassifier(model, class_prompts, head=head)

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return F.cross_entropy(classifier(images), labels), {}
