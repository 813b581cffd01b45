"""Comparing two sets of timing samples: is NEW slower than BASE, beyond a threshold, with
confidence?

The primary test is the ratio NEW/BASE of a quantile of the samples with a percentile-bootstrap
confidence interval (seeded, vectorized).  A regression needs the *whole* interval above
``1 + threshold`` -- the threshold is the margin that absorbs drift the within-run samples cannot
see -- and a one-sided Mann-Whitney U test agreeing (p < alpha) as a second opinion.

The default quantile is the 20th percentile, not the median: on a loaded machine a CPU-bound op's
samples are bimodal (ran alone / shared a core), and how many land in the slow mode changes from
run to run, so the median jumps between modes while a low quantile stays in the fast one.
Measured on this project's 2-core machine under load (interleaved A/A pairs): same false alarms
(none), two to three times the detections of a 15% slowdown.  ``quantile=0.5`` gives the ratio of
medians.  Quantiles ignore the outliers of preempted samples, so no trimming is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.05
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ALPHA = 0.01
DEFAULT_RESAMPLES = 2000
DEFAULT_QUANTILE = 0.2
MIN_SAMPLES = 5  # fewer than this on either side: no statistical verdict

REGRESSION = "regression"
IMPROVEMENT = "improvement"
UNCHANGED = "unchanged"
NOT_SIGNIFICANT = "not significant"

_ELEMENTS_PER_CHUNK = 2_000_000  # bounds the memory of one vectorized resampling step


@dataclass(frozen=True)
class Comparison:
    """NEW vs BASE.  ratio > 1 means NEW is slower."""

    ratio: float  # of the ``quantile`` of the samples: 0.5 is the ratio of medians
    ci_low: float
    ci_high: float
    p_slower: float  # Mann-Whitney one-sided p-value for "NEW tends to be slower"
    p_faster: float
    n_base: int
    n_new: int
    verdict: str
    quantile: float = DEFAULT_QUANTILE


def _as_samples(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} has no samples")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} samples must be finite and > 0")
    return arr


def _check_quantile(quantile: float) -> None:
    if not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile} must be between 0 and 1 (0.5: median)")


def bootstrap_quantiles(
    samples: np.ndarray, quantile: float, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The ``quantile`` of ``resamples`` bootstrap resamples, a chunk of rows at a time."""
    n = samples.size
    values = np.empty(resamples)
    rows_per_chunk = max(1, _ELEMENTS_PER_CHUNK // n)
    for start in range(0, resamples, rows_per_chunk):
        rows = min(rows_per_chunk, resamples - start)
        picks = rng.integers(0, n, size=(rows, n))
        values[start : start + rows] = np.quantile(samples[picks], quantile, axis=1)
    return values


def ratio_ci(
    base,
    new,
    *,
    quantile: float = DEFAULT_QUANTILE,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ratio, low, high): quantile(new)/quantile(base) and its percentile-bootstrap interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be between 0 and 1")
    _check_quantile(quantile)
    base = _as_samples(base, "base")
    new = _as_samples(new, "new")
    rng = np.random.default_rng(seed)
    ratios = bootstrap_quantiles(new, quantile, resamples, rng) / bootstrap_quantiles(
        base, quantile, resamples, rng
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    point = np.quantile(new, quantile) / np.quantile(base, quantile)
    return float(point), float(low), float(high)


def ratio_of_medians_ci(base, new, **options) -> tuple[float, float, float]:
    return ratio_ci(base, new, quantile=0.5, **options)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    first = last - counts + 1
    return ((first + last) / 2.0)[inverse]


def mann_whitney(x, y) -> tuple[float, float, float]:
    """(U of x, p that x tends larger, p that x tends smaller): normal approximation with tie
    and continuity corrections (fine from ~8 samples a side; timing sets are much larger)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n1, n2 = x.size, y.size
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney needs samples on both sides")
    combined = np.concatenate([x, y])
    ranks = _average_ranks(combined)
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    _, tie_counts = np.unique(combined, return_counts=True)
    tie_term = float(np.sum(tie_counts**3 - tie_counts)) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term)
    if variance <= 0:
        return u, 1.0, 1.0
    sigma = math.sqrt(variance)
    mean = n1 * n2 / 2.0
    z_greater = (u - mean - 0.5) / sigma
    z_less = (u - mean + 0.5) / sigma
    return u, 0.5 * math.erfc(z_greater / math.sqrt(2)), 0.5 * math.erfc(-z_less / math.sqrt(2))


def classify(
    ci_low: float,
    ci_high: float,
    p_slower: float,
    p_faster: float,
    *,
    threshold: float,
    alpha: float,
) -> str:
    if ci_low > 1 + threshold and p_slower < alpha:
        return REGRESSION
    if ci_high < 1 - threshold and p_faster < alpha:
        return IMPROVEMENT
    if 1 - threshold <= ci_low and ci_high <= 1 + threshold:
        return UNCHANGED
    return NOT_SIGNIFICANT


@dataclass(frozen=True)
class CompareOptions:
    """How two sides are compared (``compare_samples``, ``compare_runs``), checked once here."""

    threshold: float = DEFAULT_THRESHOLD
    confidence: float = DEFAULT_CONFIDENCE
    alpha: float = DEFAULT_ALPHA
    resamples: int = DEFAULT_RESAMPLES
    quantile: float = DEFAULT_QUANTILE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0")
        _check_quantile(self.quantile)

    @classmethod
    def of(cls, options: CompareOptions | None, keywords: dict) -> CompareOptions:
        """``options``, or one made of the keyword arguments (an unknown one is a TypeError)."""
        if options is not None and keywords:
            raise TypeError(f"give CompareOptions or keywords, not both: {sorted(keywords)}")
        return options if options is not None else cls(**keywords)


def compare_samples(base, new, options: CompareOptions | None = None, **keywords
                    ) -> Comparison:
    """Classify NEW against BASE: regression, improvement, unchanged or not significant.
    ``options`` (or the same as keywords: threshold, confidence, alpha, resamples, quantile,
    seed) are ``CompareOptions``."""
    o = CompareOptions.of(options, keywords)
    base = _as_samples(base, "base")
    new = _as_samples(new, "new")
    if min(base.size, new.size) < MIN_SAMPLES:
        ratio = float(np.quantile(new, o.quantile) / np.quantile(base, o.quantile))
        return Comparison(ratio, 0.0, math.inf, 1.0, 1.0, base.size, new.size, NOT_SIGNIFICANT,
                          o.quantile)
    ratio, low, high = ratio_ci(
        base, new, quantile=o.quantile, confidence=o.confidence, resamples=o.resamples,
        seed=o.seed
    )
    _, p_slower, p_faster = mann_whitney(new, base)
    verdict = classify(low, high, p_slower, p_faster, threshold=o.threshold, alpha=o.alpha)
    return Comparison(ratio, low, high, p_slower, p_faster, base.size, new.size, verdict,
                      o.quantile)


# -- separate runs: run-to-run variance ------------------------------------------------------------
AMBIGUOUS = "ambiguous"
MIN_RUNS = 3  # below this a side's run-to-run spread is not measured
MAX_RUNS_NEEDED = 1000


@dataclass(frozen=True)
class RunsComparison(Comparison):
    """A comparison of separate invocations: ``n_base``/``n_new`` count runs, not samples;
    ``spread`` is the measured run-to-run standard deviation of log(time); ``runs_needed``
    (per side) is set when the verdict is AMBIGUOUS."""

    spread: float = math.nan
    runs_needed: int = 0
    anchored: bool = False  # compared the samples divided by the anchor timed beside each


def anchored_runs(runs, anchor_runs, quantile: float = DEFAULT_QUANTILE
                  ) -> list[np.ndarray] | None:
    """Each run's samples divided by the ``quantile`` of the anchor timed beside them in that
    run (``perf --repeat`` records it, see ``opbench.perf.anchor``): the run's machine speed
    divided out.  None when some run lacks its anchors.

    A run's quantile of the anchor, not each sample's own anchor: measured on a 2-vCPU machine
    with a busy neighbour, the run-to-run SD of log time of five small cases was 0.17 raw, 0.10
    with each sample over its own anchor, 0.075 with the run's quantiles divided."""
    if not anchor_runs or len(anchor_runs) != len(runs) or not all(len(a) for a in anchor_runs):
        return None
    return [_as_samples(run, "samples") / np.quantile(_as_samples(anchor, "anchor"), quantile)
            for run, anchor in zip(runs, anchor_runs)]


def _runs(runs, name: str) -> list[np.ndarray]:
    arrays = [_as_samples(run, f"{name} run {i + 1}") for i, run in enumerate(runs)]
    if not arrays:
        raise ValueError(f"{name} has no runs")
    return arrays


def hierarchical_quantiles(runs: list[np.ndarray], quantile: float, resamples: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Bootstrap of the statistic of a side -- the geometric mean over runs of each run's
    ``quantile`` -- that resamples runs, then samples within each run: the interval then holds
    the run-to-run spread, which one run's samples cannot show."""
    per_run = np.stack([bootstrap_quantiles(run, quantile, resamples, rng) for run in runs])
    picked_runs = rng.integers(0, len(runs), size=(resamples, len(runs)))
    picked_draws = rng.integers(0, resamples, size=(resamples, len(runs)))
    return np.exp(np.log(per_run[picked_runs, picked_draws]).mean(axis=1))


def runs_needed(spread: float, log_ratio: float, threshold: float,
                alpha: float = DEFAULT_ALPHA) -> int:
    """Runs a side needs before a change of ``log_ratio`` stands clear of ``threshold`` given a
    run-to-run spread (SD of log time): the smallest n with
    t(1 - alpha, 2n - 2) * spread * sqrt(2 / n) < |log_ratio| - log(1 + threshold)."""
    from scipy import stats as scipy_stats

    margin = abs(log_ratio) - math.log1p(threshold)
    if margin <= 0 or not math.isfinite(spread):
        return MIN_RUNS
    for n in range(MIN_RUNS, MAX_RUNS_NEEDED):
        if scipy_stats.t.ppf(1 - alpha, 2 * n - 2) * spread * math.sqrt(2 / n) < margin:
            return n
    return MAX_RUNS_NEEDED


def _welch_p(log_base: np.ndarray, log_new: np.ndarray) -> tuple[float, float]:
    """One-sided Welch t-test p-values (slower, faster) on per-run log times."""
    from scipy import stats as scipy_stats

    if min(log_base.size, log_new.size) < 2:
        return 1.0, 1.0
    if np.ptp(np.concatenate([log_base, log_new])) == 0:
        return 1.0, 1.0
    slower = scipy_stats.ttest_ind(log_new, log_base, equal_var=False, alternative="greater")
    faster = scipy_stats.ttest_ind(log_new, log_base, equal_var=False, alternative="less")
    return float(slower.pvalue), float(faster.pvalue)


def pooled_spread(log_base: np.ndarray, log_new: np.ndarray) -> float:
    """Run-to-run SD of log time, pooled over both sides (nan with fewer than 2 runs a side)."""
    if min(log_base.size, log_new.size) < 2:
        return math.nan
    dof = log_base.size + log_new.size - 2
    squares = ((log_base - log_base.mean()) ** 2).sum() + ((log_new - log_new.mean()) ** 2).sum()
    return float(math.sqrt(squares / dof))


def compare_runs(base_runs, new_runs, options: CompareOptions | None = None, **keywords
                 ) -> RunsComparison:
    """NEW vs BASE from separate invocations, each side a list of runs (lists of samples).

    The interval is a hierarchical bootstrap (runs, then samples within runs) of the ratio of
    the sides' geometric-mean run quantiles; the second opinion is a one-sided Welch t-test on
    the runs' log quantiles.  A change the interval sees but the runs cannot back -- fewer than
    ``MIN_RUNS`` a side, or fewer than the measured run-to-run spread needs -- is AMBIGUOUS with
    the runs needed, not a regression."""
    o = CompareOptions.of(options, keywords)
    base, new = _runs(base_runs, "base"), _runs(new_runs, "new")
    log_base = np.log([np.quantile(run, o.quantile) for run in base])
    log_new = np.log([np.quantile(run, o.quantile) for run in new])
    log_ratio = float(log_new.mean() - log_base.mean())
    rng = np.random.default_rng(o.seed)
    ratios = (hierarchical_quantiles(new, o.quantile, o.resamples, rng)
              / hierarchical_quantiles(base, o.quantile, o.resamples, rng))
    tail = (1 - o.confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(ratios, [tail, 100 - tail]))
    p_slower, p_faster = _welch_p(log_base, log_new)
    spread = pooled_spread(log_base, log_new)
    verdict, needed = _runs_verdict(low, high, p_slower, p_faster, spread, log_ratio,
                                    min(len(base), len(new)), o.threshold, o.alpha)
    return RunsComparison(math.exp(log_ratio), low, high, p_slower, p_faster, len(base),
                          len(new), verdict, o.quantile, spread, needed)


def _runs_verdict(low, high, p_slower, p_faster, spread, log_ratio, runs, threshold, alpha):
    verdict = classify(low, high, 0.0, 0.0, threshold=threshold, alpha=alpha)  # interval only
    if verdict == NOT_SIGNIFICANT and abs(log_ratio) > math.log1p(threshold):
        # the estimate is past the threshold but the runs' spread hides it: a 12% slowdown
        # read from 5 noisy runs is "run more", not a silent pass
        return AMBIGUOUS, max(runs_needed(spread, log_ratio, threshold, alpha), runs + 1)
    if verdict not in (REGRESSION, IMPROVEMENT):
        return verdict, 0
    needed = runs_needed(spread, log_ratio, threshold, alpha)
    p_value = p_slower if verdict == REGRESSION else p_faster
    if runs < needed or p_value >= alpha:
        return AMBIGUOUS, max(needed, runs + 1)
    return verdict, 0
