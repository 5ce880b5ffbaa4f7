"""The :class:`Attack` base class shared by every image attack.

Conventions (see docs/design.md): images are float tensors in [0, 1], shape (N, C, H, W); the model
owns normalisation, so attacks never normalise. Budgets ``eps`` and step sizes ``alpha`` are given
in /255 units (``eps=4`` means 4/255), for the L-inf and the L2 norm alike.

An attack runs the model in eval mode with every parameter's ``requires_grad`` switched off, and
gives back each submodule's own train/eval mode and each parameter's ``requires_grad`` flag when
it is done; input gradients come from :func:`torch.autograd.grad`, so parameter ``.grad`` fields
are never touched.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medshield.errors import InputError
from medshield.models.base import DualEncoder, check_images, eval_mode

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(model_output, labels) -> (N,)`` per-example losses."""

NORMS = ("Linf", "L2")
TINY = 1e-12  # guards divisions by a zero gradient / perturbation norm


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_class_logits(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> None:
    """Validate (N, K) logits and (N,) integer labels in 0..K-1 for the classification ``loss``
    (its name, for the error message)."""
    if logits.ndim != 2:
        raise InputError(
            f"the {loss} loss needs (N, K) logits, got model output of shape "
            f"{tuple(logits.shape)}; pass loss_fn=... to attack a model with other outputs"
        )
    if labels.ndim != 1 or not _is_integer(labels):
        raise InputError(
            f"the {loss} loss needs 1-D integer labels, got {labels.dtype} "
            f"of shape {tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(
            f"labels must lie in 0..{num_classes - 1} (the model has {num_classes} classes), "
            f"got [{labels.min().item()}, {labels.max().item()}]"
        )


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Default attack loss: per-example cross-entropy of (N, K) logits against (N,) labels."""
    check_class_logits(logits, labels, "default cross-entropy")
    return F.cross_entropy(logits, labels.long(), reduction="none")


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters and gradients enabled inside the block.

    Afterwards every submodule gets back its own train/eval mode and every parameter its own
    ``requires_grad`` flag (a plain ``model.train(was_training)`` would flip submodules that
    were deliberately in another mode, e.g. a frozen tower in eval mode inside a training model).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with eval_mode(model), torch.enable_grad():
            yield model
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def take(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """``t[rows]``, or None for None (optional target labels)."""
    return None if t is None else t[rows]


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped (N, 1, 1, 1) to broadcast over images."""
    return x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def project(adv: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``adv`` onto the ``norm`` ball of radius ``eps`` (in [0, 1] units) around
    ``images``, then onto the valid range [0, 1] (which only shrinks the perturbation)."""
    delta = adv - images
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = per_example_norm(delta)
        delta = delta * torch.clamp(eps / (norms + TINY), max=1.0)
    return (images + delta).clamp(0.0, 1.0)


def random_start(images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniformly random point of the ``norm`` ball of radius ``eps`` around ``images``,
    clipped to [0, 1] (L-inf: uniform per coordinate; L2: random direction, uniform radius)."""
    if norm == "Linf":
        delta = torch.empty_like(images).uniform_(-eps, eps)
    else:
        delta = torch.randn_like(images)
        radius = torch.rand(len(images), 1, 1, 1, dtype=images.dtype, device=images.device)
        delta = delta / (per_example_norm(delta) + TINY) * radius * eps
    return (images + delta).clamp(0.0, 1.0)


def check_norm(norm: str) -> str:
    """Validate a norm name ("Linf" or "L2")."""
    if norm not in NORMS:
        raise InputError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def check_budget(value: float, name: str) -> float:
    """Validate a budget or step size in /255 units: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number (in /255 units), got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0 (in /255 units), got {value}")
    return float(value)


def check_count(value: int, name: str) -> int:
    """Validate an iteration or restart count: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class Attack(ABC):
    """Base class of image attacks, in the spirit of torchattacks' ``Attack``.

    Args:
        model: any ``nn.Module`` taking [0, 1] NCHW images, e.g. a classifier returning logits
            or a :class:`~medshield.models.ZeroShotClassifier`; with a custom ``loss_fn`` it may
            return anything. A :class:`~medshield.models.DualEncoder` is run through its
            ``encode_image`` (model output: L2-normalised image embeddings) and needs a
            ``loss_fn`` over embeddings, e.g. minus the cosine similarity to caption embeddings
            given as labels.
        eps: perturbation budget in /255 units (``4`` means 4/255). Default: 8.
        loss_fn: ``loss_fn(model_output, labels) -> (N,)`` per-example losses that the attack
            *maximises* (targeted attacks minimise it towards the target labels). Default:
            cross-entropy on logits, with integer labels. A custom loss may take any labels
            tensor with one row per image, e.g. (N, D) caption embeddings.
        early_stop: stop attacking an example once it succeeds (misclassified, or classified
            as the target), keeping that successful iterate, and run later restarts only on
            the examples no earlier restart broke. Iterative attacks that support it (PGD,
            APGD) then take fewer gradient steps; the random numbers drawn are the same, so
            every example that never succeeds follows the same iterates as without it (up to
            the last bits of the model's arithmetic on a smaller batch), and robust accuracy
            can only fall or stay. No effect with a custom ``loss_fn`` (no success test).

    Call: ``attack(images, labels, target_labels=None) -> adversarial images``.

    - images: float (N, C, H, W) in [0, 1].
    - labels: (N,) true labels (or, with a custom ``loss_fn``, any tensor with N rows).
    - target_labels: optional, same form as ``labels``; given, the attack is *targeted* and
      pulls each image towards its target.
    - returns: a tensor of the same shape, dtype and device, in [0, 1], within ``eps`` of
      ``images`` in the attack's norm.

    Subclasses implement :meth:`perturb` and use :meth:`loss_and_grad` and :meth:`evaluate`
    for the model evaluations; :meth:`objective` (what is maximised) and :meth:`success` (when
    an example counts as broken) are the hooks to override beyond ``loss_fn``. Class attributes
    ``name`` (set by ``IMAGE_ATTACKS.register``), ``paper`` and ``threat_model`` describe the
    attack for reports.
    """

    name: str = ""
    paper: str = ""
    threat_model: str = ""

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8.0,
        loss_fn: LossFn | None = None,
        early_stop: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, DualEncoder) and loss_fn is None:
            raise InputError(
                "attacking a DualEncoder needs a loss_fn over its image embeddings, e.g. "
                "lambda emb, text_emb: -(emb * text_emb).sum(-1); to attack it as a classifier, "
                "wrap it in ZeroShotClassifier"
            )
        self.model = model
        self.forward = model.encode_image if isinstance(model, DualEncoder) else model
        self.eps = check_budget(eps, "eps")
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else cross_entropy_loss
        self._default_loss = loss_fn is None
        self.early_stop = bool(early_stop)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g}/255)"

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        images = check_images(images).detach()
        labels = self._check_labels(labels, images, "labels")
        if target_labels is not None:
            target_labels = self._check_labels(target_labels, images, "target_labels")
        if len(images) == 0:
            return images.clone()
        with attack_mode(self.model):
            adv = self.perturb(images, labels, target_labels)
        return adv.detach().to(images.dtype)

    @abstractmethod
    def perturb(
        self, images: torch.Tensor, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The attack proper, on validated inputs, with the model already in attack mode."""

    # --- model evaluations ---------------------------------------------------------------------
    def objective(
        self, output: Any, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """(N,) per-example objective to maximise: the loss, or minus the loss to the target."""
        if target_labels is None:
            value = self.loss_fn(output, labels)
        else:
            value = -self.loss_fn(output, target_labels)
        if not isinstance(value, torch.Tensor) or value.shape != labels.shape[:1]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"loss_fn must return one loss per example, shape ({len(labels)},), got {shape}; "
                "use reduction='none'"
            )
        return value

    def success(
        self, output: Any, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> torch.Tensor | None:
        """(N,) bool: the attack succeeded (prediction != label, or == target); None when the
        model output has no class prediction (a custom ``loss_fn``)."""
        if not self._default_loss:
            return None
        pred = output.argmax(dim=1)
        return pred != labels if target_labels is None else pred == target_labels

    def evaluate(
        self, adv: torch.Tensor, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Objective and success at ``adv`` without gradients."""
        with torch.no_grad():
            output = self.forward(adv)
            return self.objective(output, labels, target_labels), self.success(
                output, labels, target_labels
            )

    def loss_and_grad(
        self, adv: torch.Tensor, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Objective, success and the input gradient of the summed objective at ``adv``."""
        adv = adv.detach().requires_grad_(True)
        output = self.forward(adv)
        value = self.objective(output, labels, target_labels)
        (grad,) = torch.autograd.grad(value.sum(), adv)
        with torch.no_grad():
            succeeded = self.success(output, labels, target_labels)
        return value.detach(), succeeded, grad.detach()

    # --- helpers ---------------------------------------------------------------------------------
    def best_of_restarts(
        self,
        run: Callable[[torch.Tensor | None], torch.Tensor],
        restarts: int,
        labels: torch.Tensor,
        target_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """Call ``run(active)`` ``restarts`` times and keep, per example, the best result
        (see :meth:`keep_best`). ``active`` is None (attack every example) or, with
        :attr:`early_stop`, a bool mask of the examples no earlier run broke: ``run`` draws its
        random start for every example but attacks only those, and only those are compared."""
        best = run(None)
        if restarts == 1:
            return best
        best_value, best_success = self.evaluate(best, labels, target_labels)
        for _ in range(restarts - 1):
            if not (self.early_stop and best_success is not None):
                adv = run(None)
                value, succeeded = self.evaluate(adv, labels, target_labels)
                self.keep_best(best, best_value, best_success, adv, value, succeeded)
                continue
            active = ~best_success
            adv = run(active)  # also when no example is left: the same random numbers drawn
            rows = active.nonzero()[:, 0]
            if not len(rows):
                continue
            sub = best[rows], best_value[rows], best_success[rows]
            value, succeeded = self.evaluate(adv[rows], labels[rows], take(target_labels, rows))
            self.keep_best(*sub, adv[rows], value, succeeded)
            best[rows], best_value[rows], best_success[rows] = sub
        return best

    def loss_and_grad_rows(
        self,
        adv: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor | None,
        active: torch.Tensor | None,
        value: torch.Tensor,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`loss_and_grad` on the ``active`` rows only (None: all rows); the other rows
        keep ``value`` and ``grad`` and count as not succeeded."""
        if active is None:
            return self.loss_and_grad(adv, labels, target_labels)
        rows = active.nonzero()[:, 0]
        value, grad = value.clone(), grad.clone()
        succeeded = torch.zeros_like(active) if self._default_loss else None
        if len(rows):
            v, s, g = self.loss_and_grad(adv[rows], labels[rows], take(target_labels, rows))
            value[rows], grad[rows] = v, g
            if succeeded is not None and s is not None:
                succeeded[rows] = s
        return value, succeeded, grad

    @staticmethod
    def keep_best(
        best: torch.Tensor,
        best_value: torch.Tensor,
        best_success: torch.Tensor | None,
        adv: torch.Tensor,
        value: torch.Tensor,
        succeeded: torch.Tensor | None,
    ) -> None:
        """Update ``best`` in place, per example, where ``adv`` is better: successful where the
        best is not, else a higher objective at the same success status."""
        better = value > best_value
        if best_success is not None and succeeded is not None:
            better = (succeeded & ~best_success) | ((succeeded == best_success) & better)
            best_success |= succeeded
        best[better] = adv[better]
        best_value[better] = value[better]

    def _check_labels(self, labels: Any, images: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
        if labels.ndim == 0 or len(labels) != len(images):
            shape = tuple(labels.shape)
            raise InputError(
                f"{name} must have one entry per image ({len(images)}), got shape {shape}"
            )
        if self._default_loss and (labels.ndim != 1 or not _is_integer(labels)):
            raise InputError(
                f"{name} must be a 1-D integer tensor of class indices for the default "
                f"cross-entropy loss, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        return labels.to(images.device)
