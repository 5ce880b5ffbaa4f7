"""Robust zero-shot accuracy under L-inf PGD at several budgets, with sanity flags.

For each image of a (class-balanced) test subsample, the zero-shot classifier is attacked with
PGD at every budget in ``eps_values`` (/255 units). One sample row per image holds the clean
result and, per budget (keyed by the budget written with ``:g``, e.g. ``"2"``), the adversarial
result and the perturbation's size and range::

    {"task": "robust_zero_shot", "modality": "chest_xray", "index": 17, "label": 1,
     "clean_correct": true, "zero_gradient": false,
     "adv_correct": {"1": true, "2": false, "4": false},
     "robust_correct": {"1": true, "2": false, "4": false},
     "linf": {"1": 1.0, "2": 2.0, "4": 4.0}, "adv_min": {...}, "adv_max": {...}}

``robust_correct`` is AutoAttack's convention (right clean *and* adversarial).
:func:`robust_flags` turns a group of such rows into the sanity flags of
:mod:`medshield.attacks.sanity`: budget, range, robust<=clean, a larger budget never leaving more
robust accuracy than a smaller one, and no exactly-zero input gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medshield import data
from medshield.attacks.base import attack_mode, check_budget, check_count
from medshield.attacks.pgd import PGD, pgd_step_size
from medshield.attacks.sanity import (
    SanityFlag,
    accuracy_flag,
    budget_flag,
    range_flag,
    robust_accuracy,
    stronger_flag,
)
from medshield.errors import InputError
from medshield.eval.features import check_finite_outputs
from medshield.eval.zero_shot import balanced_subset
from medshield.models.base import DualEncoder, ZeroShotClassifier, evaluating

TASK = "robust_zero_shot"


def eps_key(eps: float) -> str:
    """The row key of a budget: ``2.0 -> "2"``, ``0.5 -> "0.5"``."""
    return f"{eps:g}"


def check_eps_values(eps_values: Sequence[float]) -> list[float]:
    """Distinct budgets (/255 units, each > 0), sorted ascending."""
    if isinstance(eps_values, (str, bytes)) or not eps_values:
        raise InputError("eps_values must be a non-empty list of budgets in /255 units")
    values = [check_budget(e, "eps") for e in eps_values]
    if min(values) <= 0:
        raise InputError(f"every eps must be > 0 (/255 units), got {values}")
    if len({eps_key(e) for e in values}) != len(values):
        raise InputError(f"eps_values has repeats: {values}")
    return sorted(values)


def robust_zero_shot_rows(
    model: DualEncoder,
    modality: str,
    eps_values: Sequence[float] = (1, 2, 4),
    steps: int = 10,
    max_items: int | None = 200,
    seed: int = 0,
    split: str = "test",
    data_dir: str | Path | None = None,
    batch_size: int = 128,
) -> list[dict[str, Any]]:
    """Attack the zero-shot classifier of one modality with L-inf PGD at every budget.

    Args:
        model: the dual encoder (left in the train/eval mode and with the gradient flags it had).
        modality: modality name.
        eps_values: budgets in /255 units.
        steps: PGD iterations, with a random start and the step size of
            :func:`medshield.attacks.pgd.pgd_step_size`.
        max_items: class-balanced subsample size (see :func:`balanced_subset`); None: all.
        seed: seed of the subsample and of the random starts.
        split: the split attacked.
        data_dir: data root (see :func:`medshield.data.load_split`).
        batch_size: images per attack call.

    Raises:
        InputError: bad budgets or steps.
        DataError: the split cannot be loaded.
    """
    eps_values = check_eps_values(eps_values)
    steps = check_count(steps, "steps")
    samples = data.load_split(modality, split, data_dir)
    mod = samples.modality
    indices = balanced_subset(samples.labels, mod.num_classes, max_items, seed)
    images = samples.tensor(indices)
    labels = torch.as_tensor(samples.labels[indices], dtype=torch.long)
    with evaluating(model):
        classifier = ZeroShotClassifier(model, mod.prompts())

    rows = pgd_rows(classifier, images, labels, eps_values, steps, seed, batch_size)
    return [
        {"task": TASK, "modality": mod.name, "index": int(index), "label": int(label), **row}
        for index, label, row in zip(indices, labels.tolist(), rows, strict=True)
    ]


def pgd_rows(
    classifier: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps_values: Sequence[float],
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
) -> list[dict[str, Any]]:
    """Attack ``classifier`` (images -> logits) with L-inf PGD (``steps`` steps of
    :func:`pgd_step_size`, random start) at every budget; one row per image in the format of the
    module docstring, without ``task``, ``modality``, ``index`` and ``label``.

    The random starts are seeded with ``seed`` without touching the global generator.
    """
    eps_values = check_eps_values(eps_values)
    steps = check_count(steps, "steps")
    fields = ("adv_correct", "robust_correct", "linf", "adv_min", "adv_max")
    rows: list[dict[str, Any]] = [
        {"zero_gradient": bool(zero), **{field: {} for field in fields}}
        for zero in _zero_gradients(classifier, images, labels, batch_size)
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for eps in eps_values:
            attack = PGD(
                classifier, eps=eps, alpha=pgd_step_size(eps, steps), steps=steps, random_start=True
            )
            key = eps_key(eps)
            for row, result in zip(
                rows, robust_accuracy(classifier, attack, images, labels, batch_size), strict=True
            ):
                row["clean_correct"] = result["clean_correct"]
                row["size"] = result["size"]
                row["adv_correct"][key] = result["adv_correct"]
                row["robust_correct"][key] = result["robust_correct"]
                row["linf"][key] = round(result["linf"], 6)
                row["adv_min"][key] = result["adv_min"]
                row["adv_max"][key] = result["adv_max"]
    return rows


def _zero_gradients(
    classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> list[bool]:
    """Per image: is the input gradient of the clean cross-entropy exactly zero?"""
    zero: list[bool] = []
    with attack_mode(classifier):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].clone().requires_grad_(True)
            logits = check_finite_outputs(classifier(x), "attacking the classifier")
            loss = torch.nn.functional.cross_entropy(
                logits, labels[start : start + batch_size], reduction="sum"
            )
            (grad,) = torch.autograd.grad(loss, x)
            zero.extend((grad.flatten(1) == 0).all(dim=1).tolist())
    return zero


def _rows_at(rows: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The rows of one budget in the format of :func:`medshield.attacks.robust_accuracy`."""
    return [
        {
            "clean_correct": r["clean_correct"],
            "adv_correct": r["adv_correct"][key],
            "robust_correct": r["robust_correct"][key],
            "linf": r["linf"][key],
            "adv_min": r["adv_min"][key],
            "adv_max": r["adv_max"][key],
            "size": r["size"],
        }
        for r in rows
    ]


def robust_flags(rows: Sequence[dict[str, Any]]) -> list[SanityFlag]:
    """The sanity flags of one group of :func:`robust_zero_shot_rows` rows.

    Per budget: "budget@eps", "range@eps", "robust<=clean@eps"; between consecutive budgets:
    "stronger<=weaker@a->b" (a larger ball cannot leave more robust accuracy); and
    "zero-gradients" (a share of images above 0 suggests gradient masking).
    """
    if not rows:
        raise InputError("robust_flags needs at least one row")
    keys = sorted(rows[0]["linf"], key=float)
    flags: list[SanityFlag] = []
    for key in keys:
        at = _rows_at(rows, key)
        for flag in (budget_flag(at, float(key)), range_flag(at), accuracy_flag(at)):
            flags.append(SanityFlag(f"{flag.name}@{key}", flag.passed, flag.detail))
    for small, large in zip(keys, keys[1:], strict=False):
        flag = stronger_flag(_rows_at(rows, small), _rows_at(rows, large))
        flags.append(SanityFlag(f"{flag.name}@{small}->{large}", flag.passed, flag.detail))
    zero = int(np.sum([bool(r["zero_gradient"]) for r in rows]))
    flags.append(
        SanityFlag(
            "zero-gradients",
            zero == 0,
            f"{zero} of {len(rows)} images have an exactly zero input gradient"
            + ("; gradient masking?" if zero else ""),
        )
    )
    return flags
