"""Optional numba kernels for the loops NumPy cannot do in one pass (neox RoPE: pairs half a
head apart need four strided NumPy passes; one fused loop is ~5x faster).

numba is optional: ``available()`` is False without it and the NumPy kernels are used.  It is
imported lazily (on the first call that could use it), so importing the backend stays cheap.
The loops do the same float32 operations in the same order as the NumPy path, without
fastmath, so both paths give the same results.
"""

from __future__ import annotations

import threading

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

    return _warmed_up({"rotate_halves": rotate_halves})


def _warmed_up(kernels: dict) -> dict:
    """Compile now on tiny inputs; a numba that cannot compile means the NumPy path is used."""
    import numpy as np

    x = np.ones((1, 1, 2), np.float32)
    cs = np.ones((1, 1), np.float32)
    try:
        kernels["rotate_halves"](x, cs, cs, np.empty_like(x))
    except Exception:  # noqa: BLE001 - any compiler failure: fall back to NumPy
        return {}
    return kernels
