"""Ratio of medians with a bootstrap interval, Mann-Whitney U, and the verdicts built on them.

Synthetic timing samples look like a noisy machine's: log-normal around the true time plus a few
outliers several times slower (a preempted run)."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.perf import stats


def timings(rng, n=100, median_ns=50_000.0, sigma=0.05, outliers=0.03) -> np.ndarray:
    samples = median_ns * rng.lognormal(0.0, sigma, n)
    hit = rng.random(n) < outliers
    samples[hit] *= rng.uniform(2.0, 5.0, hit.sum())
    return samples


def verdicts(shift: float, seeds: range, threshold: float, **kw) -> list[str]:
    found = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        base, new = timings(rng, **kw), timings(rng, **kw) * shift
        found.append(stats.compare_samples(base, new, threshold=threshold, seed=seed).verdict)
    return found


def test_identical_distributions_raise_no_alarm_across_200_seeds():
    found = verdicts(1.0, range(200), threshold=0.05)
    assert found.count(stats.REGRESSION) == 0
    assert found.count(stats.UNCHANGED) >= 190  # and the interval is usually tight enough


def test_false_alarm_rate_is_controlled_even_without_a_threshold():
    """threshold 0 leaves only the statistics: a one-sided 97.5% bound and p < 0.01 together
    should alarm in about 1% of A/A pairs; 10 of 200 (5%) would mean a broken interval."""
    found = verdicts(1.0, range(200), threshold=0.0)
    assert found.count(stats.REGRESSION) <= 10


def test_a_ten_percent_slowdown_is_caught():
    found = verdicts(1.10, range(100), threshold=0.05)
    assert found.count(stats.REGRESSION) >= 97


def test_a_ten_percent_speedup_is_an_improvement():
    found = verdicts(1 / 1.10, range(50), threshold=0.05)
    assert found.count(stats.IMPROVEMENT) >= 48
    assert stats.REGRESSION not in found


def test_a_slowdown_inside_the_threshold_is_never_a_regression():
    found = verdicts(1.03, range(50), threshold=0.05)
    assert stats.REGRESSION not in found


def test_the_interval_covers_the_true_ratio():
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        base = timings(rng, outliers=0)
        new = timings(rng, outliers=0) * 1.2
        _, low, high = stats.ratio_of_medians_ci(base, new, seed=seed)
        covered += low <= 1.2 <= high
    assert covered >= 88  # nominal 95%


def test_bootstrap_is_seeded_and_chunking_does_not_change_it(monkeypatch):
    rng = np.random.default_rng(1)
    base, new = timings(rng), timings(rng)
    first = stats.ratio_of_medians_ci(base, new, seed=7)
    assert stats.ratio_of_medians_ci(base, new, seed=7) == first
    assert stats.ratio_of_medians_ci(base, new, seed=8) != first
    monkeypatch.setattr(stats, "_ELEMENTS_PER_CHUNK", 1000)  # 10 rows per chunk, not all
    assert stats.ratio_of_medians_ci(base, new, seed=7) == first


def test_mann_whitney_u_counts_pairs():
    x = np.array([1.0, 4.0, 4.0, 9.0])
    y = np.array([2.0, 4.0, 5.0])
    u, p_greater, p_less = stats.mann_whitney(x, y)
    brute = sum((a > b) + 0.5 * (a == b) for a in x for b in y)
    assert u == brute == 6.0
    assert 0 < p_greater < 1 and 0 < p_less < 1


def test_mann_whitney_separated_samples_are_significant_one_way():
    rng = np.random.default_rng(0)
    low, high = rng.uniform(0, 1, 30), rng.uniform(2, 3, 30)
    u, p_greater, p_less = stats.mann_whitney(high, low)
    assert u == 900 and p_greater < 1e-9 and p_less > 0.999


def test_mann_whitney_agrees_with_scipy():
    from scipy import stats as scipy_stats  # a dependency: this check always runs
    rng = np.random.default_rng(3)
    x, y = np.round(timings(rng, n=40), -3), np.round(timings(rng, n=60), -3)  # with ties
    u, p_greater, p_less = stats.mann_whitney(x, y)
    for alternative, p in (("greater", p_greater), ("less", p_less)):
        ref = scipy_stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
        assert u == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_all_equal_samples_are_unchanged_not_an_error():
    same = np.full(50, 1000.0)
    cmp = stats.compare_samples(same, same)
    assert cmp.ratio == 1.0 and cmp.verdict == stats.UNCHANGED


def test_too_few_samples_give_no_verdict():
    cmp = stats.compare_samples([100, 101], [300, 301])
    assert cmp.verdict == stats.NOT_SIGNIFICANT and cmp.ratio == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize(
    "base, new, kw, message",
    [
        ([], [1.0] * 10, {}, "base has no samples"),
        ([1.0] * 10, [1.0, np.nan] * 5, {}, "new samples must be finite"),
        ([1.0] * 10, [0.0] * 10, {}, "must be finite and > 0"),
        ([1.0] * 10, [1.0] * 10, {"threshold": -0.1}, "threshold=-0.1"),
    ],
)
def test_bad_input_is_named(base, new, kw, message):
    with pytest.raises(ValueError, match=message):
        stats.compare_samples(base, new, **kw)


def test_confidence_must_be_a_probability():
    with pytest.raises(ValueError, match="confidence=1.5"):
        stats.ratio_of_medians_ci([1.0] * 10, [1.0] * 10, confidence=1.5)


def contended(rng, slow_fraction: float, n=200, fast_ns=50_000.0) -> np.ndarray:
    """A loaded machine: some samples shared a core and took 2-4x longer."""
    samples = fast_ns * rng.lognormal(0.0, 0.05, n)
    slowed = rng.random(n) < slow_fraction
    samples[slowed] *= rng.uniform(2.0, 4.0, slowed.sum())
    return samples


def test_default_quantile_resists_load_that_changes_between_runs():
    """A/A where the machine got busier: 25% then 60% of samples slowed.  The median lands in
    the slow mode and alarms; the default low quantile stays in the fast mode and does not."""
    median_alarms = default_alarms = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        base, new = contended(rng, 0.25), contended(rng, 0.60)
        default_alarms += stats.compare_samples(base, new).verdict == stats.REGRESSION
        median = stats.compare_samples(base, new, quantile=0.5)
        median_alarms += median.verdict == stats.REGRESSION
    assert default_alarms == 0
    assert median_alarms >= 25


def test_default_quantile_still_sees_a_slowdown_under_load():
    caught = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        base, new = contended(rng, 0.3), contended(rng, 0.3) * 1.15
        caught += stats.compare_samples(base, new).verdict == stats.REGRESSION
    assert caught >= 29


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.2])
def test_quantile_must_be_inside_0_1(quantile):
    with pytest.raises(ValueError, match=f"quantile={quantile}"):
        stats.compare_samples([1.0] * 10, [1.0] * 10, quantile=quantile)


def test_options_are_one_dataclass_shared_by_both_comparisons():
    rng = np.random.default_rng(3)
    base, new = rng.normal(100, 3, 60), rng.normal(118, 3, 60)
    options = stats.CompareOptions(threshold=0.1, quantile=0.5, resamples=300, seed=4)
    assert stats.compare_samples(base, new, options) == stats.compare_samples(
        base, new, threshold=0.1, quantile=0.5, resamples=300, seed=4)
    runs = [rng.normal(100, 3, 30) for _ in range(3)]
    assert stats.compare_runs(runs, runs, options) == stats.compare_runs(
        runs, runs, threshold=0.1, quantile=0.5, resamples=300, seed=4)
    for compare, a, b in ((stats.compare_samples, base, new), (stats.compare_runs, runs, runs)):
        with pytest.raises(ValueError, match="threshold=-1"):
            compare(a, b, threshold=-1)
        with pytest.raises(TypeError):
            compare(a, b, thresold=0.1)  # a misspelt option is not silently dropped
        with pytest.raises(TypeError, match="not both"):
            compare(a, b, options, seed=1)
