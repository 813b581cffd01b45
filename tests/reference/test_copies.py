"""Properties of the copy oracles: exact round-to-nearest-even, scatter/gather, permuted copies."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from opbench.reference.copies import cpy, get_rows, round_to, set_rows

BF16 = np.dtype(ml_dtypes.bfloat16)


def wide_float32(rng, n=4000):
    """float32 values over many binades: tiny/subnormal to overflowing f16, random mantissas."""
    mant = rng.uniform(1, 2, n) * rng.choice([-1, 1], n)
    return (mant * 2.0 ** rng.integers(-30, 20, n)).astype(np.float32)


def test_f32_to_f16_and_back_matches_numpy_exactly():
    x = wide_float32(np.random.default_rng(0))
    got = round_to(x, "f16")
    assert got.dtype == np.float16
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    back = round_to(got, "f32")
    np.testing.assert_array_equal(back.view(np.uint32), got.astype(np.float32).view(np.uint32))


def bf16_bits_by_hand(x: np.ndarray) -> np.ndarray:
    """The classic f32 -> bf16 round-to-nearest-even on bits (finite inputs)."""
    bits = x.view(np.uint32).astype(np.uint64)
    bias = 0x7FFF + ((bits >> 16) & 1)
    return ((bits + bias) >> 16).astype(np.uint16)


def test_f32_to_bf16_and_back_matches_ml_dtypes_and_bit_rule():
    x = wide_float32(np.random.default_rng(1)) * np.float32(1e10)
    got = round_to(x, "bf16")
    assert got.dtype == BF16
    np.testing.assert_array_equal(got.view(np.uint16), x.astype(BF16).view(np.uint16))
    np.testing.assert_array_equal(got.view(np.uint16), bf16_bits_by_hand(x))
    back = round_to(got, "f32")
    np.testing.assert_array_equal(back, got.astype(np.float32))


HALFWAY = [
    # (x, storage, expected): exactly halfway between two neighbours -> the even one
    (1 + 2.0**-11, "f16", 1.0),
    (1 + 3 * 2.0**-11, "f16", 1 + 2.0**-9),
    (2049.0, "f16", 2048.0),
    (2051.0, "f16", 2052.0),
    (-(1 + 2.0**-11), "f16", -1.0),
    (1 + 2.0**-8, "bf16", 1.0),
    (1 + 3 * 2.0**-8, "bf16", 1 + 2.0**-6),
    (257.0, "bf16", 256.0),
    (259.0, "bf16", 260.0),
    (1 + 2.0**-8 + 2.0**-20, "bf16", 1 + 2.0**-7),  # just above halfway: up
]


@pytest.mark.parametrize("x,name,want", HALFWAY)
def test_halfway_cases_round_to_even(x, name, want):
    assert float(round_to(np.float32([x]), name)[0]) == want


def exact_rne(x: np.ndarray, bits: int) -> np.ndarray:
    """Round normal float64 values to `bits` significant bits: frexp, then NumPy's half-to-even."""
    mant, exp = np.frexp(x)
    return np.ldexp(np.round(np.ldexp(mant, bits)), exp - bits)


def near_halfway(rng, n, bits):
    """float64 values within a hair of a halfway point of a `bits`-bit format (both sides)."""
    base = np.ldexp(rng.integers(2 ** (bits - 1), 2**bits, n) + 0.5, -bits)
    hair = rng.choice([-1.0, 0.0, 1.0], n) * 2.0**-40
    return (base + hair) * 2.0 ** rng.integers(-10, 10, n)


@pytest.mark.parametrize("name,bits", [("f16", 11), ("bf16", 8)])
def test_float64_inputs_round_once(name, bits):
    """float64 -> bf16 must not round twice through float32 (ml_dtypes' own cast does)."""
    rng = np.random.default_rng(2)
    x = np.concatenate([near_halfway(rng, 2000, bits), rng.uniform(-4, 4, 2000)])
    got = round_to(x, name).astype(np.float64)
    np.testing.assert_array_equal(got, exact_rne(x, bits))
    assert float(round_to(np.float64([1 + 2.0**-8 + 2.0**-30]), "bf16")[0]) == 1 + 2.0**-7


def test_float64_to_bf16_extremes():
    x = np.array([np.inf, -np.inf, 0.0, -0.0, 1e-50, 3.5e38, 3e38, 1e-39])
    got = round_to(x, "bf16").astype(np.float64)
    assert np.array_equal(got[:4], x[:4]) and np.signbit(got[3])
    assert got[4] == 0.0
    assert got[5] == np.inf  # above the largest bf16 + half an ulp
    assert got[6] == float(np.float32(3e38).astype(BF16))
    assert got[7] == float(np.float32(1e-39).astype(BF16))  # subnormal range agrees with f32 path
    assert np.isnan(round_to(np.array([np.nan]), "bf16").astype(np.float64)).all()


def test_set_rows_then_get_rows_returns_the_rows():
    rng = np.random.default_rng(3)
    src = rng.uniform(-1, 1, (6, 2, 4)).astype(np.float32)
    dst = rng.uniform(-1, 1, (10, 2, 4)).astype(np.float16)
    slots = np.array([7, -1, 0, 3, -1, 9], dtype=np.int32)
    out = set_rows(dst, src, slots)
    kept = slots >= 0
    back = get_rows(out, slots[kept], "f32")
    np.testing.assert_array_equal(back, src[kept].astype(np.float16).astype(np.float32))
    same = set_rows(src.copy(), src[::-1], np.arange(5, -1, -1))  # f32 -> f32: bit-exact
    np.testing.assert_array_equal(get_rows(same, np.arange(5, -1, -1), np.float32), src[::-1])


def test_skipped_and_untouched_rows_stay_bit_identical():
    rng = np.random.default_rng(4)
    dst = rng.uniform(-1, 1, (5, 3)).astype(np.float32)
    dst[2] = [np.nan, -0.0, np.inf]
    dst.view(np.uint32)[2, 0] |= 0x1234  # a NaN payload a float copy could lose
    before = dst.copy()
    out = set_rows(dst, rng.uniform(-1, 1, (3, 3)), np.array([-1, 4, -1]))
    np.testing.assert_array_equal(out.view(np.uint32)[:4], before.view(np.uint32)[:4])
    np.testing.assert_array_equal(dst.view(np.uint32), before.view(np.uint32))  # input untouched
    assert not np.array_equal(out[4], before[4])


def test_set_rows_into_bf16_rounds_like_ml_dtypes():
    rng = np.random.default_rng(5)
    src = rng.uniform(-1, 1, (4, 8)).astype(np.float32)
    out = set_rows(np.zeros((4, 8), BF16), src, np.array([3, 2, 1, 0]))
    np.testing.assert_array_equal(out[::-1].view(np.uint16), src.astype(BF16).view(np.uint16))


def test_cpy_permuted_strided_equals_element_loop():
    rng = np.random.default_rng(6)
    src = rng.uniform(-1, 1, (4, 5, 6)).astype(np.float32)
    out = cpy(src, "f32", perm=(2, 0, 1), step=2)
    assert out.shape == (3, 4, 5) and out.flags.c_contiguous
    for a in range(3):
        for b in range(4):
            for c in range(5):
                assert out[a, b, c] == src[b, c, 2 * a]
    half = cpy(src, "f16", perm=(1, 0, 2), step=3)
    np.testing.assert_array_equal(half, src.transpose(1, 0, 2)[::3].astype(np.float16))
    np.testing.assert_array_equal(cpy(src, "bf16"), src.astype(BF16))


def test_bf16_and_f16_sources_convert_exactly():
    x = wide_float32(np.random.default_rng(7), 500)
    b = x.astype(BF16)
    np.testing.assert_array_equal(round_to(b, "f32"), b.astype(np.float32))
    h = round_to(x, "f16")
    np.testing.assert_array_equal(round_to(h, "bf16"), h.astype(np.float32).astype(BF16))


COPY_ERRORS = [
    ("dtype name", lambda: round_to(np.zeros(2), "f64")),
    ("x must be a float", lambda: round_to(np.zeros(2, dtype=np.int32), "f32")),
    ("dtype", lambda: set_rows(np.zeros((3, 2)), np.zeros((1, 2)), [0])),  # float64 dst
    ("src rows", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((1, 3)), [0])),
    ("slots", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((1, 2)), [3])),
    ("slots", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((1, 2)), [-2])),
    ("slots", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((2, 2)), [1, 1])),
    ("slots", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((2, 2)), [1])),
    ("slots", lambda: set_rows(np.zeros((3, 2), np.float32), np.zeros((1, 2)), [0.0])),
    ("rows", lambda: get_rows(np.zeros((3, 2), np.float32), [3], "f32")),
    ("rows", lambda: get_rows(np.zeros((3, 2), np.float32), [-1], "f32")),
    ("rows", lambda: get_rows(np.zeros((3, 2), np.float32), [[0]], "f32")),
    ("src must have", lambda: get_rows(np.float32(1.0), [0], "f32")),
    ("dtype", lambda: get_rows(np.zeros((3, 2), np.float32), [0], "int8")),
    ("perm", lambda: cpy(np.zeros((2, 3), np.float32), "f32", perm=(0, 0))),
    ("step", lambda: cpy(np.zeros((2, 3), np.float32), "f32", step=0)),
    ("dtype", lambda: cpy(np.zeros((2, 3), np.float32), np.float64)),
]


@pytest.mark.parametrize("match,call", COPY_ERRORS, ids=[m for m, _ in COPY_ERRORS])
def test_copies_reject_bad_input(match, call):
    with pytest.raises(ValueError, match=match):
        call()
