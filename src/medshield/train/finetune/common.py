"""What every fine-tuning method shares: config, classifier, training loop, overhead, save/load.

A fine-tuning method (one file each, registered in :data:`medshield.registry.METHODS`) turns a
pretrained :class:`~medshield.models.DualEncoder` into a downstream classifier, an ``nn.Module``
mapping [0, 1] NCHW images to (N, num_classes) logits, and reports what it cost.

Every method starts from the base model's zero-shot classifier: :class:`FineTunedClassifier`
computes ``logit_scale * normalize(rectifier(z)) @ C.T + b`` where ``z`` is the unnormalised
image embedding, ``C`` the class-prompt embeddings (prompt ensembling as in
:class:`~medshield.models.ZeroShotClassifier`) and ``b`` a bias. Before training it returns
exactly the zero-shot logits, so all methods are compared from the same starting point. The head
``C`` is one of

- ``"fixed"``: the class-prompt embeddings of the base text tower, a buffer;
- ``"learned"``: a parameter initialised from them (linear probe, RAN);
- ``"live"``: recomputed by the text tower at every training step (methods that train the
  text tower: full fine-tuning, LoRA, adapters), and frozen into a buffer after training by
  :meth:`FineTunedClassifier.refresh_class_embeddings`, which first drops the mini-clip text
  cache so no stale pre-training text feature is ever served.

**Question-conditioned prompts (the VQA-RAD closed task).** When the class prompts hold the
placeholder ``{question}`` (:data:`VQA_CLASS_PROMPTS`: ``"{question} no"`` and
``"{question} yes"``), every item brings its own question and its class embeddings are those of
its own prompts, ``C_i = [emb("<question_i> no"), emb("<question_i> yes")]``; the classifier is
told the questions of each batch with :meth:`FineTunedClassifier.set_questions` before it sees
the images. The three heads keep their meaning: ``"fixed"`` uses the base text tower's
embeddings, ``"live"`` recomputes them with gradients while training, and ``"learned"`` adds a
trained (K, D) offset to them (zero at first). So every method again starts from the base
model's zero-shot answer and trains exactly what it trains on a modality, and attacks see an
ordinary images -> logits module. :data:`VQA_TASK` names this task wherever a modality is
expected; its data are the closed VQA-RAD questions answered "yes" or "no" (:func:`load_train_data`;
the few closed questions with another answer are left out).

:func:`adapted_encoder` gives the fine-tuned dual encoder itself (adapted towers, RAN's rectifier
on the image path) for retrieval and multimodal attacks.

:func:`finetune` runs the shared loop (AdamW for a budget of optimiser steps, ``steps`` or
``epochs`` passes, over successive seeded reshuffles of one task's train items, a constant or
cosine schedule after a linear warm-up, tqdm progress; a history entry every ``log_every``
steps; with ``val_fraction`` a class-stratified part of the items is held out and scored at
every entry, and ``keep_best`` keeps the best entry's weights), counts the images through the
image tower (:class:`ImageTowerCounter`), then measures the inference overhead against the base
model's zero-shot classifier in the same process. ``lr_grid`` selection is
:mod:`medshield.train.finetune.select`.
:func:`save_finetuned` / :func:`load_finetuned` store the base model reference, the method's
state (only the tensors that differ from the base model) as safetensors and the config as JSON.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

import medshield
from medshield import data
from medshield.attacks.base import Attack
from medshield.attacks.pgd import PGD, pgd_step_size
from medshield.config import StrictModel
from medshield.device import autocast, check_precision, synchronize
from medshield.errors import ConfigError, DataError, InputError
from medshield.eval.features import classify_images
from medshield.eval.zero_shot import balanced_subset
from medshield.models.base import DualEncoder, check_images, check_texts, eval_mode
from medshield.models.io import read_record
from medshield.registry import METHODS
from medshield.train import check_finite_loss

FORMAT = 1
STATE_FILE = "method.safetensors"
META_FILE = "finetune.json"

QUESTION_FIELD = "{question}"
VQA_TASK = "vqa_rad_closed"
VQA_ANSWERS = ("no", "yes")
VQA_CLASS_PROMPTS = [[f"{QUESTION_FIELD} {answer}"] for answer in VQA_ANSWERS]
VQA_IMAGE_SIZE = 64  # side VQA-RAD images are loaded at, as in medshield.eval.vqa

Log = Callable[[str], None]
DEFAULT_EPOCHS = 10  # the budget when neither steps nor epochs is set


# --- configuration ------------------------------------------------------------------------------


class AdversaryConfig(StrictModel):
    """On-the-fly PGD adversary used while training (TeCoA, FARE; RAN and the ``adv-*`` methods
    use its ``eps`` with their own ``pgd_steps`` / ``pgd_step``), L-inf, /255 units.

    ``steps`` defaults to 10 and ``alpha`` to :func:`medshield.attacks.pgd.pgd_step_size`,
    ``2.5 * eps / steps`` (Madry et al., 2018) but at least ``eps / 4``: 10 steps of eps / 4,
    the TeCoA and FARE reference training adversary (RobustVLM, Schlarmann et al. 2024). Until
    2026-12 the default was 2 steps of 1.25 x eps, an FGSM-like adversary that invites
    catastrophic overfitting.
    """

    eps: float = Field(2.0, gt=0)
    steps: int = Field(10, ge=1)
    alpha: float | None = Field(None, gt=0)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else pgd_step_size(self.eps, self.steps)


class FineTuneConfig(StrictModel):
    """How to fine-tune: method, optimisation budget and schedule, learning-rate grid,
    per-method kwargs, adversary.

    Attributes:
        method: a name registered in :data:`medshield.registry.METHODS`.
        steps: the budget in optimiser steps; batches come from successive seeded reshuffles
            of the (class-balanced) training items, a new pass starting where one runs out.
        epochs: the budget in passes over the training items instead (the default when
            neither is set: 10, since at 2 epochs of a few hundred items most methods are far
            from converged, see docs/studies/finetune.md). Setting both is an error.
        batch_size: items per step.
        lr: AdamW learning rate (the peak of the schedule).
        lr_grid: learning rates to choose from on the validation split (needs
            ``val_fraction`` above 0): one model is trained per value with the same seed and
            budget, and the best on validation is kept (see
            :func:`medshield.train.finetune.select.finetune_lr_grid`); None trains at ``lr``.
        schedule: ``constant`` or ``cosine`` (decay to 0 at the last step), after the warm-up.
        warmup_fraction: share of the steps over which the learning rate rises linearly from
            ``lr / warm-up steps`` to ``lr`` (0: no warm-up), so it scales with the budget.
        log_every: steps per history entry (None: one pass over the training items).
        weight_decay: AdamW weight decay.
        max_train_items: class-balanced subsample of the train split (None: all).
        val_fraction: share of those items held out (stratified by class) as a validation set,
            scored at every history entry (``val_accuracy``); 0 holds out nothing.
        keep_best: end with the weights of the history entry of highest validation accuracy
            (the earliest on a tie) instead of the last step's; needs ``val_fraction`` above 0.
        kwargs: method-specific options, validated by the method (unknown keys are refused;
            RAN's loss weights are among its options).
        adversary: PGD used to craft training examples on the fly (TeCoA, FARE; RAN and the
            ``adv-*`` methods take its ``eps`` and set their own steps). ``null`` means no
            adversary, which only the clean methods accept.
    """

    method: str = "ran"
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    lr_grid: list[float] | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    log_every: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_train_items: int | None = Field(512, ge=2)
    val_fraction: float = Field(0.0, ge=0, le=0.5)
    keep_best: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    adversary: AdversaryConfig | None = Field(default_factory=AdversaryConfig)

    @model_validator(mode="after")
    def _check_method(self) -> FineTuneConfig:
        if self.method not in METHODS:
            known = ", ".join(METHODS.names())
            raise ValueError(f"unknown fine-tuning method {self.method!r}; registered: {known}")
        method = METHODS.get(self.method)
        method.Options.model_validate(self.kwargs)
        if self.steps is not None and self.epochs is not None:
            raise ValueError(
                f"steps ({self.steps}) and epochs ({self.epochs}) are both set: the budget is "
                "one of them; keep steps (optimiser steps) or epochs (passes), not both"
            )
        if self.steps is None and self.epochs is None:
            self.epochs = DEFAULT_EPOCHS
        if self.keep_best and self.val_fraction == 0:
            raise ValueError(
                "keep_best picks the best history entry by validation accuracy: set "
                "val_fraction above 0"
            )
        if self.lr_grid is not None:
            if not self.lr_grid:
                raise ValueError(
                    "lr_grid is empty: give at least one learning rate, or leave lr_grid out "
                    "(null) to train at lr"
                )
            if any(lr <= 0 for lr in self.lr_grid):
                raise ValueError(f"every learning rate in lr_grid must be > 0, got {self.lr_grid}")
            if self.val_fraction == 0:
                raise ValueError(
                    "lr_grid picks the learning rate on a validation split: set val_fraction "
                    "above 0 (e.g. 0.2)"
                )
        if method.adversarial and self.adversary is None:
            raise ValueError(
                f"{self.method} trains against an adversary, but adversary is null: give "
                "adversary: {eps: ...} (its eps is the training budget, /255), or use a clean "
                "method"
            )
        return self

    @property
    def options(self) -> BaseModel:
        """The method's validated ``kwargs``."""
        return METHODS.get(self.method).Options.model_validate(self.kwargs)


def parse_finetune_config(raw: dict[str, Any] | FineTuneConfig) -> FineTuneConfig:
    """Validate a fine-tuning config; every problem becomes a :class:`ConfigError`."""
    if isinstance(raw, FineTuneConfig):
        return raw
    try:
        return FineTuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid fine-tuning config:\n{exc}") from None


# --- the classifier -----------------------------------------------------------------------------


def clear_text_cache(model: nn.Module) -> None:
    """Drop cached text features (mini-clip caches them while its text tower is frozen)."""
    cache = getattr(model, "_text_cache", None)
    if isinstance(cache, dict):
        cache.clear()


def prompt_embeddings(model: DualEncoder, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """(K, D) unit class embeddings: the mean of each class's prompt embeddings, renormalised.

    Runs with gradients when the text tower has trainable parameters (the "live" head).
    """
    texts = [t for prompts in class_prompts for t in prompts]
    emb = model.encode_text(texts)
    rows, start = [], 0
    for prompts in class_prompts:
        rows.append(F.normalize(emb[start : start + len(prompts)].mean(0), dim=-1))
        start += len(prompts)
    return torch.stack(rows)


def is_question_conditioned(class_prompts: Sequence[Sequence[str]]) -> bool:
    """Whether the prompts hold the ``{question}`` placeholder (all of them, or none may)."""
    flags = {QUESTION_FIELD in p for prompts in class_prompts for p in prompts}
    if len(flags) > 1:
        raise InputError(
            f"either every class prompt holds {QUESTION_FIELD} or none does, got {class_prompts}"
        )
    return flags == {True}


def question_prompt_embeddings(
    model: DualEncoder, class_prompts: Sequence[Sequence[str]], questions: Sequence[str]
) -> torch.Tensor:
    """(N, K, D) unit class embeddings of each question's prompts (:func:`prompt_embeddings`)."""
    filled = [
        [p.replace(QUESTION_FIELD, question) for p in prompts]
        for question in questions
        for prompts in class_prompts
    ]
    return prompt_embeddings(model, filled).view(len(questions), len(class_prompts), -1)


HeadMode = Literal["fixed", "learned", "live"]


class FineTunedClassifier(nn.Module):
    """Images in [0, 1] NCHW -> (N, K) logits, from a dual encoder (see the module docstring).

    Args:
        model: the dual encoder (modified in place by the method: adapters, LoRA, ...).
        class_prompts: per class, the prompt strings whose embeddings are averaged; with the
            ``{question}`` placeholder the classifier is question-conditioned and needs
            :meth:`set_questions` before every batch.
        head: ``"fixed"``, ``"learned"`` or ``"live"``.
        rectifier: optional module applied to the unnormalised image embedding (RAN).
    """

    def __init__(
        self,
        model: DualEncoder,
        class_prompts: Sequence[Sequence[str]],
        head: HeadMode = "fixed",
        rectifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if head not in ("fixed", "learned", "live"):
            raise InputError(f"head must be fixed, learned or live, got {head!r}")
        self.model = model
        self.class_prompts = [list(p) for p in class_prompts]
        self.head = head
        self.rectifier = rectifier
        self.conditioned = is_question_conditioned(self.class_prompts)
        self.questions: list[str] | None = None
        self._question_cache: torch.Tensor | None = None
        if self.conditioned:  # class_weight is an offset added to each question's embeddings
            init = torch.zeros(len(self.class_prompts), int(model.embed_dim))
        else:
            with torch.no_grad(), eval_mode(model):
                clear_text_cache(model)
                init = prompt_embeddings(model, self.class_prompts).detach()
            self.register_buffer("zero_shot_embeddings", init.clone())
        if head == "learned":
            self.class_weight = nn.Parameter(init.clone())
        else:
            self.register_buffer("class_weight", init.clone())
        self.bias = nn.Parameter(torch.zeros(len(self.class_prompts)), requires_grad=False)
        if head == "learned":
            self.bias.requires_grad_(True)

    @property
    def num_classes(self) -> int:
        return len(self.class_prompts)

    def image_embeddings(self, images: torch.Tensor, rectify: bool = True) -> torch.Tensor:
        """Unit-norm image embeddings, rectified when a rectifier is present and ``rectify``."""
        z = self.model._encode_pixels(self.model.preprocess(images))
        if rectify and self.rectifier is not None:
            z = self.rectifier(z)
        return F.normalize(z, dim=-1)

    def set_questions(self, questions: Sequence[str]) -> None:
        """The questions of the next batch, one per image (question-conditioned prompts only)."""
        if not self.conditioned:
            raise InputError("set_questions needs class prompts with the {question} placeholder")
        self.questions = check_texts(questions)
        self._question_cache = None

    def _question_embeddings(self) -> torch.Tensor:
        if self.questions is None:
            raise InputError("call set_questions with the batch's questions before its images")
        if self.head == "live" and self.training and torch.is_grad_enabled():
            clear_text_cache(self.model)  # the text tower changes every step
            return question_prompt_embeddings(self.model, self.class_prompts, self.questions)
        if self._question_cache is None:
            with torch.no_grad(), eval_mode(self.model):
                self._question_cache = question_prompt_embeddings(
                    self.model, self.class_prompts, self.questions
                )
        return self._question_cache

    def class_embeddings(self) -> torch.Tensor:
        """(K, D) class embeddings, or (N, K, D) per question when question-conditioned."""
        if self.conditioned:
            return self._question_embeddings() + self.class_weight
        if self.head == "live" and self.training and torch.is_grad_enabled():
            clear_text_cache(self.model)  # the text tower changes every step
            return prompt_embeddings(self.model, self.class_prompts)
        return self.class_weight

    def label_embeddings(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, D) fixed text embedding of each item's class (its question's prompt when
        question-conditioned), without gradients: the targets of RAN's contrastive term."""
        if not self.conditioned:
            return self.zero_shot_embeddings[labels]
        with torch.no_grad(), eval_mode(self.model):
            embeddings = self._question_embeddings()
        if len(embeddings) != len(labels):
            raise InputError(f"{len(labels)} labels for {len(embeddings)} questions")
        return embeddings[torch.arange(len(labels), device=labels.device), labels]

    def logits(
        self, features: torch.Tensor, scale: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits from unit image embeddings, at the model's logit scale or at ``scale``."""
        classes = self.class_embeddings()
        scale = self.model.logit_scale.exp() if scale is None else scale
        if classes.ndim == 2:
            return scale * features @ classes.T + self.bias
        if len(classes) != len(features):
            raise InputError(
                f"{len(features)} images for {len(classes)} questions; call set_questions with "
                "one question per image"
            )
        return scale * torch.einsum("nd,nkd->nk", features, classes) + self.bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.image_embeddings(images))

    @torch.no_grad()
    def refresh_class_embeddings(self) -> None:
        """Recompute a live head's buffer from the current text tower (after training); a
        question-conditioned head only drops its cached question embeddings."""
        clear_text_cache(self.model)
        self._question_cache = None
        if self.head == "live" and not self.conditioned:
            with eval_mode(self.model):
                self.class_weight.copy_(prompt_embeddings(self.model, self.class_prompts))
        clear_text_cache(self.model)


class RectifiedEncoder(DualEncoder):
    """A dual encoder whose image embeddings pass through a rectifier (RAN's MLP) before
    normalisation, exactly as in :meth:`FineTunedClassifier.image_embeddings`; the text tower,
    preprocessing and logit scale are the wrapped model's."""

    def __init__(self, model: DualEncoder, rectifier: nn.Module) -> None:
        super().__init__()
        self.model, self.rectifier = model, rectifier
        self.logit_scale = model.logit_scale
        self.embed_dim, self.image_size = model.embed_dim, model.image_size
        self.image_mean, self.image_std = model.image_mean, model.image_std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess(images)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.rectifier(self.model._encode_pixels(pixels))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model._encode_texts(texts)


def adapted_encoder(classifier: nn.Module) -> DualEncoder:
    """The fine-tuned dual encoder inside a classifier, for retrieval and multimodal attacks:
    its model as the method left it (LoRA merged, adapters, a folded linear rectifier, trained
    towers), wrapped in a :class:`RectifiedEncoder` when a rectifier remains (RAN's MLP)."""
    if not isinstance(classifier, FineTunedClassifier):
        raise InputError(
            "a fine-tuned dual encoder needs a FineTunedClassifier, got "
            f"{type(classifier).__name__}"
        )
    if classifier.rectifier is None:
        return classifier.model
    return RectifiedEncoder(classifier.model, classifier.rectifier)


# --- methods ------------------------------------------------------------------------------------


class NoOptions(StrictModel):
    """A method without options."""


@dataclass
class TrainData:
    """One split of a downstream task (a modality, or :data:`VQA_TASK`), as tensors.

    Attributes:
        images: [0, 1] NCHW images.
        labels: (N,) class indices.
        modality: the task's name.
        class_prompts: per class, its prompts (with ``{question}`` for VQA).
        questions: one question per item (VQA), else None.
        ids: each item's row in its split (the question id for VQA).
    """

    images: torch.Tensor
    labels: torch.Tensor
    modality: str
    class_prompts: list[list[str]]
    questions: list[str] | None = None
    ids: list[int] = field(default_factory=list)


class FineTuneMethod(ABC):
    """A fine-tuning method. Subclasses register with ``@METHODS.register(name, description)``.

    Class attributes:
        name: registry name, set by ``METHODS.register``.
        paper: the paper the method follows.
        Options: pydantic model validating ``FineTuneConfig.kwargs``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    adversarial: ClassVar[bool] = False
    """Trains against a PGD adversary (``FineTuneConfig.adversary`` may not be null, and the
    learning rate is picked by robust validation accuracy)."""

    def __init__(self, config: FineTuneConfig) -> None:
        self.config = config
        self.options = config.options

    def check(self, model: DualEncoder) -> None:
        """Refuse a model this method cannot adapt (raise a medshield error) before training."""
        if not isinstance(model, DualEncoder):
            raise InputError(f"fine-tuning needs a DualEncoder, got {type(model).__name__}")

    @abstractmethod
    def build(self, model: DualEncoder, class_prompts: Sequence[Sequence[str]]) -> nn.Module:
        """Modify ``model`` in place as the method needs, set ``requires_grad`` on exactly the
        parameters that train, and return the classifier (usually a FineTunedClassifier)."""

    @abstractmethod
    def loss(
        self, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on one batch and its parts (for the log)."""

    def prepare(self, classifier: nn.Module, train: TrainData) -> None:  # noqa: B027
        """Hook run once before the first step (e.g. keep a frozen copy)."""

    def start_epoch(self, epoch: int, epochs: int) -> None:  # noqa: B027
        """Hook run at the start of every pass over the training items (0-based ``epoch`` of
        ``epochs``, the passes the budget starts, the last one possibly cut short by a step
        budget), before its first step; a method that cannot use that many passes raises a
        :class:`ConfigError` at pass 0, before the first step."""

    def training_attack(self, classifier: nn.Module) -> Attack | None:
        """The method's own training adversary as a cross-entropy PGD against ``classifier``
        (None for a clean method): it scores robust validation accuracy when the learning rate
        is picked (:mod:`medshield.train.finetune.select`). By default
        ``FineTuneConfig.adversary``'s eps, steps and step size."""
        if not self.adversarial or self.config.adversary is None:
            return None
        adv = self.config.adversary
        return PGD(classifier, eps=adv.eps, alpha=adv.step_size, steps=adv.steps)

    def param_groups(
        self, classifier: nn.Module, trainable: list[nn.Parameter]
    ) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group may set its own ``lr`` (by default one
        group at ``FineTuneConfig.lr``)."""
        return [{"params": trainable}]

    def finalize(self, classifier: nn.Module) -> nn.Module:
        """Turn the trained classifier into the inference classifier (fold, refresh buffers)."""
        if isinstance(classifier, FineTunedClassifier):
            classifier.refresh_class_embeddings()
        return classifier

    def restore_structure(self, classifier: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """Re-apply what :meth:`finalize` changed in the module structure (for loading)."""
        return classifier


def method_for(config: FineTuneConfig) -> FineTuneMethod:
    """The registered method of ``config``."""
    return METHODS.get(config.method)(config)


# --- shared helpers -----------------------------------------------------------------------------


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def set_train_modes(module: nn.Module) -> None:
    """Train mode, except submodules with no trainable parameter (frozen BatchNorm statistics,
    no dropout in frozen parts)."""
    module.train()
    for m in module.modules():
        if not any(p.requires_grad for p in m.parameters()):
            m.eval()


def count_flops(module: nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`."""
    with eval_mode(module), torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(images)
    return int(counter.get_total_flops())


def measure_overhead(
    base: nn.Module, tuned: nn.Module, images: torch.Tensor, repeats: int = 5
) -> dict[str, float | int]:
    """Inference cost of ``tuned`` relative to ``base`` on the same images, in one process.

    FLOPs come from :func:`count_flops`; latency is the median of ``repeats`` interleaved timed
    forward passes of each (one warm-up pass each first), so load from other processes hits
    both alike. Both modules and ``images`` must be on one device; on a GPU each timed pass
    waits for its kernels.
    """
    base_flops, tuned_flops = count_flops(base, images), count_flops(tuned, images)
    times: dict[str, list[float]] = {"base": [], "tuned": []}
    with torch.no_grad(), eval_mode(base), eval_mode(tuned):
        base(images)
        tuned(images)
        for _ in range(repeats):
            for key, module in (("base", base), ("tuned", tuned)):
                synchronize(images.device)
                start = time.perf_counter()
                module(images)
                synchronize(images.device)
                times[key].append(time.perf_counter() - start)
    base_t, tuned_t = statistics.median(times["base"]), statistics.median(times["tuned"])
    return {
        "base_flops": base_flops,
        "flops": tuned_flops,
        "flops_ratio": tuned_flops / base_flops if base_flops else math.nan,
        "base_latency_s": base_t,
        "latency_s": tuned_t,
        "latency_ratio": tuned_t / base_t if base_t else math.nan,
        "batch": len(images),
    }


def task_name(name: str) -> str:
    """The canonical name of a downstream task: :data:`VQA_TASK` or a modality's name."""
    return VQA_TASK if name == VQA_TASK else data.get_modality(name).name


def task_prompts(name: str) -> list[list[str]]:
    """The class prompts of a downstream task (see :func:`task_name`)."""
    if name == VQA_TASK:
        return [list(prompts) for prompts in VQA_CLASS_PROMPTS]
    return data.get_modality(name).prompts()


def load_train_data(
    modality: str,
    max_items: int | None,
    seed: int,
    data_dir: str | Path | None = None,
    split: str = "train",
) -> TrainData:
    """A class-balanced subsample of about ``max_items`` items of one task's split.

    ``modality`` is a modality (its MedMNIST split) or :data:`VQA_TASK` (the closed VQA-RAD
    questions whose answer is "yes" or "no", images loaded at :data:`VQA_IMAGE_SIZE`).
    """
    if modality != VQA_TASK:
        samples = data.load_split(modality, split, data_dir)
        mod = samples.modality
        idx = balanced_subset(samples.labels, mod.num_classes, max_items, seed)
        labels = torch.as_tensor(samples.labels[idx], dtype=torch.long)
        return TrainData(samples.tensor(idx), labels, mod.name, mod.prompts(), ids=idx.tolist())
    items = [
        item
        for item in data.load_vqa_rad(split, data_dir, answer_type="closed")
        if item.answer in VQA_ANSWERS
    ]
    if not items:
        raise DataError(f"VQA-RAD has no closed yes/no questions in its {split} split")
    answers = np.array([VQA_ANSWERS.index(item.answer) for item in items])
    chosen = [items[i] for i in balanced_subset(answers, len(VQA_ANSWERS), max_items, seed)]
    return TrainData(
        torch.stack([data.load_vqa_image(item.image_path, VQA_IMAGE_SIZE) for item in chosen]),
        torch.tensor([VQA_ANSWERS.index(item.answer) for item in chosen]),
        VQA_TASK,
        task_prompts(VQA_TASK),
        questions=[item.question for item in chosen],
        ids=[item.qid for item in chosen],
    )


def split_validation(train: TrainData, fraction: float, seed: int) -> tuple[TrainData, TrainData]:
    """``train`` split into (fit, validation) with ``fraction`` of the items, stratified by
    class, in the validation part (scikit-learn's ``train_test_split``).

    Raises:
        DataError: a class too small to appear in both parts, or a validation part smaller
            than the number of classes.
    """
    from sklearn.model_selection import train_test_split

    try:
        fit, val = train_test_split(
            np.arange(len(train.labels)),
            test_size=fraction,
            random_state=seed,
            stratify=train.labels.numpy(),
        )
    except ValueError as exc:
        raise DataError(
            f"cannot hold out {fraction:g} of the {len(train.labels)} {train.modality} training "
            f"items as a validation set stratified by class: {exc}"
        ) from None
    return _subset(train, np.sort(fit)), _subset(train, np.sort(val))


def _subset(items: TrainData, idx: np.ndarray) -> TrainData:
    index = torch.as_tensor(idx, dtype=torch.long)
    return TrainData(
        items.images[index],
        items.labels[index],
        items.modality,
        items.class_prompts,
        questions=None if items.questions is None else [items.questions[i] for i in idx],
        ids=[items.ids[i] for i in idx] if items.ids else [],
    )


def item_slices(classifier: nn.Module, items: TrainData, batch_size: int) -> Iterator[slice]:
    """The slices of ``items`` to evaluate together: all at once on a modality; on the VQA
    task ``batch_size`` at a time, each with the classifier's questions set to its items'."""
    if items.questions is None:
        yield slice(0, len(items.images))
        return
    assert isinstance(classifier, FineTunedClassifier)
    for start in range(0, len(items.images), batch_size):
        part = slice(start, start + batch_size)
        classifier.set_questions(items.questions[part])
        yield part


def predict_classes(
    classifier: nn.Module, items: TrainData, shown: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """The predicted class of each of ``items`` when shown the images ``shown`` (its own, or
    another arrangement of them; on the VQA task with each item's own question), on the CPU."""
    return torch.cat(
        [
            classify_images(classifier, shown[part], batch_size)
            for part in item_slices(classifier, items, batch_size)
        ]
    ).argmax(1)


def validation_accuracy(classifier: nn.Module, val: TrainData, batch_size: int) -> float:
    """Clean accuracy of the classifier being trained on the held-out items (a live head's
    class embeddings are refreshed from the current text tower first)."""
    if isinstance(classifier, FineTunedClassifier):
        classifier.refresh_class_embeddings()
    pred = predict_classes(classifier, val, val.images, batch_size)
    return float((pred == val.labels).float().mean())


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class FineTuneResult:
    """A fine-tuned classifier and its report.

    Attributes:
        classifier: images in [0, 1] NCHW -> logits, in eval mode.
        report: ``trainable_params``, ``total_params``, ``train_items``, ``train_wall_s``
            (validation included), ``steps`` (optimiser steps taken), ``steps_per_pass``,
            ``compute`` (``image_forward`` / ``image_backward``: images through the image
            tower forwards / backwards while training, the adversary's and frozen copies'
            passes included, validation excluded, counted by :class:`ImageTowerCounter`;
            ``train_wall_s`` without validation, ``val_wall_s``, and
            ``train_flops_estimate``, (forwards + 2 x backwards) x the fine-tuned classifier's
            FLOPs per image from :func:`count_flops`), ``overhead`` (see
            :func:`measure_overhead`), ``history`` (one entry every ``log_every`` steps and
            after the last: ``step`` (steps done), ``epoch`` (the pass it ended in), ``lr``
            (of the entry's last step, first parameter group), the mean loss and every loss
            part over the entry's steps, and ``val_accuracy`` with a validation set), and with
            a validation set ``val_items``, with ``keep_best`` ``best_step``.
        config: the fine-tuning config.
        modality: the downstream modality.
        base_state: the base model's tensors before training (for saving only the change).
    """

    classifier: nn.Module
    report: dict[str, Any]
    config: FineTuneConfig
    modality: str
    seed: int
    base_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    base_ref: dict[str, Any] = field(default_factory=dict)
    val: TrainData | None = field(default=None, repr=False)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One pass: a seeded shuffle of ``range(n)`` cut into batches, without a 1-item tail (it
    breaks BatchNorm and batch statistics)."""
    order = torch.randperm(n, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def steps_per_pass(n: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n`` training items (see :func:`_batches`)."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (rest >= 2))


def total_steps(config: FineTuneConfig, n: int) -> int:
    """The budget in optimiser steps: ``steps``, or ``epochs`` passes over ``n`` items."""
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None  # the config fills in the default
    return config.epochs * steps_per_pass(n, config.batch_size)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``s`` (0-based) of ``total``: ``(s + 1) / (warmup
    + 1)`` over the first ``warmup`` steps, then 1 (``constant``) or a half cosine over the
    ``n = total - warmup`` remaining steps, from 1 down to ``(1 + cos(pi (n - 1) / n)) / 2`` ~ 0
    at the last (``cosine``), for :class:`torch.optim.lr_scheduler.LambdaLR`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return factor


def _tower_ends(model: DualEncoder) -> tuple[nn.Module, nn.Module] | None:
    """The first and last module an image passes through in the image tower (None when the
    model names no image blocks)."""
    blocks = model.image_blocks()
    if not blocks:
        return None
    first, last = blocks[0], blocks[-1]
    first = first[0] if isinstance(first, nn.ModuleList) else first
    last = last[-1] if isinstance(last, nn.ModuleList) else last
    return first, last


class ImageTowerCounter:
    """Counts the images through the image tower while ``active``: ``forward`` (every pass,
    the adversary's and frozen copies' included) and ``backward`` (every pass whose gradient
    flows back into the tower's output: training a part of the tower, or an attack's input
    gradient). Hooks on the tower's first and last module; copies of the model made while
    they are in place (a method's frozen teacher) count too."""

    def __init__(self, model: DualEncoder) -> None:
        self.forward = self.backward = 0
        self.active = True
        self.handles = []
        ends = _tower_ends(model)
        if ends is None:
            return

        def count_in(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.active:
                self.forward += len(args[0])

        def count_out(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if self.active and torch.is_tensor(out) and out.requires_grad:
                n = len(out)

                def count_grad(grad: torch.Tensor) -> None:
                    if self.active:
                        self.backward += n

                out.register_hook(count_grad)

        self.handles = [
            ends[0].register_forward_pre_hook(count_in),
            ends[1].register_forward_hook(count_out),
        ]

    def close(self) -> None:
        """Stop counting (copies of the model keep their hooks, now idle)."""
        self.active = False
        for handle in self.handles:
            handle.remove()


def finetune(
    model: DualEncoder,
    config: FineTuneConfig | dict[str, Any],
    modality: str,
    seed: int = 0,
    data_dir: str | Path | None = None,
    train: TrainData | None = None,
    base_ref: dict[str, Any] | None = None,
    overhead_batch: int = 8,
    latency_repeats: int = 5,
    log: Log | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> FineTuneResult:
    """Fine-tune ``model`` (modified in place) on one modality's train split.

    Everything that can be wrong with the config or the model (unknown method, bad weight,
    LoRA target that matches nothing, a model the method cannot adapt) raises before the
    first step.

    Args:
        model: the pretrained dual encoder.
        config: a :class:`FineTuneConfig` or a dict for one.
        modality: the downstream modality (its MedMNIST train split is read) or
            :data:`VQA_TASK` (the VQA-RAD closed yes/no train questions).
        seed: seeds the subsample, the batch order, new modules and the adversary.
        data_dir: data root.
        train: training data given directly (skips reading the split); a validation part is
            held out of it as out of the split.
        base_ref: how to rebuild the base model when loading (see :func:`save_finetuned`).
        overhead_batch: images per pass when measuring the inference overhead.
        latency_repeats: timed passes per model for the latency ratio.
        log: progress messages.
        progress: show a tqdm bar.
        device: where to train (the model and the new modules move there; training data moves
            one batch at a time). The result's classifier stays there.
        precision: ``fp32`` or ``bf16``: each step's forward pass and loss (the adversary of
            adversarial methods included) under :func:`medshield.device.autocast`.

    Returns:
        A :class:`FineTuneResult` (``base_state`` on the CPU).
    """
    config = parse_finetune_config(config)
    method = method_for(config)
    method.check(model)
    if train is None:
        train = load_train_data(modality, config.max_train_items, seed, data_dir)
    check_images(train.images)
    val = None
    if config.val_fraction > 0:
        train, val = split_validation(train, config.val_fraction, seed)
    if len(train.images) < 2:
        raise DataError(f"fine-tuning needs at least 2 training items, got {len(train.images)}")

    device = torch.device(device)
    check_precision(device, precision)  # a bad precision fails before the first step
    base_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.to(device)
    base = copy.deepcopy(model).eval()
    torch.manual_seed(seed)
    classifier = method.build(model, train.class_prompts).to(device)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"method {config.method!r} left no trainable parameter")
    if (train.questions is not None) != getattr(classifier, "conditioned", False):
        raise InputError(
            f"{config.method}: training items carry questions exactly when the class prompts "
            f"hold {QUESTION_FIELD} (a question-conditioned FineTunedClassifier)"
        )
    counter = ImageTowerCounter(model)  # before prepare: a method's frozen copies count too
    method.prepare(classifier, train)
    groups = method.param_groups(classifier, trainable)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    per_pass = steps_per_pass(len(train.images), config.batch_size)
    n_steps = total_steps(config, len(train.images))
    warmup = int(config.warmup_fraction * n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, warmup, n_steps)
    )
    log_every = config.log_every or per_pass
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # accuracy, step, state
    n_trainable = sum(p.numel() for p in trainable)
    if log:
        log(
            f"fine-tuning {config.method} on {len(train.images)} {train.modality} items, "
            f"{n_trainable:,} trainable parameters, {n_steps} steps ({per_pass} per pass)"
        )
    start = time.perf_counter()
    val_wall = 0.0
    sums: dict[str, float] = {}
    window = 0
    batches: list[torch.Tensor] = []
    epoch = -1
    bar = tqdm(total=n_steps, desc=config.method, disable=not progress)
    for step in range(n_steps):
        if not batches:
            epoch += 1
            method.start_epoch(epoch, math.ceil(n_steps / per_pass))
            batches = _batches(len(train.images), config.batch_size, generator)
        idx = batches.pop(0)
        set_train_modes(classifier)
        if train.questions is not None:
            classifier.set_questions([train.questions[i] for i in idx])
        images, labels = train.images[idx].to(device), train.labels[idx].to(device)
        with autocast(device, precision):
            loss, parts = method.loss(classifier, images, labels)
        lr = optimizer.param_groups[0]["lr"]
        check_finite_loss(loss, f"{config.method} fine-tuning step {step + 1}", "finetune.lr", lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        parts = {"loss": float(loss.detach()), **parts}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        window += 1
        bar.update()
        bar.set_postfix(loss=f"{parts['loss']:.3f}")
        if (step + 1) % log_every and step + 1 < n_steps:
            continue
        entry = {"step": step + 1, "epoch": epoch, "lr": lr}
        history.append({**entry, **{k: v / window for k, v in sums.items()}})
        sums, window = {}, 0
        if val is not None:
            counter.active, val_start = False, time.perf_counter()
            accuracy = validation_accuracy(classifier, val, config.batch_size)
            counter.active, val_wall = True, val_wall + time.perf_counter() - val_start
            history[-1]["val_accuracy"] = accuracy
            if config.keep_best and (best is None or accuracy > best[0]):
                state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
                best = (accuracy, step + 1, state)
    bar.close()
    counter.close()
    if best is not None:
        classifier.load_state_dict(best[2])
    train_wall = time.perf_counter() - start
    classifier.eval()
    classifier = method.finalize(classifier)
    freeze(classifier)
    classifier.eval()

    probe = train.images[:overhead_batch].to(device)
    base_classifier = FineTunedClassifier(base, train.class_prompts).to(device)  # zero-shot
    if train.questions is not None:
        for module in (base_classifier, classifier):
            module.set_questions(train.questions[:overhead_batch])
    overhead = measure_overhead(base_classifier, classifier, probe, repeats=latency_repeats)
    report = {
        "method": config.method,
        "paper": method.paper,
        "trainable_params": n_trainable,
        "total_params": count_parameters(classifier),
        "base_params": count_parameters(base),
        "train_items": len(train.images),
        "train_wall_s": round(train_wall, 3),
        "steps": n_steps,
        "steps_per_pass": per_pass,
        "compute": {
            "image_forward": counter.forward,
            "image_backward": counter.backward,
            "train_wall_s": round(train_wall - val_wall, 3),
            "val_wall_s": round(val_wall, 3),
            "train_flops_estimate": (counter.forward + 2 * counter.backward)
            * overhead["flops"]
            // overhead["batch"],
        },
        "overhead": overhead,
        "history": history,
    }
    if val is not None:
        report["val_items"] = len(val.images)
    if best is not None:
        report["best_step"] = best[1]
    return FineTuneResult(
        classifier, report, config, train.modality, seed, base_state, dict(base_ref or {}), val
    )


# --- save / load --------------------------------------------------------------------------------


def _base_key(key: str) -> str:
    """State key of the unmodified base model for a key of the classifier (LoRA wraps layers)."""
    return key.removeprefix("model.").replace(".base_layer", "")


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and bytes of a state dict (identifies a base model)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(
            tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return digest.hexdigest()


def save_finetuned(result: FineTuneResult, directory: str | Path) -> Path:
    """Write ``method.safetensors`` (the tensors that differ from the base model) and
    ``finetune.json`` (base reference, config, report) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in result.classifier.state_dict().items():
        base_value = result.base_state.get(_base_key(key)) if key.startswith("model.") else None
        if (
            base_value is None
            or base_value.shape != value.shape
            or not torch.equal(base_value, value.detach().cpu())
        ):
            state[key] = value.detach().cpu().contiguous()
    save_file(state, str(directory / STATE_FILE))
    meta = {
        "format": FORMAT,
        "medshield_version": medshield.__version__,
        "method": result.config.method,
        "config": result.config.model_dump(mode="json"),
        "modality": result.modality,
        "seed": result.seed,
        "base": result.base_ref,
        "base_fingerprint": state_fingerprint(result.base_state),
        "structure": getattr(result.classifier, "structure_meta", {}),
        "report": result.report,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def build_base(base_ref: dict[str, Any]) -> DualEncoder:
    """Rebuild a base model from a reference: ``{"checkpoint": dir}`` or
    ``{"backend": name, "kwargs": {...}, "seed": int}`` (new heads seeded as in training)."""
    from medshield.models import create_model, load_model

    if base_ref.get("checkpoint"):
        return load_model(base_ref["checkpoint"])
    if "backend" not in base_ref:
        raise DataError(f"base model reference {base_ref} names neither a checkpoint nor a backend")
    torch.manual_seed(int(base_ref.get("seed", 0)))
    return create_model(base_ref["backend"], **base_ref.get("kwargs", {}))


def read_finetuned_meta(directory: str | Path) -> dict[str, Any]:
    meta = read_record(directory, META_FILE, "fine-tuned medshield model")
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{Path(directory) / META_FILE} is not a format-{FORMAT} fine-tuning record"
        )
    return meta


def load_finetuned(
    directory: str | Path, model: DualEncoder | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a classifier saved by :func:`save_finetuned`, in eval mode.

    Args:
        directory: the saved directory.
        model: the base model, when the caller already has it; by default it is rebuilt from
            the saved reference. It must be the same base the method was trained from.

    Returns:
        (classifier, metadata from ``finetune.json``).

    Raises:
        DataError: missing or malformed files, a base model other than the one trained from,
            or saved tensors that do not fit the rebuilt architecture.
    """
    directory = Path(directory)
    meta = read_finetuned_meta(directory)
    config = parse_finetune_config(meta["config"])
    if model is None:
        model = build_base(meta.get("base") or {})
    fingerprint = state_fingerprint(model.state_dict())
    if fingerprint != meta.get("base_fingerprint"):
        raise DataError(
            f"the base model given for {directory} is not the one {meta['method']!r} was "
            "fine-tuned from (its weights differ); pass the original base checkpoint"
        )
    method = method_for(config)
    method.check(model)
    prompts = task_prompts(meta["modality"])
    torch.manual_seed(int(meta.get("seed", 0)))
    classifier = method.build(model, prompts)
    classifier = method.restore_structure(classifier, meta.get("structure", {}))
    try:
        state = load_file(str(directory / STATE_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise DataError(f"cannot read {directory / STATE_FILE}: {exc}") from exc
    try:
        result = classifier.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise DataError(f"tensors in {directory} do not fit the rebuilt classifier: {exc}") from exc
    if result.unexpected_keys:
        raise DataError(
            f"{directory / STATE_FILE} holds tensors the rebuilt {meta['method']!r} classifier "
            f"does not have: {result.unexpected_keys[:5]}"
        )
    clear_text_cache(model)
    freeze(classifier)
    return classifier.eval(), meta
