"""The numba f32 -> f16 conversion must equal NumPy's cast bit for bit (round to nearest even,
subnormals, overflow to inf, signed zeros)."""

import numpy as np
import pytest

from opbench.backends.cpu import jit

pytestmark = pytest.mark.skipif(not jit.installed(), reason="numba not installed")


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


def _guarded(n: int, offset: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A destination of n elements starting ``offset`` elements into a poisoned array."""
    whole = np.full(n + offset + 9, 0x5A5A5A5A, np.uint32).view(np.uint8).view(dtype)
    return whole, whole[offset:offset + n]


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
@pytest.mark.parametrize("n, offset", [(70_001, 0), (70_001, 3), (300_007, 1)])
def test_streamed_copies_keep_every_bit_and_write_nothing_else(monkeypatch, dtype, n, offset):
    monkeypatch.setattr(jit, "streaming_bytes", lambda: 0)  # stream every same-type copy
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")  # uneven parts on any machine
    src = np.random.default_rng(n + offset).integers(0, np.iinfo(dtype).max, n + 1, dtype)
    src = src[1:]  # an odd start on the read side too: any bit pattern, NaN payloads included
    whole, dst = _guarded(n, offset, dtype)
    before = whole.copy()
    assert jit.streams(src, dst)
    jit.convert(src, dst)
    assert np.array_equal(dst, src)
    outside = np.ones(whole.size, bool)
    outside[offset:offset + n] = False
    assert np.array_equal(whole[outside], before[outside])


def test_a_streamed_copy_of_any_length_and_alignment_is_exact():
    src = np.random.default_rng(5).integers(0, 2**16, 300, np.uint16)
    for n in (0, 1, 31, 32, 33, 95, 200):
        for offset in range(0, 33, 7):
            whole, dst = _guarded(n, offset, np.uint16)
            before = whole.copy()
            jit.copy_streaming(src[:n], dst)
            assert np.array_equal(dst, src[:n]), (n, offset)
            assert np.array_equal(whole[:offset], before[:offset])
            assert np.array_equal(whole[offset + n:], before[offset + n:])


def test_only_same_type_copies_past_half_the_cache_stream():
    big = jit.streaming_bytes() // 4
    f32 = np.empty(big, np.float32)
    assert jit.streams(np.empty(big, np.float32), f32)
    assert not jit.streams(np.empty(big - 1, np.float32), f32[:-1])  # stays in the cache
    assert not jit.streams(np.empty(big, np.float16), np.empty(big, np.float16))  # half the bytes
    assert not jit.streams(np.empty(big, np.float32), np.empty(big, np.uint16))  # a conversion
