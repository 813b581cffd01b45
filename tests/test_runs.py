"""Separate invocations: ``perf --repeat`` keeps each run's samples, and the gate compares runs
(run-to-run variance), calling a change it cannot back AMBIGUOUS with the runs needed."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness import records, store
from opbench.perf import stats
from opbench.perf.gate import gate
from opbench.perf.runs import merge_runs


def runs(rng, median_ns: float, count: int, shift_sd: float = 0.04, n: int = 40) -> list:
    """``count`` runs whose levels shift from run to run (process start, layout, neighbours)."""
    return [median_ns * np.exp(rng.normal(0, shift_sd)) * rng.lognormal(0, 0.03, n)
            for _ in range(count)]


def test_a_run_to_run_shift_is_not_a_regression():
    # one run per side, 20% apart: the old sample bootstrap called this certain
    rng = np.random.default_rng(1)
    base, new = runs(rng, 1e5, 1), runs(rng, 1.2e5, 1)
    assert stats.compare_samples(base[0], new[0]).verdict == stats.REGRESSION
    comparison = stats.compare_runs(base, new)
    assert comparison.verdict == stats.AMBIGUOUS and comparison.runs_needed >= stats.MIN_RUNS


def test_enough_runs_confirm_a_slowdown_and_clear_an_aa():
    rng = np.random.default_rng(2)
    slowed = stats.compare_runs(runs(rng, 1e5, 6, 0.02), runs(rng, 1.15e5, 6, 0.02))
    assert slowed.verdict == stats.REGRESSION and slowed.ci_low > 1.05
    same = stats.compare_runs(runs(rng, 1e5, 6, 0.02), runs(rng, 1e5, 6, 0.02))
    assert same.verdict in (stats.UNCHANGED, stats.NOT_SIGNIFICANT)


def test_a_wide_spread_asks_for_more_runs():
    rng = np.random.default_rng(3)
    comparison = stats.compare_runs(runs(rng, 1e5, 3, shift_sd=0.15),
                                    runs(rng, 1.3e5, 3, shift_sd=0.15))
    assert comparison.verdict == stats.AMBIGUOUS and comparison.runs_needed > 3


def test_an_estimate_past_the_threshold_that_the_runs_cannot_back_is_ambiguous():
    # the interval reaches below the threshold (not significant), the estimate is 12% slower:
    # "run more" with how many, not a silent pass
    rng = np.random.default_rng(6)
    shifts = np.array([-0.1, 0.0, 0.1, -0.05, 0.05])  # run levels 10% apart, as measured here

    def levels(median_ns, order):
        return [median_ns * np.exp(shift) * rng.lognormal(0, 0.03, 40) for shift in order]

    comparison = stats.compare_runs(levels(1e5, shifts), levels(1.12e5, shifts[::-1]))
    assert comparison.ci_low < 1.05 < comparison.ratio, comparison
    assert comparison.verdict == stats.AMBIGUOUS and comparison.runs_needed > 5
    same = stats.compare_runs(levels(1e5, shifts), levels(1.01e5, shifts[::-1]))
    assert abs(np.log(same.ratio)) < np.log(1.05)
    assert same.verdict == stats.NOT_SIGNIFICANT  # within the threshold: nothing to resolve


def test_runs_needed_grows_with_the_spread_and_shrinks_with_the_change():
    assert stats.runs_needed(0.02, np.log(1.15), 0.05) < stats.runs_needed(0.08, np.log(1.15),
                                                                              0.05)
    assert stats.runs_needed(0.05, np.log(1.5), 0.05) < stats.runs_needed(0.05, np.log(1.15),
                                                                             0.05)


def _perf_record(run_id: str, run_samples: list, status: str = "OK") -> dict:
    pooled = [int(x) for run in run_samples for x in run]
    perf = {"samples_ns": pooled, "median_ns": float(np.median(pooled)), "n": len(pooled),
            "runs_ns": [[int(x) for x in run] for run in run_samples]}
    return records.make_record(kind="perf", backend="cpu", op="ROPE", case_id="ROPE(x)",
                             status=status, run_id=run_id, device="cpu:0", perf=perf, env={})


def test_the_gate_compares_separate_invocations_by_runs():
    rng = np.random.default_rng(4)
    base = [_perf_record("base", runs(rng, 1e5, 1))]
    new = [_perf_record("new", runs(rng, 1.25e5, 1))]
    result = gate(base, new)
    assert [c.key.case_id for c in result.ambiguous] == ["ROPE(x)"] and not result.failed
    base = [_perf_record("base", runs(rng, 1e5, 6, 0.02))]
    new = [_perf_record("new", runs(rng, 1.25e5, 6, 0.02))]
    result = gate(base, new)
    assert [c.key.case_id for c in result.regressions] == ["ROPE(x)"] and result.failed


def test_merge_runs_keeps_each_run_apart_and_a_failed_run_wins():
    rng = np.random.default_rng(5)
    first, second = runs(rng, 1e5, 2, n=10)
    merged = merge_runs([[_perf_record("r", [first])], [_perf_record("r", [second])]])
    [record] = merged
    assert record["perf"]["repeat"] == 2 and len(record["perf"]["samples_ns"]) == 20
    assert [len(r) for r in record["perf"]["runs_ns"]] == [10, 10]
    error = {**_perf_record("r", [second]), "status": "ERROR", "reason": "NaN"}
    [record] = merge_runs([[_perf_record("r", [first])], [error]])
    assert record["status"] == "ERROR" and record["reason"] == "run 2 of 2: NaN"


def test_perf_repeat_records_each_run_from_a_fresh_process(tmp_path, capsys):
    results = tmp_path / "perf.jsonl"
    code = main(["perf", "-o", "GET_ROWS", "--sizes", "small", "--budget-ms", "1",
                 "--min-samples", "3", "--warmup", "1", "--no-calibrate", "--repeat", "2",
                 "--results", str(results)])
    assert code == 0
    [record] = store.read_records(results)
    assert record["perf"]["repeat"] == 2 and len(record["perf"]["runs_ns"]) == 2
    assert "run 2/2 (a fresh process)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat 0 must be >= 1"),
    (["--repeat", "2", "--ab", "cpu", "cpu"], "--repeat and --ab do not mix"),
])
def test_perf_repeat_usage_errors(capsys, argv, message):
    assert main(["perf", "-o", "GET_ROWS", "--sizes", "small", "--no-calibrate", *argv]) == 2
    assert message in capsys.readouterr().err
