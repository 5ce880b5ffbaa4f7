"""Training loops (pretraining, fine-tuning) and what every training loop shares (the mini-llava
instruction tuning of :mod:`medshield.commands.train_vlm` included)."""

from __future__ import annotations

import torch

from medshield.errors import NonFiniteError


def check_finite_loss(loss: torch.Tensor, where: str, lr_key: str, lr: float) -> None:
    """Stop a training loop on a NaN or infinite loss, before it writes NaN weights.

    Args:
        loss: the step's loss.
        where: the loop and position, e.g. ``"pretrain epoch 2 step 17"``.
        lr_key, lr: the learning-rate setting of the loop and its value (the likely cause).

    Raises:
        NonFiniteError: the loss is not finite.
    """
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(
            f"{where}: the training loss became {loss.detach().float().mean().item()}; training "
            f"diverged, most likely because the learning rate is too high ({lr_key}={lr:g}); "
            f"rerun with a lower {lr_key} (and --overwrite)"
        )
