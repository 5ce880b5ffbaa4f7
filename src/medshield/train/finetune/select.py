"""Learning-rate and option selection on a validation split (``FineTuneConfig.lr_grid`` and
``kwargs_grid``).

:func:`finetune_grid` trains one model per candidate, each learning rate of the grid with each
alternative of the options' grid (one of them when the config has one grid), each from a fresh
copy of the base model with the same seed, data, validation split and step budget, and scores it on
the held-out items: clean accuracy for a clean method, and for an adversarial one
(:attr:`~medshield.train.finetune.method.FineTuneMethod.adversarial`: tecoa, fare, fare-probe,
ran, adv-*) robust accuracy under the method's own training adversary
(:meth:`~medshield.train.finetune.method.FineTuneMethod.training_attack`: PGD with the
cross-entropy loss at the training eps, steps and step size, in eval mode). The model of the
best score is kept (an adversarial method's tie on robust accuracy goes to the higher clean
accuracy, then to the first of the grid); nothing is retrained. A run whose clean validation
accuracy is no better than the majority class's share is *degenerate*, a classifier collapsed
onto one class (measured: adv-adapter at lr 0.01 on chest X-ray): its robust accuracy equals
its clean accuracy, about 0.5 on a balanced binary split, which would beat every real robust
model, so it is kept only when every run of the grid is degenerate. A *partial* collapse
counts too: a run whose clean predictions on the validation items cover at most half of the
classes they hold (measured on blood cells, 8 classes: `adv-lora` at 3e-3 and TeCoA at 3e-4 were
picked at validation clean accuracy 0.252 and 0.282, robust 0.243 and 0.204, and predicted 1 to
4 of the classes on 5 of their 6 test cells; rerun with this rule, TeCoA's 3e-4 run predicted 4
classes on validation and was refused, while `adv-lora`'s predicted 7, skewed rather than
missing classes, and stood). On a binary task that is the one-class collapse. Its report gets
``lr_selection``:

- ``grid``: the learning rates, in config order;
- with a ``kwargs_grid``: ``kwargs_grid`` (the alternatives), ``candidates`` (``lr`` and
  ``kwargs`` alternative, in training order: each learning rate with every alternative) and
  ``kwargs_pick`` (the chosen alternative); the per-run lists below follow ``candidates``, and
  without it the learning rates;
- ``select_by``: ``val_clean_accuracy`` or ``val_robust_accuracy``;
- ``scores``: the selection score per run;
- ``val_clean_accuracy`` per run, and ``val_robust_accuracy`` for an adversarial
  method;
- ``val_majority_accuracy``: the majority class's share of the validation items,
  ``val_classes_predicted``: per run, how many classes the run predicts on them (of
  ``val_classes``, the classes they hold), and ``degenerate``: per run, whether the
  run did no better than the majority share or predicted at most half of the classes;
- ``pick``: the chosen learning rate; ``val_items``: the validation items;
- ``compute``: ``image_forward``, ``image_backward`` and ``train_wall_s`` summed over the grid's
  trainings (the kept run's own are its report's ``compute``).

A pick at the top or bottom of a grid of several learning rates (:func:`pick_at_edge`) may
have a better rate beyond it: the run logs it, and a study's ``tables.md`` marks it, so the
grid can be extended (a baseline starved by its grid is no fair comparison).

A study reuses the first seed's pick for its other seeds (see
:mod:`medshield.commands.studies.finetune`); their reports carry the first seed's
``lr_selection`` with ``from_seed``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medshield.errors import ConfigError
from medshield.models.base import DualEncoder
from medshield.train.finetune.config import FineTuneConfig, parse_finetune_config
from medshield.train.finetune.data import (
    TrainData,
    load_train_data,
    predict_classes,
    validation_accuracy,
)
from medshield.train.finetune.loop import FineTuneResult, finetune, robust_validation_accuracy
from medshield.train.finetune.method import method_for


def majority_share(labels: torch.Tensor) -> float:
    """The share of the most frequent label: the accuracy of a constant classifier."""
    return float(torch.bincount(labels).max()) / len(labels)


def classes_predicted(classifier: nn.Module, val: TrainData, batch_size: int) -> int:
    """How many distinct classes the classifier predicts on the held-out items (clean)."""
    return int(predict_classes(classifier, val, val.images, batch_size).unique().numel())


def is_degenerate(accuracy: float, labels: torch.Tensor, predicted: int | None = None) -> bool:
    """Whether a run collapsed: ``accuracy`` on ``labels`` no better than the majority share,
    or (given ``predicted``, the classes it predicts) at most half of the classes ``labels``
    holds predicted. Accuracies are multiples of ``1 / len(labels)``, so half an item of slack
    absorbs the float32 mean's rounding (52/103 computed in float32 is above 52/103 in
    float64)."""
    if accuracy <= majority_share(labels) + 0.5 / len(labels):
        return True
    return predicted is not None and 2 * predicted <= labels.unique().numel()


def finetune_grid(
    model: DualEncoder,
    config: FineTuneConfig | dict[str, Any],
    modality: str,
    seed: int = 0,
    data_dir: str | Path | None = None,
    train: TrainData | None = None,
    **kwargs: Any,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` for every candidate of the config (each learning rate of
    ``lr_grid`` with each alternative of ``kwargs_grid``, see
    :attr:`~medshield.train.finetune.config.FineTuneConfig.candidates`) and return the result
    scored best on validation, its report with ``lr_selection`` (see the module docstring) and
    its config at the picked ``lr`` and options (grids cleared). ``model`` itself is left as it
    was; ``kwargs`` go to :func:`~medshield.train.finetune.loop.finetune`."""
    config = parse_finetune_config(config)
    if not config.selects:
        raise ConfigError(
            "finetune_grid needs finetune.lr_grid (learning rates) or finetune.kwargs_grid "
            "(alternative method options) to choose from"
        )
    method = method_for(config)
    method.check(model)  # a model the method cannot adapt fails before the first training
    if train is None:
        train = load_train_data(modality, config.max_train_items, seed, data_dir)
    select_by = "val_robust_accuracy" if method.adversarial else "val_clean_accuracy"
    best: FineTuneResult | None = None
    best_entry: dict[str, Any] = {}
    degenerate: list[bool] = []
    predicted: list[int] = []
    clean: list[float] = []
    robust: list[float] = []
    totals = {"image_forward": 0, "image_backward": 0, "train_wall_s": 0.0}
    for lr, entry in config.candidates:
        cfg = config.candidate(lr, entry)
        result = finetune(copy.deepcopy(model), cfg, modality, seed, data_dir, train, **kwargs)
        assert result.val is not None  # the config asks for a validation set with a grid
        clean.append(validation_accuracy(result.classifier, result.val, config.batch_size))
        predicted.append(classes_predicted(result.classifier, result.val, config.batch_size))
        degenerate.append(is_degenerate(clean[-1], result.val.labels, predicted[-1]))
        if method.adversarial:
            robust.append(
                robust_validation_accuracy(
                    result.classifier, cfg, result.val, config.batch_size, seed
                )
            )
        for key in totals:
            totals[key] += result.report["compute"][key]
        # the key of the kept run: not degenerate, its score, then (adversarial methods) its
        # clean accuracy, so an all-zero robust column (a method that learned nothing robust)
        # still picks the run that learned the task best
        scores = robust if method.adversarial else clean
        keys = [(not d, s, c) for d, s, c in zip(degenerate, scores, clean, strict=True)]
        if best is None or keys[-1] > max(keys[:-1]):
            best, best_entry = result, entry
    assert best is not None and best.val is not None  # every run of a grid holds one out
    scores = robust if method.adversarial else clean
    selection: dict[str, Any] = {
        "grid": list(config.lr_grid or [config.lr]),
        "select_by": select_by,
        "scores": scores,
        "val_clean_accuracy": clean,
        "val_majority_accuracy": majority_share(best.val.labels),
        "val_classes_predicted": predicted,
        "val_classes": int(best.val.labels.unique().numel()),
        "degenerate": degenerate,
        "pick": best.config.lr,
        "val_items": len(best.val.images),
        "compute": {**totals, "train_wall_s": round(totals["train_wall_s"], 3)},
    }
    if config.kwargs_grid is not None:
        selection["kwargs_grid"] = config.kwargs_grid
        selection["candidates"] = [{"lr": lr, "kwargs": e} for lr, e in config.candidates]
        selection["kwargs_pick"] = best_entry
    if method.adversarial:
        selection["val_robust_accuracy"] = robust
    best.report["lr_selection"] = selection
    edge = pick_at_edge(selection)
    if edge is not None and kwargs.get("log") is not None:
        kwargs["log"](
            f"{config.method}: the picked lr {best.config.lr:g} is the {edge} of the grid "
            f"{selection['grid']}: a rate beyond it may score better; extend finetune.lr_grid"
        )
    return best


def pick_at_edge(selection: dict[str, Any]) -> str | None:
    """``"top"`` or ``"bottom"`` where a selection (``lr_selection``) picked the largest or
    the smallest learning rate of a grid of several, else None."""
    grid = selection.get("grid") or []
    if len(set(grid)) < 2:
        return None
    if selection["pick"] == max(grid):
        return "top"
    return "bottom" if selection["pick"] == min(grid) else None
