"""Row-wise int8 storage for small trained weights (the shipped mini-llava's projector and LoRA).

Every tensor of two or more dimensions (linear and conv weights, embeddings) is stored as int8
plus one float32 scale per row, i.e. per output channel (``absmax(row) / 127``, symmetric, round
to nearest): about a quarter of the float32 size, with an error of at most half a step (1/254 of
the row's largest magnitude) per entry. Vectors (biases, norms) stay float32. The scale of tensor
``name`` is stored under ``name + SCALE_SUFFIX`` in the same safetensors file.

Written here rather than taken from a quantization library (bitsandbytes, optimum-quanto, torch.ao)
because those quantize *modules for int8 inference*; this only stores a few tensors compactly and
restores float32 weights on load, which is ten lines and adds no dependency.

Example::

    stored = quantize_int8(state)            # {name: int8 matrix, name+SCALE_SUFFIX: scales, ...}
    state = dequantize_int8(stored)          # float32 again, same names as ``state``
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from medshield.errors import DataError

SCALE_SUFFIX = ".int8_row_scale"
WeightFormat = Literal["float32", "int8"]
"""How :meth:`~medshield.models.mini_llava.MiniLlava.save` stores trained weights."""
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)


def quantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every float tensor of 2+ dims as int8 with a float32 scale per row (dim 0); vectors as
    float32."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} ends with the reserved {SCALE_SUFFIX!r}")
        tensor = tensor.detach().float()
        if tensor.dim() < 2:
            stored[name] = tensor
            continue
        rows = tensor.flatten(1)
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        stored[name] = torch.round(rows / scale[:, None]).to(torch.int8).view_as(tensor)
        stored[name + SCALE_SUFFIX] = scale
    return stored


def dequantize_int8(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`quantize_int8`; float tensors without a scale pass through unchanged.

    Raises:
        DataError: an int8 tensor without its scale, or a scale of the wrong shape or for no tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in stored:
                raise DataError(f"int8 scale {name!r} has no tensor")
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        if tensor.dtype != torch.int8 and scale is None:
            tensors[name] = tensor
        elif tensor.dtype != torch.int8 or scale is None or scale.shape != (tensor.shape[0],):
            raise DataError(
                f"{name!r} is not an int8 matrix with a per-row scale of shape ({len(tensor)},)"
            )
        else:
            rows = tensor.flatten(1).float() * scale[:, None].float()
            tensors[name] = rows.view_as(tensor)
    return tensors
