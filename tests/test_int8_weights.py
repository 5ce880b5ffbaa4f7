"""Row-wise int8 storage of trained weights (the shipped mini-llava's format)."""

import pytest
import torch

from medshield.errors import DataError
from medshield.models.int8_weights import SCALE_SUFFIX, dequantize_int8, quantize_int8


def test_round_trip_error_is_within_half_a_step_per_row() -> None:
    torch.manual_seed(0)
    state = {"w": torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None], "b": torch.randn(6)}
    stored = quantize_int8(state)
    assert stored["w"].dtype == torch.int8 and stored["w" + SCALE_SUFFIX].shape == (6,)
    assert torch.equal(stored["b"], state["b"])  # vectors stay float32
    restored = dequantize_int8(stored)
    assert set(restored) == {"w", "b"} and restored["w"].dtype == torch.float32
    step = state["w"].abs().amax(dim=1, keepdim=True) / 127
    error = (restored["w"] - state["w"]).abs()
    assert (error <= step / 2 + 1e-7).all()
    assert error.max() > 0  # it is lossy, not a float copy


def test_conv_weights_get_one_scale_per_output_channel() -> None:
    torch.manual_seed(0)
    conv = torch.randn(5, 3, 2, 2)
    stored = quantize_int8({"conv": conv})
    assert stored["conv"].shape == (5, 3, 2, 2) and stored["conv" + SCALE_SUFFIX].shape == (5,)
    step = conv.flatten(1).abs().amax(dim=1) / 127
    error = (dequantize_int8(stored)["conv"] - conv).abs().flatten(1)
    assert (error <= step[:, None] / 2 + 1e-7).all()


def test_zero_rows_and_float_files_pass() -> None:
    stored = quantize_int8({"w": torch.zeros(3, 4)})
    assert torch.equal(dequantize_int8(stored)["w"], torch.zeros(3, 4))
    plain = {"w": torch.ones(2, 2)}
    assert dequantize_int8(plain) == plain


@pytest.mark.parametrize(
    "stored",
    [
        {"w": torch.ones(3, 4, dtype=torch.int8)},  # no scale
        {"w": torch.ones(3, 4, dtype=torch.int8), "w" + SCALE_SUFFIX: torch.ones(4)},  # wrong shape
        {"w": torch.ones(3, 4), "w" + SCALE_SUFFIX: torch.ones(3)},  # scale on a float tensor
        {"v" + SCALE_SUFFIX: torch.ones(3)},  # a scale for nothing
    ],
)
def test_malformed_files_are_refused(stored) -> None:
    with pytest.raises(DataError):
        dequantize_int8(stored)


def test_reserved_suffix_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        quantize_int8({"x" + SCALE_SUFFIX: torch.ones(2, 2)})
