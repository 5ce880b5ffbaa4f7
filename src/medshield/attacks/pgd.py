"""PGD: projected gradient descent (ascent on the loss), L-inf and L2, with restarts."""

from __future__ import annotations

import torch
from torch import nn

from medshield.attacks.base import (
    TINY,
    Attack,
    LossFn,
    check_budget,
    check_count,
    check_norm,
    per_example_norm,
    project,
    random_start,
)
from medshield.errors import InputError
from medshield.registry import IMAGE_ATTACKS


def pgd_step_size(eps: float, steps: int) -> float:
    """The step size medshield's PGD uses wherever none is given, in /255 units:
    ``max(eps / 4, 2.5 * eps / steps)``. Madry et al.'s ``2.5 * eps / steps`` lets a run cross
    the ball from a random start in few steps; the floor of ``eps / 4`` keeps long runs (50
    steps) moving instead of creeping at ``eps / 20``."""
    return max(eps / 4, 2.5 * eps / check_count(steps, "steps"))


@IMAGE_ATTACKS.register(
    "pgd", "Projected gradient descent, L-inf or L2, with restarts (Madry et al., 2018)"
)
class PGD(Attack):
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083] (Madry, Makelov, Schmidt, Tsipras and Vladu, ICLR 2018).

    Distance Measure : Linf or L2

    ``steps`` iterations of ``x <- Proj_{B(x0, eps) and [0,1]}(x + alpha * d)``, with
    ``d = sign(grad)`` for L-inf and ``d = grad / ||grad||_2`` for L2, from a uniformly random
    point of the ball (``random_start``) or from the clean image. Each run returns its last
    iterate; with ``restarts > 1`` the attack keeps, per example, the best run: a successful one
    (misclassified, or classified as the target) over an unsuccessful one, else the one with the
    higher loss. With ``restarts=1`` and ``random_start=False`` it computes exactly what
    ``torchattacks.PGD`` computes.

    Arguments:
        model (nn.Module): model taking [0, 1] NCHW images (it normalises them itself).
        eps (float): maximum perturbation in /255 units, for either norm. (Default: 8)
        alpha (float): step size in /255 units. (Default: 2)
        steps (int): number of steps. (Default: 10)
        norm (str): "Linf" or "L2". (Default: "Linf")
        random_start (bool): start from a random point of the eps-ball. (Default: True)
        restarts (int): independent random starts; needs ``random_start``. (Default: 1)
        loss_fn (callable): ``loss_fn(model_output, labels) -> (N,)`` losses to maximise.
            (Default: cross-entropy on logits)
        early_stop (bool): stop stepping an example at its first successful iterate, and
            restart only the examples no earlier run broke (see
            :class:`~medshield.attacks.base.Attack`). (Default: False)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - labels: :math:`(N)` class indices (targeted: also ``target_labels`` :math:`(N)`).
        - output: :math:`(N, C, H, W)`, same dtype and device, in [0, 1].

    Examples::
        >>> attack = medshield.attacks.PGD(model, eps=8, alpha=2, steps=10, restarts=3)
        >>> adv_images = attack(images, labels)
        >>> adv_images = attack(images, labels, target_labels)  # targeted
    """

    paper = (
        "Madry, Makelov, Schmidt, Tsipras and Vladu. Towards Deep Learning Models Resistant to "
        "Adversarial Attacks. ICLR 2018"
    )
    threat_model = "white-box, L-inf or L2, iterative"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8.0,
        alpha: float = 2.0,
        steps: int = 10,
        norm: str = "Linf",
        random_start: bool = True,
        restarts: int = 1,
        loss_fn: LossFn | None = None,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps, loss_fn, early_stop)
        self.alpha = check_budget(alpha, "alpha")
        self.steps = check_count(steps, "steps")
        self.norm = check_norm(norm)
        self.random_start = bool(random_start)
        self.restarts = check_count(restarts, "restarts")
        if self.restarts > 1 and not self.random_start:
            raise InputError("restarts > 1 needs random_start=True (the runs would be identical)")

    def __repr__(self) -> str:
        return (
            f"PGD(eps={self.eps:g}/255, alpha={self.alpha:g}/255, steps={self.steps}, "
            f"norm={self.norm}, random_start={self.random_start}, restarts={self.restarts}"
            + (", early_stop=True)" if self.early_stop else ")")
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

    def _run(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor | None,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One run from a random start drawn for every image; only the ``active`` rows (None:
        all) are attacked, and with :attr:`early_stop` a row leaves at its first success."""
        eps, alpha = self.eps / 255, self.alpha / 255
        adv = random_start(images, eps, self.norm) if self.random_start else images.clone()
        if self.early_stop and active is None:
            active = torch.ones(len(images), dtype=torch.bool, device=images.device)
        zero, zero_grad = torch.zeros(len(images), dtype=images.dtype, device=images.device), None
        if active is not None:
            zero_grad = torch.zeros_like(adv)
        for _ in range(self.steps):
            if active is not None and not active.any():
                break
            _, succeeded, grad = self.loss_and_grad_rows(
                adv, labels, target_labels, active, zero, zero_grad
            )
            if self.early_stop and succeeded is not None:
                active = active & ~succeeded
            if self.norm == "Linf":
                step = grad.sign()
            else:
                step = grad / (per_example_norm(grad) + TINY)
            moved = project(adv + alpha * step, images, eps, self.norm)
            adv = moved if active is None else torch.where(active.view(-1, 1, 1, 1), moved, adv)
        return adv
