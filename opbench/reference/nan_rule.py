"""The NaN rule for data movement, one place for the oracle and the judge (README "The NaN rule").

- A plain move (same dtype in and out) keeps every bit: sign, payload, signalling or quiet.
- A conversion (the dtype changes) gives, for a NaN, a *quiet* NaN of any sign and payload --
  or, for a widening (f16/bf16 -> f32), the input's NaN exactly widened (the bits the oracle
  gives).  Never a signalling NaN that is not the exact widening, an infinity or a number from
  a NaN, and never a NaN from a number.

Why: IEEE 754 leaves the sign of a NaN result unspecified and implementations differ (CUDA's
``__float2half`` gives one canonical NaN, x86 F16C and ggml's bf16 keep sign and top payload
bits, ml_dtypes' bf16 keeps only the sign), so requiring one pattern would fail correct code.  A
narrowing that keeps a signalling NaN as it is can drop the payload bits that made it a NaN
(0x7f800001 -> f16 keeps none of them: an infinity, unless patched), so narrowings must quiet.
A widening is exact and bf16 -> f32 is a 16-bit shift in every implementation, so keeping the
bits is right there.

The oracle gives the exact bits for moves and widenings and, for the other conversions, the
NumPy/ml_dtypes cast with the quiet bit set (sign and top payload bits kept, as F16C does).
"""

from __future__ import annotations

import numpy as np

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
#: itemsize -> (exponent mask, quiet bit) of f16 / f32 / f64; bf16 is told apart by its dtype
_F16 = (0x7C00, 0x0200)
_BF16 = (0x7F80, 0x0040)
_F32 = (0x7F800000, 0x00400000)
_F64 = (0x7FF0000000000000, 0x0008000000000000)


def _layout(dtype: np.dtype) -> tuple[int, int]:
    dtype = np.dtype(dtype)
    if dtype.itemsize == 2:
        return _F16 if dtype == np.float16 else _BF16
    return {4: _F32, 8: _F64}[dtype.itemsize]


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float16/bfloat16/float32/float64 array (a view)."""
    return a.view(_UINT[a.dtype.itemsize])


def nan_mask(a: np.ndarray) -> np.ndarray:
    """NaN by bit pattern: exponent all ones and a non-zero mantissa (signalling or quiet)."""
    exponent, _ = _layout(a.dtype)
    raw = bits(a)
    magnitude = raw & raw.dtype.type((1 << (8 * a.dtype.itemsize - 1)) - 1)
    return magnitude > exponent


def quiet_nan_mask(a: np.ndarray) -> np.ndarray:
    """Quiet NaNs: NaN with the top mantissa bit set."""
    _, quiet = _layout(a.dtype)
    return nan_mask(a) & ((bits(a) & quiet) != 0)


def quieted(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` whose NaNs carry the quiet bit (sign and other payload bits kept)."""
    out = np.array(a, copy=True)
    _, quiet = _layout(out.dtype)
    raw = bits(out)
    mask = nan_mask(out)
    raw[mask] |= raw.dtype.type(quiet)
    return out


def keeps_nan_bits(source: np.dtype, target: np.dtype) -> bool:
    """A move or a widening: the oracle's NaN is the input's NaN, bits kept."""
    source, target = np.dtype(source), np.dtype(target)
    return source == target or target.itemsize > source.itemsize


def conversion_mismatch(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Elements breaking the rule for a conversion: where ``expected`` (the oracle) is NaN,
    ``actual`` must be those bits or a quiet NaN; elsewhere the bits must be equal."""
    different = bits(expected) != bits(actual)
    return np.where(nan_mask(expected), different & ~quiet_nan_mask(actual), different)
