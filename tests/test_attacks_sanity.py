"""Sanity checks of attack evaluations: they pass on a sound attack and trigger on broken ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medshield.attacks import PGD, Attack
from medshield.attacks.apgd_dlr import dlr_loss
from medshield.attacks.sanity import (
    accuracy_flag,
    budget_flag,
    range_flag,
    stronger_flag,
    zero_gradient_flag,
)
from medshield.errors import InputError
from medshield.eval.metrics import bootstrap_ci
from medshield.eval.robust import attacked_rows, sanity_checks


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 1x8x8 images: bright or dark, with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.4 + 0.2 * labels.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    return images.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    images, labels = make_data(200, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        opt.step()
    test_images, test_labels = make_data(60, seed=1)
    return model.eval(), test_images, test_labels


class OverBudget(Attack):
    """Broken on purpose: steps twice the budget and out of [0, 1]."""

    def perturb(self, images, labels, target_labels):
        return images + 2 * self.eps / 255


class RoundedModel(nn.Module):
    """Gradient masking: the input is quantised with ``torch.round``, whose gradient is zero."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(images * 8) / 8)


def names(flags) -> dict[str, bool]:
    return {flag.name: flag.passed for flag in flags}


def test_a_sound_attack_passes_every_check(trained) -> None:
    model, images, labels = trained
    weak = PGD(model, eps=8, alpha=2, steps=2)
    strong = PGD(model, eps=8, alpha=2, steps=10, restarts=2)
    flags = sanity_checks(model, weak, images, labels, stronger=strong, batch_size=25)
    assert names(flags) == {
        "budget": True,
        "range": True,
        "robust<=clean": True,
        "zero-gradients": True,
        "stronger<=weaker": True,
    }, [str(f) for f in flags]
    assert all(f.detail for f in flags)


def test_flags_trigger_on_an_attack_outside_budget_and_range(trained) -> None:
    model, images, labels = trained
    flags = names(sanity_checks(model, OverBudget(model, eps=128), images, labels))
    assert flags["budget"] is False and flags["range"] is False


def test_flags_trigger_on_zero_gradients(trained) -> None:
    model, images, labels = trained
    masked = RoundedModel(model)
    flag = zero_gradient_flag(attacked_rows(masked, PGD(masked, eps=8, steps=1), images, labels))
    assert not flag.passed
    zero, counted = (int(n) for n in flag.detail.split(" correctly")[0].split(" of "))
    assert zero == counted > 0  # every correctly classified image, as rounding masks them all
    assert zero_gradient_flag(
        attacked_rows(model, PGD(model, eps=8, steps=1), images, labels)
    ).passed
    assert not names(sanity_checks(masked, PGD(masked, eps=8, steps=1), images, labels))[
        "zero-gradients"
    ]


def test_accuracy_and_strength_flags_from_rows() -> None:
    def rows(clean: list[bool], adv: list[bool]) -> list[dict]:
        return [
            {"clean_correct": c, "adv_correct": a, "robust_correct": c and a}
            for c, a in zip(clean, adv, strict=True)
        ]

    honest = rows([True, True, False, True], [False, True, False, False])
    helpful = rows([True, False, False, True], [True, True, True, True])  # "attack" that helps
    assert accuracy_flag(honest).passed and not accuracy_flag(helpful).passed
    weaker = rows([True] * 4, [True, True, False, False])
    assert stronger_flag(weaker, honest).passed
    assert not stronger_flag(honest, weaker).passed
    assert stronger_flag(honest, weaker, tolerance=0.25).passed
    with pytest.raises(InputError):
        stronger_flag(honest, weaker[:2])


def test_budget_flag_uint8_allowance() -> None:
    rows = [{"linf": 4.4, "l2": 10.0, "adv_min": 0.0, "adv_max": 1.0, "size": 64}]
    assert not budget_flag(rows, eps=4).passed
    assert budget_flag(rows, eps=4, uint8=True).passed  # 4 + 0.5 for 8-bit rounding
    assert not budget_flag(rows, eps=8, norm="L2").passed
    assert budget_flag(rows, eps=8, norm="L2", uint8=True).passed  # 8 + 0.5 * sqrt(64)
    assert range_flag(rows).passed
    assert not range_flag([{**rows[0], "adv_max": 1.01}]).passed


def test_attacked_rows(trained) -> None:
    model, images, labels = trained
    rows = attacked_rows(model, PGD(model, eps=16, alpha=4, steps=5), images, labels, 16)
    assert [r["index"] for r in rows] == list(range(len(images)))
    assert {r["restart"] for r in rows} == {0}
    assert all(r["robust_correct"] == (r["clean_correct"] and r["adv_correct"]) for r in rows)
    assert all(r["linf"] <= 16 + 1e-3 and 0 <= r["adv_min"] <= r["adv_max"] <= 1 for r in rows)
    clean = np.mean([r["clean_correct"] for r in rows])
    robust = np.array([r["robust_correct"] for r in rows], dtype=float)
    assert robust.mean() < clean
    lo, hi = bootstrap_ci(lambda c: c.mean(-1), robust, vectorized=True)
    assert lo <= robust.mean() <= hi
    with pytest.raises(InputError):
        attacked_rows(model, PGD(model), images, labels[:-1])
    with pytest.raises(InputError):
        attacked_rows(model, PGD(model), images, labels, batch_size=0)
    with pytest.raises(InputError):
        attacked_rows(model, PGD(model), images, labels, restarts=0)


def test_restarts_are_rows_of_their_own(trained) -> None:
    model, images, labels = trained
    rows = attacked_rows(model, PGD(model, eps=8, steps=2), images[:8], labels[:8], 3, restarts=2)
    # per batch of 3: restart 0, then restart 1, each one row per image of the batch
    assert [(r["index"], r["restart"]) for r in rows[:6]] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
        (2, 1),
    ]
    assert len(rows) == 16


def test_early_stop_restarts_only_the_images_not_yet_fooled(trained) -> None:
    """With ``early_stop`` a later restart attacks only the images earlier restarts did not
    fool; a fooled image's later row repeats the fooling row, and the worst case over restarts
    is never above the worst case without early stopping."""
    model, images, labels = trained
    calls: list[int] = []

    class Counting(PGD):
        def __call__(self, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return super().__call__(x, y, *rest)

    def counting(stop: bool) -> PGD:
        return Counting(model, eps=6, alpha=1.5, steps=3, early_stop=stop)

    def worst(rows: list[dict]) -> dict[int, bool]:
        out: dict[int, bool] = {}
        for r in rows:
            out[r["index"]] = out.get(r["index"], True) and r["robust_correct"]
        return out

    torch.manual_seed(0)
    on = attacked_rows(model, counting(True), images, labels, len(images), restarts=2)
    first, second = calls
    torch.manual_seed(0)
    off = attacked_rows(model, counting(False), images, labels, len(images), restarts=2)
    fooled = [r for r in on if r["restart"] == 0 and not r["robust_correct"]]
    assert fooled and first == len(images) and second == len(images) - len(fooled)
    again = {r["index"]: r for r in on if r["restart"] == 1}
    for r in fooled:
        assert {**again[r["index"]], "restart": 0} == r
    assert calls[2:] == [len(images), len(images)]
    assert all(not held or worst(off)[i] for i, held in worst(on).items())


def test_zero_gradient_flag_counts_only_correctly_classified_examples() -> None:
    misclassified = [{"clean_correct": False, "zero_gradient": True}] * 3
    rows = misclassified + [{"clean_correct": True, "zero_gradient": False}] * 5
    flag = zero_gradient_flag(rows)
    assert flag.passed and flag.detail.startswith("0 of 5 correctly classified")
    flag = zero_gradient_flag([*rows, {"clean_correct": True, "zero_gradient": True}])
    assert not flag.passed and flag.detail.startswith("1 of 6 correctly classified")


def test_dlr_loss_is_flat_where_the_true_class_ranks_third() -> None:
    """Why the flag leaves misclassified images out: on them DLR may have no gradient at all."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(dlr_loss(logits, torch.tensor([2, 0])).sum(), logits)
    assert torch.all(grad[0] == 0)  # true class third: the loss is the constant 1
    assert grad[1].abs().sum() > 0  # correctly classified: a gradient to follow
