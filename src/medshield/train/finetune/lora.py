"""``lora``: low-rank adaptation through ``peft`` on both towers.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) freezes the
weights and learns ``W + (alpha / r) * B A`` with rank-``r`` factors. Here it is injected with
:func:`peft.inject_adapter_in_model` into

- the image tower's convolutions / linears whose name matches ``image_targets`` (default: the
  1x1 expand / project convolutions of every MBConv block and the 1x1 head convolution of the
  mini-clip EfficientNet; peft's Conv2d LoRA copies the base kernel's padding, which for the
  "static same" padded k x k convolutions would not line up, so the default keeps to 1x1), and
- the text tower's attention linears matching ``text_targets`` (default: query, key, value and
  the attention output of every BERT layer; they are called as submodules, so LoRA really sees
  them, which the tests check through their gradients).

Targets are regular expressions matched in full against module names under ``image_tower`` /
``text_tower``; a pattern that matches no Conv2d / Linear module is a
:class:`~medshield.errors.ConfigError` before training. The head is the live class-prompt head
(the text tower's LoRA changes the class embeddings). After training the LoRA products are
merged into the weights (``merge: true``, peft's ``merge()``), so the deployed classifier costs
what the base model costs; ``merge: false`` keeps them separate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medshield.config import StrictModel
from medshield.errors import ConfigError
from medshield.models.base import DualEncoder
from medshield.registry import METHODS
from medshield.train.finetune.classifier import FineTunedClassifier
from medshield.train.finetune.method import FineTuneMethod, freeze

DEFAULT_IMAGE_TARGETS = r"image_tower\.(_blocks\.\d+\._(expand|project)_conv|_conv_head)"
DEFAULT_TEXT_TARGETS = (
    r"text_tower\.encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)"
)


class LoraOptions(StrictModel):
    """LoRA options: ``rank`` r, ``alpha`` (scaling alpha / r), ``dropout``, target patterns
    (None switches a tower off), ``merge`` (fold ``B A`` into the weights after training with
    peft's ``merge()``, so inference costs what the base model costs)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    image_targets: str | None = DEFAULT_IMAGE_TARGETS
    text_targets: str | None = DEFAULT_TEXT_TARGETS
    merge: bool = True


def lora_targets(model: nn.Module, options: LoraOptions) -> list[str]:
    """Full names of the Conv2d / Linear modules the patterns select.

    Raises:
        ConfigError: a pattern is not a valid regex, matches no Conv2d / Linear module, or
            both towers are switched off.
    """
    patterns = [p for p in (options.image_targets, options.text_targets) if p is not None]
    if not patterns:
        raise ConfigError("lora needs image_targets or text_targets (both are null)")
    names: list[str] = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"lora target {pattern!r} is not a valid regex: {exc}") from None
        found = [
            name
            for name, module in model.named_modules()
            if regex.fullmatch(name) and isinstance(module, (nn.Conv2d, nn.Linear))
        ]
        if not found:
            layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise ConfigError(
                f"lora target {pattern!r} matches no Conv2d or Linear module of "
                f"{type(model).__name__}; module names look like "
                f"{layers[:3]}"
            )
        names.extend(found)
    return names


def _plain_layer(model: nn.Module, name: str) -> None:
    """Swap a Conv2d subclass for an equivalent plain ``nn.Conv2d`` sharing its weights.

    peft builds LoRA factors with ``type(base_layer)``; EfficientNet's
    ``Conv2dStaticSamePadding`` cannot be built that way (it needs an image size). For a 1x1,
    stride-1 kernel its "same" padding is zero, so a plain convolution computes the same thing.
    Other subclasses are refused with a clear message.
    """
    module = model.get_submodule(name)
    if type(module) in (nn.Conv2d, nn.Linear) or isinstance(module, nn.Linear):
        return
    padding = getattr(module, "static_padding", None)
    if (
        module.kernel_size != (1, 1)
        or module.stride != (1, 1)
        or module.padding not in ((0, 0), "valid")
        or not (padding is None or type(padding).__name__ == "Identity")
    ):
        raise ConfigError(
            f"lora target {name!r} is a {type(module).__name__} with kernel "
            f"{module.kernel_size} and stride {module.stride}; peft can only wrap it as a plain "
            "Conv2d, which is exact for 1x1 stride-1 kernels only. Choose 1x1 convolutions"
        )
    plain = nn.Conv2d(
        module.in_channels,
        module.out_channels,
        1,
        bias=module.bias is not None,
        groups=module.groups,
    )
    plain.weight = module.weight
    if module.bias is not None:
        plain.bias = module.bias
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)


def inject_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0
) -> None:
    """Freeze ``model`` and give the named Conv2d / Linear modules trainable peft LoRA factors
    (``B`` starts at zero, so the model computes what it computed before)."""
    freeze(model)
    for name in targets:
        _plain_layer(model, name)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def merge_lora_layers(module: nn.Module, merge: bool = True) -> None:
    """Merge every peft LoRA layer's ``B A`` into its base weight (``merge``; a layer peft
    already marks merged is left as it is) and put the base layer back in its place, so
    ``module`` has the base architecture again (in place)."""
    for name, layer in lora_layers(module):
        if merge and not layer.merged:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.base_layer)


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The peft LoRA layers in ``module``, with their names. peft (and transformers inside it)
    is imported here, not with this module: a process that only validates a config, such as the
    study scheduling its cells, starts without it."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@METHODS.register("lora", "LoRA (peft) on image-tower convs/linears and text-tower attention")
class Lora(FineTuneMethod):
    paper = "Hu et al. ICLR 2022 (LoRA), via Hugging Face peft"
    Options = LoraOptions

    def check(self, model: DualEncoder) -> None:
        super().check(model)
        for name in lora_targets(model, self.options):
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
                if module.kernel_size != (1, 1) or module.stride != (1, 1):
                    raise ConfigError(
                        f"lora target {name!r} is a {type(module).__name__} with kernel "
                        f"{module.kernel_size}; peft can wrap this padded convolution only "
                        "when it is 1x1 with stride 1. Choose 1x1 convolutions"
                    )

    def build(
        self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]
    ) -> FineTunedClassifier:
        options: LoraOptions = self.options
        targets = lora_targets(model, options)
        inject_lora(model, targets, options.rank, options.alpha, options.dropout)
        return FineTunedClassifier(model, class_prompts, head="live")

    def loss(
        self, classifier: FineTunedClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return F.cross_entropy(classifier(images), labels), {}

    def finalize(self, classifier: nn.Module) -> nn.Module:
        classifier = super().finalize(classifier)
        if self.options.merge:
            for _, layer in lora_layers(classifier):
                layer.merge()
            classifier.structure_meta = {"merged": True}
        return classifier

    def restore_structure(self, classifier: nn.Module, meta: dict[str, Any]) -> nn.Module:
        if meta.get("merged"):
            # the saved base-layer weights already hold B A: mark the layers merged, add nothing
            for _, layer in lora_layers(classifier):
                layer.merged_adapters = ["default"]
            classifier.structure_meta = {"merged": True}
        return classifier
