"""The NaN rule (README "The NaN rule"): moves keep NaN bits, narrowing conversions quiet them."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from opbench.reference import nan_rule
from opbench.reference.copies import round_to

BF16 = np.dtype(ml_dtypes.bfloat16)


def _f16(*patterns):
    return np.array(patterns, np.uint16).view(np.float16)


def _bf16(*patterns):
    return np.array(patterns, np.uint16).view(BF16)


def _f32(*patterns):
    return np.array(patterns, np.uint32).view(np.float32)


def _hex(a):
    return [hex(int(v)) for v in nan_rule.bits(a)]


def test_nan_masks_read_the_bits():
    x = _f16(0x7C00, 0x7C01, 0xFE00, 0xFD01, 0x3C00, 0x8000)
    assert nan_rule.nan_mask(x).tolist() == [False, True, True, True, False, False]
    assert nan_rule.quiet_nan_mask(x).tolist() == [False, False, True, False, False, False]
    assert nan_rule.quiet_nan_mask(_bf16(0x7F81, 0xFFC1, 0x7F80)).tolist() == [False, True, False]


def test_quieted_sets_only_the_quiet_bit():
    assert _hex(nan_rule.quieted(_f16(0x7C01, 0xFD01, 0x7C00, 0x0001))) == [
        "0x7e01", "0xff01", "0x7c00", "0x1"]


@pytest.mark.parametrize("src, name, want", [
    (_bf16(0x7F81), "f16", ["0x7e00"]),  # the cpu backend's old cast through f32: 0x7c08
    (_f32(0x7F800001), "f16", ["0x7e01"]),  # payload below f16's bits: NumPy gives 0x7c01
    (_f32(0xFFA00000), "bf16", ["0xffc0"]),
    (_f16(0xFC05), "bf16", ["0xffc0"]),
])
def test_oracle_quiets_nans_on_narrowing(src, name, want):
    assert _hex(round_to(src, name)) == want


@pytest.mark.parametrize("src, name, want", [
    (_f16(0x7C05), "f16", ["0x7c05"]),  # a move keeps every bit
    (_bf16(0xFF81), "bf16", ["0xff81"]),
    (_f16(0x7C05), "f32", ["0x7f80a000"]),  # a widening is exact
    (_bf16(0xFF81), "f32", ["0xff810000"]),
])
def test_oracle_keeps_nan_bits_on_moves_and_widenings(src, name, want):
    assert _hex(round_to(src, name)) == want


def test_conversion_accepts_any_quiet_nan_or_the_oracles_bits():
    expected = _f16(0x7E08, 0x7E08, 0x3C00)
    assert not nan_rule.conversion_mismatch(expected, _f16(0xFE00, 0x7FFF, 0x3C00)).any()
    widened = _f32(0x7F810000)
    assert not nan_rule.conversion_mismatch(widened, _f32(0x7F810000)).any()


@pytest.mark.parametrize("actual", [0x7C08, 0x7C00, 0xFC00, 0x3C00])
def test_conversion_rejects_signalling_nan_inf_and_numbers_from_nan(actual):
    assert nan_rule.conversion_mismatch(_f16(0x7E08), _f16(actual)).all()


def test_conversion_rejects_nan_from_a_number():
    assert nan_rule.conversion_mismatch(_f16(0x3C00), _f16(0x7E00)).all()
