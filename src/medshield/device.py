"""Where computation runs: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``. Resolved once per run, before any training, so a GPU asked for on a
machine without one is a clear error rather than a CUDA traceback mid-run."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator

from medshield.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ConfigError otherwise."""
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


DeviceName = Annotated[str, AfterValidator(check_device_name)]
"""A config field holding a device name (checked when the config is read)."""


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` stands for on this machine.

    Raises:
        ConfigError: a malformed name, or a CUDA device this machine does not have.
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)"
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall-clock timings measure it); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Precision = Literal["fp32", "bf16"]
"""A config field holding the arithmetic of training and attacks: ``fp32`` (the default, and
the reference for every figure) or ``bf16`` (:func:`torch.autocast` to bfloat16, for GPUs)."""


def check_precision(device: torch.device, precision: str) -> None:
    """ConfigError for ``bf16`` on a CUDA GPU without native bfloat16 (before Ampere), where
    autocast would emulate it slowly. The CPU is accepted: torch's CPU autocast supports
    bfloat16 everywhere (natively only with AVX512-BF16 or AMX, else emulated and slower than
    fp32), so ``bf16`` on the CPU runs, for checking the code path, not for speed."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"precision bf16 asked for, but the GPU {name} has no native bfloat16 "
                "(it needs compute capability 8.0 or later); use precision: fp32"
            )


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """The context training steps and attacks run in: nothing for ``fp32``, else
    :func:`torch.autocast` to bfloat16 on ``device`` (see :func:`check_precision`)."""
    check_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
