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


@numba.njit(nogil=True, cache=True)
def fill_uniform(out, key, lo, scale):
    """out[i] = lo + scale * (output i >> 11) / 2**53."""
    for i in range(out.size):
        out[i] = lo + scale * (np.float64(splitmix64(key, i) >> _S11) * _UNIT)


@numba.njit(nogil=True, cache=True)
def fill_integers(out, key, low, span):
    """out[i] = low + ((output i >> 32) * span) >> 32."""
    for i in range(out.size):
        out[i] = low + np.int64(((splitmix64(key, i) >> _S32) * np.uint64(span)) >> _S32)
