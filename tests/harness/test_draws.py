"""The counter-based generator of case inputs: the compiled loop against its NumPy model, and
what a test input needs of its values (the range, no repeats, no pattern between keys)."""

import numpy as np
import pytest

from opbench.harness import draws

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
