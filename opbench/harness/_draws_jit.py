"""The compiled loops of ``draws`` (their own module: numba is imported on first use).

The constants are written here, not imported: numba's on-disk cache is keyed by this file
alone, so a constant taken from another module would stay frozen in the cached loops after
that module changed.  The tests hold these loops to ``draws``' NumPy model, bit for bit."""

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's counter step
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_UNIT = 1.0 / 9007199254740992.0  # 2**-53
_S11, _S27, _S30, _S31, _S32 = (np.uint64(s) for s in (11, 27, 30, 31, 32))


@numba.njit(inline="always")
def splitmix64(key, i):
    """SplitMix64's output number i (from 0) for the state ``key``."""
    z = key + np.uint64(i + 1) * _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@numba.njit(inline="always")
def uniform_value(key, lo, scale, i):
    """Value i of a uniform draw: lo + scale * (output i >> 11) / 2**53."""
    return lo + scale * (np.float64(splitmix64(key, i) >> _S11) * _UNIT)


@numba.njit(inline="always")
def integer_value(key, low, span, i):
    """Value i of an integer draw: low + ((output i >> 32) * span) >> 32."""
    return low + np.int64(((splitmix64(key, i) >> _S32) * np.uint64(span)) >> _S32)


@numba.njit(nogil=True, cache=True)
def fill_uniform(out, key, lo, scale):
    """out[i] = lo + scale * (output i >> 11) / 2**53."""
    for i in range(out.size):
        out[i] = uniform_value(key, lo, scale, i)


@numba.njit(nogil=True, cache=True)
def fill_integers(out, key, low, span):
    """out[i] = low + ((output i >> 32) * span) >> 32."""
    for i in range(out.size):
        out[i] = integer_value(key, low, span, i)


_ONE, _EXP_MASK, _MANT_MASK = np.uint64(1), np.uint64(0x7FF), np.uint64((1 << 52) - 1)
_S52, _S63 = np.uint64(52), np.uint64(63)


@numba.njit(inline="always")
def half_bits(x, mant_bits, exp_bits, nan_payload):
    """The bits of float64 ``x`` rounded to nearest-even in a 16-bit float of ``exp_bits``
    exponent and ``mant_bits`` mantissa bits (f16: 5, 10; bf16: 8, 7), rounded once from the
    double, as NumPy's float16 and ml_dtypes' bfloat16 casts do.  A NaN keeps the top of its
    payload (NumPy's float16) or becomes the quiet NaN (ml_dtypes' bfloat16)."""
    b = np.float64(x).view(np.uint64)
    sign = (b >> _S63) << np.uint64(exp_bits + mant_bits)
    e = np.int64((b >> _S52) & _EXP_MASK)
    m = b & _MANT_MASK
    inf = np.uint64((1 << exp_bits) - 1) << np.uint64(mant_bits)
    shift = 52 - mant_bits
    if e == 0x7FF:
        if m == 0:
            return sign | inf
        if nan_payload:
            top = m >> np.uint64(shift)
            return sign | inf | (top if top != 0 else _ONE)
        return sign | inf | (_ONE << np.uint64(mant_bits - 1))
    biased = e - 1023 + (1 << (exp_bits - 1)) - 1
    if biased >= (1 << exp_bits) - 1:
        return sign | inf
    if biased >= 1:
        mantissa, s, base = m, shift, np.uint64(biased) << np.uint64(mant_bits)
    else:  # a subnormal of the 16-bit type (or zero)
        mantissa, s, base = m | (_ONE << _S52), shift + 1 - biased, np.uint64(0)
        if s > 63:
            return sign
    q = mantissa >> np.uint64(s)
    rem = mantissa & ((_ONE << np.uint64(s)) - _ONE)
    half = _ONE << np.uint64(s - 1)
    if rem > half or (rem == half and (q & _ONE) == _ONE):
        q += _ONE
    return sign | (base + q)  # a carry out of the mantissa steps the exponent, up to inf


# one loop per 16-bit type, its layout written as literals: the rounding's shifts and masks
# fold to constants (with the layout as arguments the loop ran 1.4-1.5x slower)
@numba.njit(nogil=True, cache=True)
def round_to_f16(values, out):
    """out[i] = the float16 bits of values[i] (``half_bits``)."""
    for i in range(values.size):
        out[i] = np.uint16(half_bits(values[i], 10, 5, True))


@numba.njit(nogil=True, cache=True)
def round_to_bf16(values, out):
    """out[i] = the bfloat16 bits of values[i] (``half_bits``)."""
    for i in range(values.size):
        out[i] = np.uint16(half_bits(values[i], 7, 8, False))


@numba.njit(nogil=True, cache=True)
def fill_uniform_f16(out, key, lo, scale):
    """``fill_uniform``'s values rounded to float16, without the float64 array between."""
    for i in range(out.size):
        value = uniform_value(key, lo, scale, i)
        out[i] = np.uint16(half_bits(value, 10, 5, True))


@numba.njit(nogil=True, cache=True)
def fill_uniform_bf16(out, key, lo, scale):
    """``fill_uniform``'s values rounded to bfloat16, without the float64 array between."""
    for i in range(out.size):
        value = uniform_value(key, lo, scale, i)
        out[i] = np.uint16(half_bits(value, 7, 8, False))


@numba.njit(nogil=True, cache=True)
def fill_uniform_f32(out, key, lo, scale):
    """``fill_uniform``'s values rounded to float32 (nearest-even, as NumPy's cast)."""
    for i in range(out.size):
        out[i] = np.float32(uniform_value(key, lo, scale, i))


@numba.njit(inline="always")
def wide_value(key_values, lo, scale, key_exponents, low, span, i):
    """``fill_uniform``'s value i times 2**e, e ``fill_integers``' value i: the exact product
    (a power of two scales without rounding while the result stays normal)."""
    value = uniform_value(key_values, lo, scale, i)
    e = integer_value(key_exponents, low, span, i)
    # 2**e from its bits (e in the normal range; a libm ldexp call took ~5 ns)
    return value * np.uint64((e + 1023) << 52).view(np.float64)


@numba.njit(nogil=True, cache=True)
def fill_wide_f32(out, key_values, lo, scale, key_exponents, low, span):
    """``wide_value`` rounded to float32 (nearest even, as NumPy's cast)."""
    for i in range(out.size):
        out[i] = np.float32(wide_value(key_values, lo, scale, key_exponents, low, span, i))


@numba.njit(nogil=True, cache=True)
def fill_wide_f16(out, key_values, lo, scale, key_exponents, low, span):
    """``wide_value`` rounded to float16 (``half_bits``)."""
    for i in range(out.size):
        value = wide_value(key_values, lo, scale, key_exponents, low, span, i)
        out[i] = np.uint16(half_bits(value, 10, 5, True))


@numba.njit(nogil=True, cache=True)
def fill_wide_bf16(out, key_values, lo, scale, key_exponents, low, span):
    """``wide_value`` rounded to bfloat16 (``half_bits``)."""
    for i in range(out.size):
        value = wide_value(key_values, lo, scale, key_exponents, low, span, i)
        out[i] = np.uint16(half_bits(value, 7, 8, False))
