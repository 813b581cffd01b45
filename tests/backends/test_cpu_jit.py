"""The numba f32 -> f16 conversion must equal NumPy's cast bit for bit (round to nearest even,
subnormals, overflow to inf, signed zeros)."""

import numpy as np
import pytest

from opbench.backends.cpu import jit

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba not installed")


def _every_half_boundary() -> np.ndarray:
    """Each f16 value as f32, its neighbours, and the exact halfway points above it."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    bits = halves.astype(np.float32).view(np.uint32).astype(np.int64)
    near = [bits + d for d in (-1, 0, 1)] + [bits + (1 << 12)]
    normal = np.concatenate(near).clip(0, 2**32 - 1).astype(np.uint32).view(np.float32)
    # subnormal halves are k * 2^-24: the ties sit at (k + 1/2) * 2^-24, exact in float32
    ties = ((np.arange(1100) + 0.5) * 2.0**-24).astype(np.float32)
    return np.concatenate([normal, ties, -ties])


def test_f32_to_f16_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    src = np.concatenate([random.view(np.float32), _every_half_boundary(),
                          np.float32([0.0, -0.0, 65504, 65519.99, 65520, -np.inf, 1e-8])])
    src = src[~np.isnan(src)]
    with np.errstate(over="ignore"):
        expected = src.astype(np.float16)
    out = np.empty_like(expected)
    jit.f32_to_f16(src, out)
    mismatch = np.flatnonzero(expected.view(np.uint16) != out.view(np.uint16))
    assert mismatch.size == 0, f"first mismatches at {mismatch[:5]}: {src[mismatch[:5]]}"


def test_f16_to_f32_is_exact_for_every_half():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[~np.isnan(halves)].reshape(-1, 7)[:, ::2]  # a strided view, as kernels see
    out = jit.f16_to_f32(halves)
    assert out.shape == halves.shape and out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), halves.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("perm, step, dst", [((0, 1, 2), 1, np.float16), ((1, 0, 2), 2, np.float32),
                                             ((2, 1, 0), 1, np.float16)])
def test_copies_split_across_threads_equal_the_oracle(monkeypatch, perm, step, dst):
    from opbench.backends.cpu import kernels
    from opbench.reference import copies

    monkeypatch.setattr(kernels, "PARALLEL_COPY_BYTES", 0)  # force the threaded path
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")  # uneven parts on any machine
    src = np.random.default_rng(3).uniform(-70000, 70000, (37, 5, 64)).astype(np.float32)
    expected = copies.cpy(src, np.dtype(dst), perm=perm, step=step)
    out = np.full(expected.shape, np.nan, dst)
    kernels.cpy(src, out, perm, step)
    assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))
