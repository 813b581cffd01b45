"""The comparison rules: NMSE, the precision rule, bit-exactness, NaN and Inf."""

import numpy as np
import pytest

from opbench.harness.compare import Tolerance, compare_close, compare_exact
from opbench.harness.ops import SPECS

TOL = Tolerance(nmse=1e-7, k=4.0, floor=1e-6)


def _data(seed=0, n=1000):
    return np.random.default_rng(seed).uniform(-1, 1, n)


def test_identical_passes():
    b = _data()
    assert compare_close(b, b, b.astype(np.float32), TOL).ok


def test_nmse_failure_reports_metric_threshold_and_indices():
    b = _data()
    a = b.copy()
    a[10] += 0.5
    verdict = compare_close(b, b, a, TOL)
    assert not verdict.ok and verdict.metric == "nmse" and verdict.threshold == 1e-7
    assert verdict.n_bad == 1 and verdict.samples[0][0] == (10,)
    text = verdict.describe("out")
    assert "nmse" in text and "[10]" in text and "1/1000 bad" in text


def test_precision_rule_scales_with_low_precision_error():
    b = _data()
    low = (b.astype(np.float16)).astype(np.float64)  # what f16 can achieve
    a_ok = low.copy()  # a backend exactly as good as f16
    loose = Tolerance(nmse=1.0, k=2.0, floor=0.0)
    assert compare_close(b, low, a_ok, loose).ok
    a_bad = low.copy()
    a_bad[3] += 10 * np.abs(low - b).max()  # one element 10x worse than f16 rounding
    verdict = compare_close(b, low, a_bad, loose)
    assert not verdict.ok and verdict.metric == "max_err" and verdict.n_bad == 1


class _Asked:
    """A float32 oracle handed over as a function, counting how often it is asked for."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.calls = values, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.values


def test_the_float32_oracle_is_asked_for_only_past_the_floor():
    """Every error within floor * scale: no element can fail, so the float32 oracle (half of
    the oracles' time) is not computed; one error past the floor: it is, and the verdict is
    the one the same oracle given as an array yields."""
    b = _data()
    low = b.astype(np.float32).astype(np.float64)
    tol = Tolerance(nmse=1.0, k=2.0, floor=1e-6)
    within = b + 0.5e-6 * np.cos(np.arange(b.size))
    asked = _Asked(low)
    assert compare_close(b, asked, within, tol).ok and asked.calls == 0
    for past in (b + 2e-6, b + 0.1):  # within k * the float32 error, then far beyond it
        asked = _Asked(low)
        verdict = compare_close(b, asked, past, tol)
        assert asked.calls == 1 and verdict == compare_close(b, low, past, tol)
    assert not verdict.ok and verdict.metric == "max_err"


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    from opbench.reference.copies import round_to

    return round_to(values, dtype)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_a_rounded_float32_oracle_is_not_asked_for_when_rounding_covers_every_error(dtype):
    """A correct low-precision output (float32 math rounded to f16 or bf16) errs by about the
    rounding itself, past the floor: the distance from the float64 oracle to the dtype's grid,
    a lower bound of the float32 oracle's error, then covers it without that oracle."""
    rng = np.random.default_rng(3)
    b = rng.uniform(-1, 1, (64, 33))
    backend = _rounded(b.astype(np.float32), dtype)
    low = _rounded(b.astype(np.float32), dtype)
    tol = SPECS["ROPE"].tolerance(dtype)
    asked, unrounded = _Asked(low), _Asked(low)
    verdict = compare_close(b, asked, backend, tol, low_rounded_to=backend.dtype)
    assert verdict.ok and verdict == compare_close(b, unrounded, backend, tol)
    assert (asked.calls, unrounded.calls) == (0, 1)  # the rounding passes the floor


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_the_rounding_lower_bound_never_changes_a_verdict(dtype):
    """3000 seeded outputs with errors around every bound, NaN and Inf: the verdict with the
    lower bound in front of the float32 oracle is the verdict without it, field by field."""
    rng = np.random.default_rng(11)
    tol = SPECS["ROPE"].tolerance(dtype)
    skipped = 0
    for _ in range(1000):
        b = rng.uniform(-1, 1, int(rng.integers(1, 600))) * 10.0 ** rng.integers(-3, 4)
        low = _rounded(b.astype(np.float32) * (1 + rng.normal(0, 1e-6, b.size)), dtype)
        spacing = np.abs(b - _rounded(b, dtype).astype(np.float64)).max()
        noise = rng.normal(0, 1, b.size) * spacing * 10.0 ** rng.uniform(-2, 2.5)
        actual = _rounded(b + noise, dtype)
        if rng.random() < 0.05:
            actual[int(rng.integers(b.size))] = rng.choice([np.nan, np.inf, -np.inf])
        asked = _Asked(low)
        verdict = compare_close(b, asked, actual, tol, low_rounded_to=actual.dtype)
        assert repr(verdict) == repr(compare_close(b, low, actual, tol))  # NaN samples too
        skipped += asked.calls == 0
    assert skipped > 100  # the bound did stand in for the oracle, often


def test_references_leave_the_float32_oracle_for_later_and_freeze_the_inputs():
    from opbench.harness.runner import references

    spec = SPECS["ROPE"]
    case = spec.quick_cases(seed=0)[0]
    inputs = spec.make_inputs(case, np.random.default_rng(0))
    dtypes = []
    real = spec.reference
    spec_calls = lambda c, i, dtype: dtypes.append(dtype) or real(c, i, dtype)  # noqa: E731
    try:
        spec.reference = spec_calls
        expected, low = references(spec, case, inputs)
        assert dtypes == [np.float64]
        first = {name: get() for name, get in low.items()}
        again = {name: get() for name, get in low.items()}
    finally:
        del spec.reference
    assert dtypes == [np.float64, np.float32]  # computed once, for every output
    assert set(first) == set(expected) and all(first[n] is again[n] for n in first)
    with pytest.raises(ValueError, match="read-only"):
        next(iter(inputs.arrays.values()))[...] = 0


def test_nan_fails_with_index():
    b = _data()
    a = b.copy()
    a[7] = np.nan
    verdict = compare_close(b, b, a, TOL)
    assert not verdict.ok and verdict.metric == "NaN" and verdict.samples[0][0] == (7,)


def test_inf_must_match_in_place_and_sign():
    b = _data()
    b[5] = -np.inf
    assert compare_close(b, b, b.copy(), TOL).ok
    a = b.copy()
    a[5] = np.inf
    assert not compare_close(b, b, a, TOL).ok


def test_exact_detects_one_bit():
    b = _data().astype(np.float16)
    a = b.copy()
    a.view(np.uint16)[42] ^= 1
    verdict = compare_exact(b, a)
    assert not verdict.ok and verdict.n_bad == 1 and verdict.samples[0][0] == (42,)
    assert compare_exact(b, b.copy()).ok


def test_exact_rejects_dtype_mismatch():
    b = _data().astype(np.float32)
    assert not compare_exact(b, b.astype(np.float64)).ok


@pytest.mark.parametrize("op", ["ROPE", "ATTN", "KV_ROTATE"])
def test_every_judged_op_has_a_row_per_dtype(op):
    rows = {d: SPECS[op].tolerance(d) for d in ("f32", "f16", "bf16")}
    assert rows["f32"].nmse <= rows["f16"].nmse <= rows["bf16"].nmse


def test_exact_move_keeps_nan_bits_but_conversion_accepts_any_quiet_nan():
    expected = np.array([0x7E08, 0x3C00], np.uint16).view(np.float16)
    canonical = np.array([0x7E00, 0x3C00], np.uint16).view(np.float16)
    assert not compare_exact(expected, canonical).ok  # a move: payload must be kept
    assert compare_exact(expected, canonical, converted=True).ok


def test_exact_conversion_names_a_signalling_nan_by_its_bits():
    expected = np.array([0x7E00], np.uint16).view(np.float16)
    signalling = np.array([0x7C08], np.uint16).view(np.float16)
    verdict = compare_exact(expected, signalling, converted=True)
    assert not verdict.ok
    assert "expected 0x7e00 got 0x7c08" in verdict.describe("out")
    assert "NaN rule" in verdict.describe("out")


@pytest.mark.parametrize("spread", [1e-9, 1e-3])  # passes / fails the precision rule
def test_the_all_finite_path_judges_like_the_masked_one(spread):
    """Outputs with no NaN or infinity skip the masks; one matching infinity appended sends
    the same data down the masked path, which must reach the same verdict and figures."""
    rng = np.random.default_rng(3)
    exp = rng.standard_normal(500)
    act = exp + rng.standard_normal(500) * 1e-9
    act[::50] += spread
    low = exp.astype(np.float32)
    tol = Tolerance(nmse=1e-7, k=4.0, floor=1e-6)
    plain = compare_close(exp, low, act.astype(np.float32), tol)
    masked = compare_close(np.append(exp, np.inf), np.append(low, np.inf),
                           np.append(act, np.inf).astype(np.float32), tol)
    assert (plain.ok, plain.metric, plain.n_bad) == (masked.ok, masked.metric, masked.n_bad)
    assert plain.value == pytest.approx(masked.value, rel=1e-12)
    assert plain.threshold == pytest.approx(masked.threshold, rel=1e-12)
    assert plain.ok == (spread < 1e-6)
