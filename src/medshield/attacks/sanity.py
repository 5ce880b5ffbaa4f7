"""Sanity checks of an attack evaluation, in the spirit of AutoAttack's and RobustBench's checks.

Each ``*_flag`` function derives one :class:`SanityFlag` from the rows of an evaluation, one row
per example (clean and adversarial correctness, perturbation size, value range, whether the
input gradient is zero), as :func:`medshield.eval.robust.attacked_rows` writes them;
:func:`medshield.eval.robust.robust_flags` applies them to a whole robust evaluation and
:func:`medshield.eval.robust.sanity_checks` to one attack.

A failed flag means the evaluation is not to be trusted: a perturbation outside the budget or
the valid range is a bug in the attack; robust accuracy above clean accuracy, or a stronger
attack doing worse than a weaker one, means the attack does not optimise properly; zero input
gradients point to gradient masking (a non-differentiable or saturated model), under which
gradient attacks overestimate robustness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medshield.attacks.base import Attack, attack_mode, check_budget, check_norm
from medshield.errors import InputError

Row = dict[str, Any]


@dataclass(frozen=True)
class SanityFlag:
    """The outcome of one check.

    Attributes:
        name: short identifier, e.g. "budget".
        passed: False when the check found a problem.
        detail: what was measured, in words and numbers.
    """

    name: str
    passed: bool
    detail: str

    def __str__(self) -> str:
        return f"[{'ok' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


def _mean(rows: Sequence[Row], field: str) -> float:
    if not rows:
        raise InputError("a sanity check needs at least one row")
    return sum(bool(r[field]) for r in rows) / len(rows)


def budget_flag(
    rows: Sequence[Row],
    eps: float,
    norm: str = "Linf",
    tolerance: float = 1e-3,
    uint8: bool = False,
) -> SanityFlag:
    """Every perturbation lies within ``eps`` (in /255 units) in ``norm``.

    Args:
        rows: rows of :func:`medshield.eval.robust.attacked_rows`.
        eps: the budget, /255 units.
        norm: "Linf" or "L2".
        tolerance: slack for float rounding, /255 units.
        uint8: allow the error of rounding images to 8 bits, 0.5/255 per value (for L2,
            ``0.5 * sqrt(size)``).
    """
    eps = check_budget(eps, "eps")
    field = "linf" if check_norm(norm) == "Linf" else "l2"
    if not rows:
        raise InputError("a sanity check needs at least one row")
    allowed = eps + tolerance
    if uint8:
        allowed += 0.5 if norm == "Linf" else 0.5 * math.sqrt(max(r["size"] for r in rows))
    worst = max(r[field] for r in rows)
    over = sum(r[field] > allowed for r in rows)
    return SanityFlag(
        "budget",
        over == 0,
        f"largest {norm} perturbation {worst:.4g}/255, allowed {allowed:.4g}/255; "
        f"{over} of {len(rows)} examples outside",
    )


def range_flag(rows: Sequence[Row]) -> SanityFlag:
    """Every adversarial image lies in [0, 1]."""
    if not rows:
        raise InputError("a sanity check needs at least one row")
    lo, hi = min(r["adv_min"] for r in rows), max(r["adv_max"] for r in rows)
    outside = sum(r["adv_min"] < 0 or r["adv_max"] > 1 for r in rows)
    return SanityFlag(
        "range",
        outside == 0,
        f"adversarial values in [{lo:.4g}, {hi:.4g}]; {outside} of {len(rows)} examples "
        "outside [0, 1]",
    )


def accuracy_flag(rows: Sequence[Row]) -> SanityFlag:
    """Accuracy on adversarial images is not above clean accuracy."""
    clean, adv = _mean(rows, "clean_correct"), _mean(rows, "adv_correct")
    return SanityFlag(
        "robust<=clean",
        adv <= clean,
        f"accuracy clean {clean:.4f}, adversarial {adv:.4f} (n={len(rows)})",
    )


def stronger_flag(
    weak_rows: Sequence[Row], strong_rows: Sequence[Row], tolerance: float = 0.0
) -> SanityFlag:
    """A stronger attack (more steps or restarts) leaves no more robust accuracy than a weaker
    one, up to ``tolerance`` (a fraction of examples)."""
    if len(weak_rows) != len(strong_rows):
        raise InputError(
            f"weak and strong rows must cover the same examples, got {len(weak_rows)} "
            f"and {len(strong_rows)}"
        )
    weak, strong = _mean(weak_rows, "robust_correct"), _mean(strong_rows, "robust_correct")
    return SanityFlag(
        "stronger<=weaker",
        strong <= weak + tolerance,
        f"robust accuracy weaker attack {weak:.4f}, stronger attack {strong:.4f}",
    )


def zero_gradient_flag(rows: Sequence[Row], max_fraction: float = 0.0) -> SanityFlag:
    """Fraction of the correctly classified examples whose input gradient of the attack's loss
    is exactly zero (rows' ``zero_gradient``). Passes when it is at most ``max_fraction``; more
    points to gradient masking (e.g. a model that rounds or takes an argmax of its input, or
    saturated softmax). Examples the model misclassifies clean (rows' ``clean_correct`` false)
    are left out: the attack has nothing to do there, and a loss may be flat there by design
    (the DLR loss is constant when the true class ranks third among the logits, which flagged
    11 of 200 blood-cell images of every fine-tuned model)."""
    if not rows:
        raise InputError("a sanity check needs at least one row")
    counted = [r for r in rows if r["clean_correct"]]
    zero = sum(bool(r["zero_gradient"]) for r in counted)
    fraction = zero / len(counted) if counted else 0.0
    return SanityFlag(
        "zero-gradients",
        fraction <= max_fraction,
        f"{zero} of {len(counted)} correctly classified examples ({fraction:.1%}) have an "
        "exactly zero input gradient" + ("; gradient masking?" if fraction > max_fraction else ""),
    )


def zero_gradients(
    attack: Attack, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(N,) bool: the input gradient of the attack's loss at each clean image is exactly zero
    (the rows' ``zero_gradient``; it does not depend on the attack's budget)."""
    param = next(attack.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    flags = []
    with attack_mode(attack.model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            _, _, grad = attack.loss_and_grad(x, y, None)
            flags.append((grad.flatten(1) == 0).all(dim=1))
    return torch.cat(flags)
