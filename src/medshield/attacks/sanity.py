"""Sanity checks of an attack evaluation, in the spirit of AutoAttack's and RobustBench's checks.

:func:`robust_accuracy` runs an attack batch by batch and returns one JSON-ready row per example
(clean and adversarial predictions, perturbation size, value range), so callers can write them
to ``samples.jsonl`` and bootstrap confidence intervals. The ``*_flag`` functions derive one
:class:`SanityFlag` each from such rows; :func:`sanity_checks` runs them all::

    flags = sanity_checks(classifier, PGD(classifier, eps=4), images, labels,
                          stronger=PGD(classifier, eps=4, steps=50, restarts=3))
    for flag in flags:
        print(flag)

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
from torch import nn

from medshield.attacks.base import Attack, attack_mode, check_budget, check_norm
from medshield.errors import InputError
from medshield.models.base import check_images, evaluating

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


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_inputs(images: Any, labels: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = check_images(images)
    if len(images) == 0:
        raise InputError("got zero images")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"labels must be a ({len(images)},) tensor, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return images, labels


def robust_accuracy(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
) -> list[Row]:
    """Attack every image (untargeted) and classify it clean and adversarial.

    Args:
        model: the classifier evaluated, [0, 1] NCHW images -> (N, K) logits (usually
            ``attack.model``; another model gives a transfer evaluation).
        attack: the attack.
        images: float (N, C, H, W) in [0, 1].
        labels: (N,) integer class indices.
        batch_size: images per attack call.

    Returns:
        One row per example: ``index``, ``label``, ``clean_pred``, ``adv_pred``,
        ``clean_correct``, ``adv_correct`` (the adversarial prediction is right),
        ``robust_correct`` (right both clean and adversarial, AutoAttack's convention for
        robust accuracy), ``linf`` and ``l2`` (perturbation size in /255 units), ``adv_min`` and
        ``adv_max`` (value range of the adversarial image) and ``size`` (values per image).
        Robust accuracy is the mean of ``robust_correct``; its bootstrap CI comes from
        :func:`medshield.eval.metrics.bootstrap_ci` over the rows.
    """
    images, labels = _check_inputs(images, labels, batch_size)
    device = _device(model)
    rows: list[Row] = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        adv = attack(x, y)
        with evaluating(model):
            clean_pred = model(x).argmax(dim=1)
            adv_pred = model(adv).argmax(dim=1)
        delta = (adv - x).flatten(1).double()
        linf = delta.abs().amax(dim=1) * 255
        l2 = delta.norm(dim=1) * 255
        flat = adv.flatten(1)
        for j in range(len(x)):
            clean_ok = bool(clean_pred[j] == y[j])
            adv_ok = bool(adv_pred[j] == y[j])
            rows.append(
                {
                    "index": start + j,
                    "label": int(y[j]),
                    "clean_pred": int(clean_pred[j]),
                    "adv_pred": int(adv_pred[j]),
                    "clean_correct": clean_ok,
                    "adv_correct": adv_ok,
                    "robust_correct": clean_ok and adv_ok,
                    "linf": float(linf[j]),
                    "l2": float(l2[j]),
                    "adv_min": float(flat[j].min()),
                    "adv_max": float(flat[j].max()),
                    "size": flat.shape[1],
                }
            )
    return rows


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
        rows: rows of :func:`robust_accuracy`.
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


def zero_gradient_flag(
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 128,
    max_fraction: float = 0.0,
) -> SanityFlag:
    """Fraction of examples whose input gradient of the attack's loss is exactly zero.

    Passes when it is at most ``max_fraction``; more points to gradient masking (e.g. a model
    that rounds or takes an argmax of its input, or saturated softmax).
    """
    images, labels = _check_inputs(images, labels, batch_size)
    device = _device(attack.model)
    zero = 0
    with attack_mode(attack.model):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            _, _, grad = attack.loss_and_grad(x, y, None)
            zero += int((grad.flatten(1) == 0).all(dim=1).sum())
    fraction = zero / len(images)
    return SanityFlag(
        "zero-gradients",
        fraction <= max_fraction,
        f"{zero} of {len(images)} examples ({fraction:.1%}) have an exactly zero input "
        "gradient" + ("; gradient masking?" if fraction > max_fraction else ""),
    )


def sanity_checks(
    model: nn.Module,
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    stronger: Attack | None = None,
    batch_size: int = 128,
    norm: str | None = None,
    tolerance: float = 1e-3,
    uint8: bool = False,
) -> list[SanityFlag]:
    """Run every check on ``attack`` against ``model`` over ``images``.

    Args:
        model: the classifier evaluated.
        attack: the attack checked.
        images, labels: the evaluation set, [0, 1] NCHW images and (N,) class indices.
        stronger: a stronger configuration of the attack (more steps or restarts); when given,
            the "stronger<=weaker" check runs.
        batch_size: images per attack call.
        norm: norm of the budget check; default: the attack's ``norm`` attribute, else "Linf".
        tolerance, uint8: see :func:`budget_flag`.

    Returns:
        Flags "budget", "range", "robust<=clean", "zero-gradients" and, with ``stronger``,
        "stronger<=weaker".
    """
    norm = norm or getattr(attack, "norm", "Linf")
    rows = robust_accuracy(model, attack, images, labels, batch_size)
    flags = [
        budget_flag(rows, attack.eps, norm, tolerance, uint8),
        range_flag(rows),
        accuracy_flag(rows),
        zero_gradient_flag(attack, images, labels, batch_size),
    ]
    if stronger is not None:
        strong_rows = robust_accuracy(model, stronger, images, labels, batch_size)
        flags.append(stronger_flag(rows, strong_rows))
    return flags
