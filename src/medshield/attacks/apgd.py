"""APGD-CE: AutoAttack's step-size-free projected gradient ascent with cross-entropy."""

from __future__ import annotations

import math

import torch
from torch import nn

from medshield.attacks.base import (
    TINY,
    Attack,
    LossFn,
    check_count,
    check_norm,
    per_example_norm,
    project,
)
from medshield.registry import IMAGE_ATTACKS

MOMENTUM = 0.75  # alpha in the paper: weight of the new step against the previous one
RHO = 0.75  # condition 1: halve when fewer than this fraction of steps raised the loss


def checkpoints(steps: int) -> list[int]:
    """Iterations after which APGD checks whether to halve its step size.

    ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce and Hein, 2020, section 3.2).
    """
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w = {math.ceil(round(pj * steps, 9)) for pj in p}  # round: 0.41 + 0.16 is 0.5700...01
    return sorted(wj for wj in w if 0 < wj < steps)


@IMAGE_ATTACKS.register(
    "apgd-ce", "Auto-PGD with cross-entropy, L-inf or L2, from AutoAttack (Croce & Hein, 2020)"
)
class APGD(Attack):
    r"""APGD in the paper 'Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690] (Croce and Hein, ICML
    2020), the cross-entropy version (APGD-CE) of AutoAttack.

    Distance Measure : Linf or L2

    Projected gradient ascent with momentum ``0.75`` and an adaptive step size: it starts at
    ``2 * eps`` and is halved, for each example separately, at the checkpoints
    ``w_j = ceil(p_j * steps)`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06)``) when (1) the loss rose in fewer than 75% of the steps since the last checkpoint, or
    (2) the step size was not halved at the last checkpoint and the best loss has not improved
    since; after halving, the iterate restarts from the best point found so far. The first
    iterate is a random point of the eps-ball. It returns, per example, the last iterate that
    succeeded (misclassified, or classified as the target), else the highest-loss iterate; with
    ``restarts > 1`` the best of the runs.

    Arguments:
        model (nn.Module): model taking [0, 1] NCHW images (it normalises them itself).
        eps (float): maximum perturbation in /255 units, for either norm. (Default: 8)
        steps (int): number of iterations (one forward-backward each, plus one at the
            start). (Default: 100)
        norm (str): "Linf" or "L2". (Default: "Linf")
        restarts (int): independent random starts. (Default: 1)
        loss_fn (callable): ``loss_fn(model_output, labels) -> (N,)`` losses to maximise.
            (Default: cross-entropy on logits, which makes this APGD-CE)
        early_stop (bool): stop evaluating an example at its first successful iterate (which
            it returns), and restart only the examples no earlier run broke (see
            :class:`~medshield.attacks.base.Attack`). (Default: False)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - labels: :math:`(N)` class indices (targeted: also ``target_labels`` :math:`(N)`).
        - output: :math:`(N, C, H, W)`, same dtype and device, in [0, 1].

    Examples::
        >>> attack = medshield.attacks.APGD(model, eps=8, steps=100)
        >>> adv_images = attack(images, labels)
    """

    paper = (
        "Croce and Hein. Reliable evaluation of adversarial robustness with an ensemble of "
        "diverse parameter-free attacks. ICML 2020"
    )
    threat_model = "white-box, L-inf or L2, iterative, step-size free"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8.0,
        steps: int = 100,
        norm: str = "Linf",
        restarts: int = 1,
        loss_fn: LossFn | None = None,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps, loss_fn, early_stop)
        self.steps = check_count(steps, "steps")
        self.norm = check_norm(norm)
        self.restarts = check_count(restarts, "restarts")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:g}/255, steps={self.steps}, norm={self.norm}, "
            f"restarts={self.restarts}" + (", early_stop=True)" if self.early_stop else ")")
        )

    def perturb(
        self, images: torch.Tensor, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> torch.Tensor:
        return self.best_of_restarts(
            lambda active: self._run(images, labels, target_labels, active),
            self.restarts,
            labels,
            target_labels,
        )

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return grad.sign()
        return grad / (per_example_norm(grad) + TINY)

    def _start(self, images: torch.Tensor, eps: float) -> torch.Tensor:
        """AutoAttack's random start: a random direction scaled onto the sphere of the ball."""
        if self.norm == "Linf":
            t = 2 * torch.rand_like(images) - 1
            scale = t.flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
        else:
            t = torch.randn_like(images)
            scale = per_example_norm(t)
        return (images + eps * t / (scale + TINY)).clamp(0.0, 1.0)

    def _run(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor | None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One run from a random start drawn for every image. Only the ``active`` rows (None:
        all) are evaluated; with :attr:`early_stop` a row leaves at its first success. The
        per-example state of a row that left keeps moving without model evaluations (it is
        cheap and never used: the row returns its successful iterate)."""
        eps = self.eps / 255
        n = len(images)
        check_at = set(checkpoints(self.steps))
        if self.early_stop and active is None:
            active = torch.ones(n, dtype=torch.bool, device=images.device)

        adv = self._start(images, eps)
        value, succeeded, grad = self.loss_and_grad_rows(
            adv,
            labels,
            target_labels,
            active,
            torch.zeros(n, dtype=images.dtype, device=images.device),
            torch.zeros_like(adv),
        )
        best, best_value, best_grad = adv.clone(), value.clone(), grad.clone()
        ever_success = succeeded.clone() if succeeded is not None else None
        if active is not None and ever_success is not None:
            active = active & ~ever_success
        last_success = adv.clone()  # the last iterate that succeeded, where one did

        step = torch.full((n, 1, 1, 1), 2 * eps, dtype=images.dtype, device=images.device)
        previous = adv.clone()
        history = [value]  # objective after 0, 1, 2, ... iterations
        last_check, best_at_last_check = 0, best_value.clone()
        halved_at_last_check = torch.ones(n, dtype=torch.bool, device=images.device)

        for i in range(self.steps):
            momentum = MOMENTUM if i > 0 else 1.0
            z = project(adv + step * self._direction(grad), images, eps, self.norm)
            moved = adv + momentum * (z - adv) + (1 - momentum) * (adv - previous)
            previous, adv = adv, project(moved, images, eps, self.norm)

            value, succeeded, grad = self.loss_and_grad_rows(
                adv, labels, target_labels, active, value, grad
            )
            history.append(value)
            if succeeded is not None:
                last_success[succeeded] = adv[succeeded]
                ever_success |= succeeded
                if active is not None:
                    active = active & ~ever_success
            improved = value > best_value
            best[improved], best_value[improved] = adv[improved], value[improved]
            best_grad[improved] = grad[improved]

            done = i + 1
            if done in check_at:
                window = done - last_check
                rises = torch.stack(history[last_check:]).diff(dim=0).gt(0).sum(dim=0)
                # condition 1 as in the reference implementation (<=), condition 2 as in the paper
                oscillating = rises <= RHO * window
                stalled = ~halved_at_last_check & (best_value <= best_at_last_check)
                halve = oscillating | stalled
                step[halve] /= 2
                adv[halve], grad[halve] = best[halve], best_grad[halve]
                halved_at_last_check = halve
                last_check, best_at_last_check = done, best_value.clone()

        if ever_success is None:
            return best
        return torch.where(ever_success.view(-1, 1, 1, 1), last_success, best)
