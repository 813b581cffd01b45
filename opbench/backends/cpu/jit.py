"""Optional numba kernels for the loops NumPy cannot do in one pass (neox RoPE: pairs half a
head apart need four strided NumPy passes; one fused loop is ~5x faster).

numba is optional: ``available()`` is False without it and the NumPy kernels are used.  It is
imported lazily (on the first call that could use it), so importing the backend stays cheap.
The loops do the same float32 operations in the same order as the NumPy path, without
fastmath, so both paths give the same results.
"""

from __future__ import annotations

import threading

import numpy as np

_lock = threading.Lock()
_kernels: dict | None = None


def available() -> bool:
    """numba imports and compiles the kernels (the first call pays ~2 s; later ones nothing)."""
    return bool(_load())


def installed() -> bool:
    """Cheap: whether numba could be imported (for reports; does not import it)."""
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def rotate_halves_f32(x, cos, sin, out) -> None:
    """out[..., i], out[..., i+half] = (a*c - b*s, b*c + a*s); x, out float32 [n, H, n_dims]
    (out must not alias x); cos, sin float32 [n, n_dims/2]."""
    _load()["rotate_halves"](x, cos, sin, out)


def f32_to_f16(src, dst) -> None:
    """dst (float16, contiguous) = src (float32, contiguous, same shape) rounded to nearest
    even -- NumPy's own cast runs at about 1 GB/s, this loop several times faster."""
    _load()["f32_to_f16"](src.reshape(-1).view(np.uint32), dst.reshape(-1).view(np.uint16))


def f16_to_f32(src) -> np.ndarray:
    """float16 array (any layout) -> new contiguous float32 array, exact (a table lookup)."""
    flat = np.ascontiguousarray(src).reshape(-1).view(np.uint16)
    out = np.empty(flat.shape, np.float32)
    _load()["f16_to_f32"](flat, out, _half_table())
    return out.reshape(src.shape)


_HALF_TABLE: np.ndarray | None = None


def _half_table() -> np.ndarray:
    global _HALF_TABLE
    if _HALF_TABLE is None:
        _HALF_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(
            np.float16).astype(np.float32)
    return _HALF_TABLE


def _load() -> dict:
    global _kernels
    with _lock:
        if _kernels is None:
            _kernels = _compile()
    return _kernels


def _compile() -> dict:
    try:
        import numba
    except ImportError:
        return {}

    @numba.njit(cache=True, nogil=True)
    def rotate_halves(x, cos, sin, out):  # pragma: no cover - compiled
        n, n_heads, n_dims = x.shape
        half = n_dims // 2
        for t in range(n):
            for h in range(n_heads):
                for i in range(half):
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    c = cos[t, i]
                    s = sin[t, i]
                    out[t, h, i] = a * c - b * s
                    out[t, h, i + half] = b * c + a * s

    @numba.njit(cache=True, nogil=True)
    def f32_to_f16(src, dst):  # pragma: no cover - compiled
        # IEEE binary32 -> binary16 on the bit patterns, round to nearest even.  Every path is
        # computed and one is selected, so the loop has no data-dependent branch and LLVM
        # vectorizes it (1.5x the branchy version).  Normal: rebias the exponent, add
        # 0xfff + the lowest kept bit (ties to even), shift.  Subnormal: the 24-bit mantissa
        # shifted right by 126 - exponent with explicit round-half-even.  Overflow: inf; NaN
        # stays a quiet NaN with its top payload bits.
        one = np.uint32(1)
        for i in range(src.size):
            x = src[i]
            a = x & np.uint32(0x7FFFFFFF)
            sign = (x >> np.uint32(16)) & np.uint32(0x8000)
            normal = (a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & one)) >> np.uint32(13)
            e = a >> np.uint32(23)
            m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
            shift = np.uint32(126) - e if e < np.uint32(125) else one
            shift = shift if shift < np.uint32(31) else np.uint32(31)
            kept = m >> shift
            rest = m & ((one << shift) - one)
            half = one << (shift - one)
            up = rest > half or (rest == half and (kept & one) == one)
            subnormal = kept + (one if up else np.uint32(0))
            nan = np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
            special = nan if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
            big = special if a >= np.uint32(0x47800000) else normal
            h = subnormal if a < np.uint32(0x38800000) else big
            dst[i] = np.uint16(h | sign)

    @numba.njit(cache=True, nogil=True)
    def f16_to_f32(src, dst, table):  # pragma: no cover - compiled
        for i in range(src.size):
            dst[i] = table[src[i]]

    return _warmed_up({"rotate_halves": rotate_halves, "f32_to_f16": f32_to_f16,
                       "f16_to_f32": f16_to_f32})


def _warmed_up(kernels: dict) -> dict:
    """Compile now on tiny inputs; a numba that cannot compile means the NumPy path is used."""
    x = np.ones((1, 1, 2), np.float32)
    cs = np.ones((1, 1), np.float32)
    try:
        kernels["rotate_halves"](x, cs, cs, np.empty_like(x))
        kernels["f32_to_f16"](np.ones(1, np.uint32), np.empty(1, np.uint16))
        kernels["f16_to_f32"](np.ones(1, np.uint16), np.empty(1, np.float32), _half_table())
    except Exception:  # noqa: BLE001 - any compiler failure: fall back to NumPy
        return {}
    return kernels
