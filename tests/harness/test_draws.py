"""The counter-based generator of case inputs: the compiled loop against its NumPy model, and
what a test input needs of its values (the range, no repeats, no pattern between keys)."""

import ml_dtypes
import numpy as np
import pytest

from opbench.harness import draws
from opbench.reference.copies import float64_to_float32_round_to_odd

KEYS = [0, 1, 2**32 - 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (2, 3, 5), (4099,)])
@pytest.mark.parametrize("lo, hi", [(-1.0, 1.0), (-2.0, 0.0), (0.5, 4.0)])
def test_compiled_loop_draws_the_numpy_models_bits(key, shape, lo, hi):
    got = draws.uniform(key, shape, lo, hi)
    want = draws.uniform_numpy(key, shape, lo, hi)
    assert got.shape == want.shape == shape and got.dtype == np.float64
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (4099,)])
@pytest.mark.parametrize("low, high", [(0, 1), (0, 24), (-12, 12), (-5, 2**16 - 5)])
def test_compiled_integers_are_the_numpy_models(key, shape, low, high):
    got = draws.integers(key, shape, low, high)
    want = draws.integers_numpy(key, shape, low, high)
    assert got.shape == want.shape == shape and got.dtype == np.int64
    assert np.array_equal(got, want)
    assert got.size == 0 or (low <= got.min() and got.max() < high)


def test_integers_hit_every_value_about_equally_often():
    x = draws.integers(0xC0FFEE, (240_000,), -12, 12)
    counts = np.bincount(x + 12, minlength=24)
    assert counts.size == 24 and counts.min() > 9_500 and counts.max() < 10_500


@pytest.mark.parametrize("low, high", [(3, 3), (0, 2**16 + 1)])
def test_integers_refuse_an_empty_or_too_wide_span(low, high):
    with pytest.raises(ValueError, match="span"):
        draws.integers(1, (4,), low, high)


def test_the_first_values_of_key_0_are_splitmix64s():
    """Pinned to SplitMix64's published outputs for seed 0 (the state steps by GOLDEN first):
    0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, top 53 bits over 2**53."""
    first = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    want = [(v >> 11) / 2.0**53 for v in first]
    assert draws.uniform(0, (2,), 0.0, 1.0).tolist() == want


def test_values_fill_the_range_evenly_and_do_not_repeat():
    x = draws.uniform(0x5EED, (1 << 20,), -1.0, 1.0)
    assert -1.0 <= x.min() < -0.9999 and 0.9999 < x.max() < 1.0
    counts, _ = np.histogram(x, bins=64, range=(-1.0, 1.0))
    expected = x.size / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: 120 is past the 0.99999 quantile
    assert abs(x.mean()) < 0.005 and abs(x.var() - 1 / 3) < 0.005
    assert np.unique(x).size == x.size


def test_neighbouring_keys_and_neighbouring_values_are_not_correlated():
    """Keys one apart (seeds of neighbouring cases' draws need not be far apart) and each
    value against the next."""
    a, b = draws.uniform(1000, (1 << 16,)), draws.uniform(1001, (1 << 16,))
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02


def test_a_generators_draws_get_different_keys_and_a_seed_the_same():
    def two(seed):
        rng = np.random.default_rng(seed)
        return draws.draw_key(rng), draws.draw_key(rng)

    assert two(7) == two(7)
    assert len(set(two(7))) == 2 and two(7) != two(8)


HALVES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}
#: (mantissa bits, exponent bits) of each 16-bit float
HALF_LAYOUT = {"f16": (10, 5), "bf16": (7, 8)}


def crafted_doubles(half: str) -> np.ndarray:
    """float64 values where a rounding to ``half`` can go wrong: for every exponent the type
    holds (subnormal and normal, up to overflow) the exact halfway points between neighbours,
    a double's ulp either side of them, the neighbours themselves, both signs; zeros, inf,
    NaNs with payloads, float64 subnormals."""
    mant, exp = HALF_LAYOUT[half]
    bias = (1 << (exp - 1)) - 1
    values = []
    rng = np.random.default_rng(11)
    for e in range(-bias - mant - 2, bias + 2):  # below the smallest subnormal to past inf
        step = 2.0 ** (max(e, 1 - bias) - mant)  # spacing of the type at 2**e
        for q in rng.integers(0, 1 << mant, 40).tolist() + [0, 1, (1 << mant) - 1]:
            start = 2.0**e + q * step if e >= 1 - bias else q * step
            halfway = start + step / 2
            values += [start, halfway, np.nextafter(halfway, 0), np.nextafter(halfway, np.inf)]
    values = np.array(values)
    specials = np.array([0x7FF0000000000000, 0x7FF8000000000000, 0x7FF0000000000001,
                         0x7FF4000000000123, 0x7FFFFFFFFFFFFFFF, 0x0000000000000001,
                         0x000FFFFFFFFFFFFF, 0x0010000000000000], np.uint64).view(np.float64)
    values = np.concatenate([values, specials, [0.0, 65504.0, 65519.99, 65520.0, 3.4e38]])
    return np.concatenate([values, -values])


def random_doubles(seed: int, n: int = 200_000) -> np.ndarray:
    """Random float64 bit patterns with exponents near the 16-bit types' range."""
    rng = np.random.default_rng(seed)
    mantissa = rng.integers(0, 1 << 52, n, dtype=np.uint64)
    exponent = rng.integers(1023 - 150, 1023 + 140, n).astype(np.uint64)
    sign = rng.integers(0, 2, n).astype(np.uint64)
    return ((sign << np.uint64(63)) | (exponent << np.uint64(52)) | mantissa).view(np.float64)


def rounded_once(x: np.ndarray, half: str) -> np.ndarray:
    """float64 ``x`` rounded to nearest even once, to ``half``, by a route other than
    ``round_to``'s.  NumPy's float16 cast rounds once from the double.  ml_dtypes' bfloat16
    cast does only from 0.7: up to 0.6 it goes through float32 and rounds twice (a value just
    past a bfloat16 halfway point lands on it, then ties to even).  So bfloat16 goes through
    float32 rounded to odd, which keeps every bit the second rounding needs, as the oracle
    does, then ml_dtypes' float32 cast: one rounding in every version."""
    with np.errstate(over="ignore", invalid="ignore"):
        if half == "f16":
            return x.astype(np.float16)
        return float64_to_float32_round_to_odd(x).astype(ml_dtypes.bfloat16)


def test_rounded_once_is_one_rounding_where_two_differ():
    """A double one ulp past a bfloat16 halfway point (1 + 2**-8 + 2**-52) rounds up to
    1 + 2**-7; through float32 it lands on the halfway point and ties to even, down to 1.
    The same on the float16 side (1 + 2**-11 + 2**-52 -> 1 + 2**-10)."""
    for half, halfway, up in [("bf16", 1 + 2.0**-8, 0x3F81), ("f16", 1 + 2.0**-11, 0x3C01)]:
        x = np.array([np.nextafter(halfway, 2), halfway, -np.nextafter(halfway, 2)])
        want = [up, up - 1, up | 0x8000]
        assert rounded_once(x, half).view(np.uint16).tolist() == want
        assert draws.round_to(x, HALVES[half]).view(np.uint16).tolist() == want


@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("values", ["crafted", "random"])
def test_round_to_rounds_once_to_nearest_even_bit_for_bit(half, values):
    x = crafted_doubles(half) if values == "crafted" else random_doubles(seed=len(half))
    want = rounded_once(x, half)
    got = draws.round_to(x, HALVES[half])
    assert got.dtype == want.dtype and got.shape == x.shape
    bad = np.flatnonzero(got.view(np.uint16) != want.view(np.uint16))
    assert bad.size == 0, [(x[i].hex(), hex(got.view(np.uint16)[i]),
                            hex(want.view(np.uint16)[i])) for i in bad[:5]]


def test_round_to_keeps_shape_and_leaves_other_casts_to_numpy():
    x = draws.uniform(5, (3, 4, 5), -70000.0, 70000.0)[:, ::2]  # not contiguous
    f32 = x.astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.array_equal(draws.round_to(x, np.float16).view(np.uint16),
                              x.astype(np.float16).view(np.uint16))
        assert draws.round_to(f32, np.float16).tobytes() == f32.astype(np.float16).tobytes()
    assert draws.round_to(x, np.float32).tobytes() == f32.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("key", KEYS[:3])
@pytest.mark.parametrize("shape, lo, hi", [((0,), -1.0, 1.0), ((7, 3), -1.0, 1.0),
                                           ((4099,), -1e-6, 1e-6), ((4099,), -7e4, 7e4)])
def test_uniform_as_is_the_float64_draw_rounded_once_bit_for_bit(dtype, key, shape, lo, hi):
    """Including ranges that reach the 16-bit types' subnormals and overflow."""
    got = draws.uniform_as(key, shape, dtype, lo, hi)
    doubles = draws.uniform_numpy(key, shape, lo, hi)
    with np.errstate(over="ignore"):
        want = (rounded_once(doubles, "bf16") if dtype is ml_dtypes.bfloat16
                else doubles.astype(dtype))
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("keys", [(0, 1), (2**64 - 1, 2**63), (0x0123456789ABCDEF, 7)])
@pytest.mark.parametrize("shape, low, high", [((0,), -12, 12), ((7, 3), -12, 12),
                                              ((4099,), -12, 12), ((4099,), -30, 20)])
def test_wide_values_are_the_scaled_draw_rounded_once_bit_for_bit(dtype, keys, shape, low,
                                                                   high):
    """The one-loop draw against its parts: ``uniform`` times 2**``integers`` (exact), then one
    rounding -- past float16's range and below its normals for (-30, 20)."""
    got = draws.wide_uniform_as(*keys, shape, dtype, low, high)
    doubles = np.ldexp(draws.uniform_numpy(keys[0], shape),
                       draws.integers_numpy(keys[1], shape, low, high))
    with np.errstate(over="ignore"):
        want = (rounded_once(doubles, "bf16") if dtype is ml_dtypes.bfloat16
                else doubles.astype(dtype))
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    assert got.tobytes() == want.tobytes()


def test_wide_values_refuse_a_bad_span_exponent_or_dtype():
    for low, high in ((3, 3), (0, draws.MAX_SPAN + 1)):
        with pytest.raises(ValueError, match="span"):
            draws.wide_uniform_as(1, 2, (4,), np.float32, low, high)
    for low, high in ((-1023, 0), (1000, 1025)):  # 2**e would not be a normal double
        with pytest.raises(ValueError, match="exponents"):
            draws.wide_uniform_as(1, 2, (4,), np.float32, low, high)
    with pytest.raises(ValueError, match="float64 is none of"):
        draws.wide_uniform_as(1, 2, (4,), np.float64, -12, 12)
    extremes = draws.wide_uniform_as(1, 2, (64,), np.float32, -1022, -1021)  # the lowest normal
    assert not extremes.any()  # 2**-1022 scales every value below float32's subnormals
