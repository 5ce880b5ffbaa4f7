"""APGD-DLR: APGD with the difference-of-logits-ratio loss, AutoAttack's second attack."""

from __future__ import annotations

import torch
from torch import nn

from medshield.attacks.apgd import APGD
from medshield.attacks.base import TINY, check_class_logits
from medshield.errors import InputError
from medshield.registry import IMAGE_ATTACKS


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Per-example DLR loss of (N, K) logits against (N,) labels, to maximise.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi1 >= z_pi2 >= z_pi3`` the sorted
    logits (Croce and Hein, 2020, eq. 6): minus the margin of the true class, divided by the
    spread of the top three logits, so it is invariant to shifting and rescaling the logits.

    With K = 2 the third logit does not exist, and no normaliser can be both shift and scale
    invariant (the only shift-invariant one, ``z_pi1 - z_pi2``, is the margin itself and would
    leave a constant +-1 with zero gradient), so two classes fall back to the plain margin loss
    ``-(z_y - z_other)`` (Carlini and Wagner, 2017). Under L-inf its gradient sign is that of
    the cross-entropy, so on binary tasks APGD-DLR is APGD-CE with another random start and no
    saturation of the loss for confidently classified images.
    """
    check_class_logits(logits, labels, "DLR")
    if logits.shape[1] < 2:
        raise InputError(
            f"the DLR loss needs at least 2 classes, got logits of shape {tuple(logits.shape)}"
        )
    labels = labels.long()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    margin = true - others.amax(dim=1)
    if logits.shape[1] == 2:
        return -margin
    top = logits.topk(3, dim=1).values
    return -margin / (top[:, 0] - top[:, 2] + TINY)


@IMAGE_ATTACKS.register(
    "apgd-dlr", "Auto-PGD with the DLR loss, L-inf or L2, from AutoAttack (Croce & Hein, 2020)"
)
class APGDDLR(APGD):
    r"""APGD-DLR in the paper 'Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690] (Croce and Hein, ICML
    2020), the difference-of-logits-ratio version of AutoAttack's APGD.

    Distance Measure : Linf or L2

    :class:`~medshield.attacks.APGD` (same momentum, step-size schedule, random start and
    restarts) maximising :func:`dlr_loss` instead of the cross-entropy:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``. The loss is invariant to the scale of the
    logits, so a model that only rescales its logits (e.g. a large CLIP logit scale) cannot
    mask the cross-entropy's gradient against it. On a two-class task the normaliser does not
    exist and the loss is the plain margin ``-(z_y - z_other)`` (see :func:`dlr_loss`).
    Targeted (``target_labels`` given), it minimises the DLR loss of the targets, i.e. raises
    each target's margin (not the reference's separate targeted DLR loss).

    Arguments:
        model (nn.Module): model taking [0, 1] NCHW images and returning (N, K) logits, K >= 2
            (it normalises the images itself).
        eps (float): maximum perturbation in /255 units, for either norm. (Default: 8)
        steps (int): number of iterations (one forward-backward each, plus one at the
            start). (Default: 100)
        norm (str): "Linf" or "L2". (Default: "Linf")
        restarts (int): independent random starts. (Default: 1)
        early_stop (bool): see :class:`~medshield.attacks.APGD`. (Default: False)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - labels: :math:`(N)` class indices (targeted: also ``target_labels`` :math:`(N)`).
        - output: :math:`(N, C, H, W)`, same dtype and device, in [0, 1].

    Examples::
        >>> attack = medshield.attacks.APGDDLR(model, eps=8, steps=100)
        >>> adv_images = attack(images, labels)
    """

    threat_model = "white-box, L-inf or L2, iterative, step-size free, logit-scale invariant"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8.0,
        steps: int = 100,
        norm: str = "Linf",
        restarts: int = 1,
        early_stop: bool = False,
    ) -> None:
        super().__init__(model, eps, steps, norm, restarts, early_stop=early_stop)
        # set after the base class so the attack keeps the default loss's class-index labels
        # and success tracking (misclassified = broken), which a custom loss_fn switches off
        self.loss_fn = dlr_loss
