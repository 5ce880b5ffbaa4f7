"""Where computation runs: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``. Resolved once per run, before any training, so a GPU asked for on a
machine without one is a clear error rather than a CUDA traceback mid-run."""

from __future__ import annotations

import re
from typing import Annotated

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
