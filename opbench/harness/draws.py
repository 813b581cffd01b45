"""Seeded uniform values for case inputs, drawn by a counter-based generator.

Value ``i`` of a draw is SplitMix64's output for the counter ``key + (i + 1) * GOLDEN``, its
top 53 bits as a float64 in [0, 1), scaled to [lo, hi): each value depends only on the key
and its index, so a compiled loop makes them at ~0.4 ns a value here, where NumPy's bit
generators take 2.6-3.4 ns (PCG64's ``random``; SFC64, Philox and MT19937 are no faster).
Drawing a small copy case's inputs took longer than the copy itself (docs/perf.md,
"Fourteenth pass"). The key is one 64-bit draw of the case's own ``np.random.Generator``, so
the case seed still decides every value, and the generator's other draws (positions, rows,
permutations) stay NumPy's.

``uniform_numpy`` and ``integers_numpy`` compute the same values with NumPy's wrapping
uint64 arithmetic, bit for bit: the tests hold the compiled loops to them.

A case stores its inputs in its dtype: ``uniform_as`` rounds each value in the same loop, and
``round_to`` rounds float64 values to float16 or bfloat16 in one, where NumPy's float16 cast
took longer than the draw (2.6 ns a value here; ml_dtypes 0.7's bfloat16 cast 11 ns).  Both
round to nearest even once, from the double: NumPy's float16 cast bit for bit, and ml_dtypes'
bfloat16 cast from 0.7.  Up to 0.6 that cast is fast (0.9 ns) but rounds twice, through
float32, an ulp off just past a halfway point: the loops keep the inputs the same whichever
release is installed.  The tests hold them to a single rounding at every halfway point of both
types.  ``wide_uniform_as`` draws the copies' values (uniform times a power of two drawn from a
second key) and rounds them in one loop too: 0.45-0.6x the time of the three passes and float64
arrays it replaced, at 8,704 and 32,768 values.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's counter step (2**64 / golden ratio, odd)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_UNIT = 1.0 / (1 << 53)  # 53 random bits -> [0, 1), exactly as NumPy's ``random`` scales
MAX_SPAN = 1 << 16  # ``integers``' widest range (see there)


def draw_key(rng: np.random.Generator) -> int:
    """One draw's key: the next raw 64 bits of the case's generator."""
    return int(rng.bit_generator.random_raw())


def uniform(key: int, shape, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """float64 values in [lo, hi) of ``shape`` for ``key`` (compiled loop)."""
    out = np.empty(shape)
    _kernels().fill_uniform(out.reshape(-1), np.uint64(key), float(lo), float(hi) - float(lo))
    return out


#: the dtypes ``uniform_as`` draws in a compiled loop: (the loops' name suffix, the array they
#: write, its bits for the 16-bit types).  The 16-bit casts from float64 are slower than the
#: draw or not the same in every ml_dtypes release (above); ``round_to`` rounds those
ROUNDING_LOOPS = {np.dtype(np.float32): ("f32", np.float32),
                  np.dtype(np.float16): ("f16", np.uint16),
                  np.dtype(ml_dtypes.bfloat16): ("bf16", np.uint16)}
HALF_TYPES = tuple(d for d, (_, storage) in ROUNDING_LOOPS.items() if storage is np.uint16)


def uniform_as(key: int, shape, dtype, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """``round_to(uniform(key, shape, lo, hi), dtype)``, bit for bit, without the float64 array
    for float32 and the 16-bit floats."""
    dtype = np.dtype(dtype)
    if dtype not in ROUNDING_LOOPS:
        return uniform(key, shape, lo, hi).astype(dtype)
    suffix, storage = ROUNDING_LOOPS[dtype]
    out = np.empty(shape, storage)
    fill = getattr(_kernels(), f"fill_uniform_{suffix}")
    fill(out.reshape(-1), np.uint64(key), float(lo), float(hi) - float(lo))
    return out.view(dtype)


def round_to(values: np.ndarray, dtype) -> np.ndarray:
    """``values.astype(dtype)`` for float64 ``values``; the 16-bit floats rounded to nearest
    even once, in a compiled loop (bfloat16: ml_dtypes' cast's bits from 0.7, see above)."""
    dtype = np.dtype(dtype)
    if values.dtype != np.float64 or dtype not in HALF_TYPES:
        return values.astype(dtype)
    out = np.empty(values.shape, np.uint16)
    rounding = getattr(_kernels(), f"round_to_{ROUNDING_LOOPS[dtype][0]}")
    rounding(np.ascontiguousarray(values).reshape(-1), out.reshape(-1))
    return out.view(dtype)


def wide_uniform_as(key_values: int, key_exponents: int, shape, dtype, low: int,
                    high: int) -> np.ndarray:
    """``round_to(uniform(key_values, shape) * 2.0 ** integers(key_exponents, shape, low,
    high), dtype)`` bit for bit, in one loop without the float64 arrays: values in [-1, 1)
    scaled by 2**e, e in [low, high), for float32 and the 16-bit floats (the copies' source
    values).  2**e must be a normal double (the loop builds it from its bits)."""
    dtype = np.dtype(dtype)
    _check_span("wide_uniform_as", low, high)
    if low < -1022 or high > 1024:
        raise ValueError(f"wide_uniform_as: exponents [{low}, {high}) must lie in [-1022, 1024)")
    if dtype not in ROUNDING_LOOPS:
        raise ValueError(f"wide_uniform_as: {dtype} is none of {list(map(str, ROUNDING_LOOPS))}")
    suffix, storage = ROUNDING_LOOPS[dtype]
    out = np.empty(shape, storage)
    fill = getattr(_kernels(), f"fill_wide_{suffix}")
    fill(out.reshape(-1), np.uint64(key_values), -1.0, 2.0, np.uint64(key_exponents), int(low),
         int(high - low))
    return out.view(dtype)


def integers(key: int, shape, low: int, high: int) -> np.ndarray:
    """int64 values in [low, high) of ``shape`` for ``key`` (compiled loop): the top 32 bits
    of each output times the span, over 2**32 (Lemire's multiply-shift).  Each value gets
    floor or ceil of 2**32 / span of the 2**32 inputs, so the span is kept to 2**16: no value
    is then more than 2**-16 (relative) more likely than another."""
    _check_span("integers", low, high)
    out = np.empty(shape, np.int64)
    _kernels().fill_integers(out.reshape(-1), np.uint64(key), int(low), int(high - low))
    return out


def _check_span(name: str, low: int, high: int) -> None:
    if not 0 < high - low <= MAX_SPAN:
        raise ValueError(f"{name}: the span {high - low} must be in [1, {MAX_SPAN}]")


def splitmix64_numpy(key: int, n: int) -> np.ndarray:
    """The generator's n uint64 outputs for ``key``, in NumPy array arithmetic."""
    with np.errstate(over="ignore"):  # uint64 products wrap, as in the compiled loop
        z = np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z ^= z >> np.uint64(31)
    return z


def uniform_numpy(key: int, shape, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """``uniform`` in NumPy: the same bits, 5-10x slower (the tests' reference)."""
    z = splitmix64_numpy(key, int(np.prod(shape, dtype=np.int64)))
    unit = (z >> np.uint64(11)).astype(np.float64) * _UNIT
    return (float(lo) + (float(hi) - float(lo)) * unit).reshape(shape)


def integers_numpy(key: int, shape, low: int, high: int) -> np.ndarray:
    """``integers`` in NumPy: the same values (the tests' reference)."""
    z = splitmix64_numpy(key, int(np.prod(shape, dtype=np.int64)))
    scaled = ((z >> np.uint64(32)) * np.uint64(high - low)) >> np.uint64(32)
    return (scaled.astype(np.int64) + low).reshape(shape)


def warm_up() -> None:
    """Load every compiled loop (from numba's cache, or compile it): ~1 s in a fresh process,
    which a worker pays at start-up rather than in its first case."""
    key, values = 1, np.zeros(1)
    uniform(key, 1)
    integers(key, 1, 0, 2)
    for dtype in ROUNDING_LOOPS:
        uniform_as(key, 1, dtype)
        wide_uniform_as(key, key, 1, dtype, 0, 1)
    for dtype in HALF_TYPES:
        round_to(values, dtype)


@functools.cache
def _kernels():
    """The compiled loops, compiled (or loaded from numba's cache) on first use: a process
    that never draws a case does not import numba for it."""
    from ..backends.common.numba_import import import_numba

    import_numba()
    from . import _draws_jit  # imports numba

    return _draws_jit
