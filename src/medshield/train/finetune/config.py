"""The fine-tuning config: method, optimisation budget and schedule, learning-rate grid,
per-method options and the training adversary (:class:`FineTuneConfig`), validated into
:class:`ConfigError` by :func:`parse_finetune_config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from medshield.attacks.pgd import pgd_step_size
from medshield.config import StrictModel
from medshield.errors import ConfigError
from medshield.registry import METHODS

DEFAULT_EPOCHS = 10  # the budget when neither steps nor epochs is set
BatchNormMode = Literal["train", "frozen"]  # FineTuneConfig.batchnorm


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
        lr_grid: learning rates to choose from on the validation split (needs a validation
            set): one model is trained per value with the same seed and budget, and the best on
            validation is kept (see
            :func:`medshield.train.finetune.select.finetune_grid`); None trains at ``lr``.
        kwargs_grid: alternative method options to choose from on the validation split, each
            merged over ``kwargs`` (e.g. ``[{}, {align: 0}]``: RAN as configured, and without
            re-alignment), selected jointly with ``lr_grid``: one model per (learning rate,
            alternative), the best on validation kept; None trains with ``kwargs``.
        schedule: ``constant`` or ``cosine`` (decay to 0 at the last step), after the warm-up.
        warmup_fraction: share of the steps over which the learning rate rises linearly from
            ``lr / warm-up steps`` to ``lr`` (0: no warm-up), so it scales with the budget.
        log_every: steps per history entry (None: one pass over the training items).
        weight_decay: AdamW weight decay.
        max_train_items: class-balanced subsample of the train split (None: all).
        val_fraction: share of those items held out (stratified by class) as a validation set,
            scored at every history entry (``val_accuracy``); 0 holds out nothing.
        val_items: a validation set of about this many class-balanced items of the train
            split *beside* the training items (none of them is trained on, and the training
            items stay ``max_train_items``), instead of carving ``val_fraction`` out of them;
            a larger set tells learning rates apart that a few dozen held-out items cannot.
        keep_best: end with the weights of the history entry of highest validation accuracy
            (the earliest on a tie) instead of the last step's; needs a validation set.
        val_robust: also score the held-out items under the method's own training adversary
            at every history entry (``val_robust_accuracy``, as the learning-rate selection
            scores a run), so a study can tell whether more steps still make the model more
            robust on held-out items; adversarial methods only, needs a validation set.
            It leaves training as it is (the attack's random start draws from a forked random
            state) and adds one attack on the held-out items per entry.
        kwargs: method-specific options, validated by the method (unknown keys are refused;
            RAN's loss weights are among its options).
        adversary: PGD used to craft training examples on the fly (TeCoA, FARE; RAN and the
            ``adv-*`` methods take its ``eps`` and set their own steps). ``null`` means no
            adversary, which only the clean methods accept.
        batchnorm: how the BatchNorm layers that train (those of a method that trains the whole
            image tower: ``tecoa``, ``fare``, ``full``) behave during training. ``train``
            normalises each batch by its own statistics and updates the running ones;
            ``frozen`` keeps every BatchNorm layer in eval mode, so training, the training
            adversary and the deployed model all use the pretrained running statistics (the
            affine weights still train). Layers of a method that leaves them frozen (LoRA,
            adapters, RAN, the probes) are in eval mode either way.
    """

    method: str = "ran"
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    lr_grid: list[float] | None = None
    kwargs_grid: list[dict[str, Any]] | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    log_every: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_train_items: int | None = Field(512, ge=2)
    val_fraction: float = Field(0.0, ge=0, le=0.5)
    val_items: int | None = Field(None, ge=2)
    keep_best: bool = False
    val_robust: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    adversary: AdversaryConfig | None = Field(default_factory=AdversaryConfig)
    batchnorm: BatchNormMode = "train"

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
        if self.val_items is not None and self.val_fraction > 0:
            raise ValueError(
                f"val_items ({self.val_items}) and val_fraction ({self.val_fraction}) both make "
                "a validation set: keep one"
            )
        if self.keep_best and not self.validates:
            raise ValueError(
                "keep_best picks the best history entry by validation accuracy: set "
                "val_fraction above 0 or val_items"
            )
        if self.val_robust and not self.validates:
            raise ValueError(
                "val_robust scores the held-out items under attack: set val_fraction above 0 "
                "or val_items"
            )
        if self.val_robust and not method.adversarial:
            raise ValueError(
                f"val_robust scores the held-out items under the method's training adversary, "
                f"and {self.method} is a clean method with none: leave val_robust off"
            )
        if self.lr_grid is not None:
            if not self.lr_grid:
                raise ValueError(
                    "lr_grid is empty: give at least one learning rate, or leave lr_grid out "
                    "(null) to train at lr"
                )
            if any(lr <= 0 for lr in self.lr_grid):
                raise ValueError(f"every learning rate in lr_grid must be > 0, got {self.lr_grid}")
            if not self.validates:
                raise ValueError(
                    "lr_grid picks the learning rate on a validation split: set val_fraction "
                    "above 0 (e.g. 0.2) or val_items"
                )
        if self.kwargs_grid is not None:
            self._check_kwargs_grid(method.Options)
        if method.adversarial and self.adversary is None:
            raise ValueError(
                f"{self.method} trains against an adversary, but adversary is null: give "
                "adversary: {eps: ...} (its eps is the training budget, /255), or use a clean "
                "method"
            )
        return self

    def _check_kwargs_grid(self, options: type[BaseModel]) -> None:
        assert self.kwargs_grid is not None
        if not self.kwargs_grid:
            raise ValueError(
                "kwargs_grid is empty: give at least one alternative (an empty one, {}, trains "
                "with kwargs as they are), or leave kwargs_grid out (null)"
            )
        if not self.validates:
            raise ValueError(
                "kwargs_grid picks the method's options on a validation split: set "
                "val_fraction above 0 (e.g. 0.2) or val_items"
            )
        trained: list[dict[str, Any]] = []
        for entry in self.kwargs_grid:
            merged = {**self.kwargs, **entry}
            try:
                options.model_validate(merged)
            except ValidationError as exc:
                raise ValueError(
                    f"kwargs_grid entry {entry} does not fit {self.method}: {exc}"
                ) from None
            if merged in trained:
                raise ValueError(
                    f"kwargs_grid entry {entry} trains the same options as an earlier one "
                    f"(merged over kwargs {self.kwargs}): drop it"
                )
            trained.append(merged)

    @property
    def candidates(self) -> list[tuple[float, dict[str, Any]]]:
        """The (learning rate, ``kwargs_grid`` alternative) pairs a selection trains, learning
        rate by learning rate: ``lr_grid`` (or ``lr``) times ``kwargs_grid`` (or ``[{}]``)."""
        return [
            (lr, entry) for lr in self.lr_grid or [self.lr] for entry in self.kwargs_grid or [{}]
        ]

    @property
    def selects(self) -> bool:
        """Whether training picks among candidates on validation (``lr_grid`` or
        ``kwargs_grid``)."""
        return self.lr_grid is not None or self.kwargs_grid is not None

    def candidate(self, lr: float, entry: dict[str, Any]) -> FineTuneConfig:
        """This config for one candidate: at ``lr``, with ``entry`` merged over ``kwargs`` and
        no grid left."""
        update = {"lr": lr, "kwargs": {**self.kwargs, **entry}, "lr_grid": None}
        return self.model_copy(update={**update, "kwargs_grid": None})

    def at_pick(self, selection: dict[str, Any]) -> FineTuneConfig:
        """This config at a recorded selection's pick (another seed's ``lr_selection``): its
        ``pick`` learning rate and, where it has one, its ``kwargs_pick`` merged over
        ``kwargs``; no grid left."""
        return self.candidate(selection["pick"], selection.get("kwargs_pick", {}))

    @property
    def validates(self) -> bool:
        """Whether training holds out a validation set (``val_fraction`` or ``val_items``)."""
        return self.val_fraction > 0 or self.val_items is not None

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
