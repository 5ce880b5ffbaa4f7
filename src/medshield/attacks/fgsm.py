"""FGSM: the fast gradient sign method."""

from __future__ import annotations

import torch
from torch import nn

from medshield.attacks.base import Attack, LossFn
from medshield.registry import IMAGE_ATTACKS


@IMAGE_ATTACKS.register(
    "fgsm", "Fast gradient sign method, one L-inf step (Goodfellow et al., 2015)"
)
class FGSM(Attack):
    r"""FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572] (Goodfellow, Shlens and Szegedy, ICLR 2015).

    Distance Measure : Linf

    One step of size ``eps`` along the sign of the input gradient of the loss:
    ``x_adv = clip_[0,1](x + eps * sign(grad_x loss))`` (minus the gradient of the loss to the
    target when targeted).

    Arguments:
        model (nn.Module): model taking [0, 1] NCHW images (it normalises them itself).
        eps (float): maximum perturbation in /255 units. (Default: 8)
        loss_fn (callable): ``loss_fn(model_output, labels) -> (N,)`` losses to maximise.
            (Default: cross-entropy on logits)

    Shape:
        - images: :math:`(N, C, H, W)` float in [0, 1], C = 1 or 3.
        - labels: :math:`(N)` class indices (targeted: also ``target_labels`` :math:`(N)`).
        - output: :math:`(N, C, H, W)`, same dtype and device, in [0, 1].

    Examples::
        >>> attack = medshield.attacks.FGSM(model, eps=4)
        >>> adv_images = attack(images, labels)
    """

    paper = (
        "Goodfellow, Shlens and Szegedy. Explaining and Harnessing Adversarial Examples. ICLR 2015"
    )
    threat_model = "white-box, L-inf, single step"

    def __init__(self, model: nn.Module, eps: float = 8.0, loss_fn: LossFn | None = None) -> None:
        super().__init__(model, eps, loss_fn)

    def perturb(
        self, images: torch.Tensor, labels: torch.Tensor, target_labels: torch.Tensor | None
    ) -> torch.Tensor:
        _, _, grad = self.loss_and_grad(images, labels, target_labels)
        return (images + self.eps / 255 * grad.sign()).clamp(0.0, 1.0)
