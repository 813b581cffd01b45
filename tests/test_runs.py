"""Separate invocations: ``perf --repeat`` keeps each run's samples, and the gate compares runs
(run-to-run variance), calling a change it cannot back AMBIGUOUS with the runs needed."""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness import records, store
from opbench.perf import stats
from opbench.perf.gate import gate
from opbench.perf.runs import merge_runs
from opbench.reports.gate_summary import gate_junit, gate_markdown, headline, problem_lines


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


def _perf_record(run_id: str, run_samples: list, status: str = "OK", anchors=None) -> dict:
    pooled = [int(x) for run in run_samples for x in run]
    perf = {"samples_ns": pooled, "median_ns": float(np.median(pooled)), "n": len(pooled),
            "runs_ns": [[int(x) for x in run] for run in run_samples]}
    if anchors is not None:
        perf["runs_anchor_ns"] = [[int(x) for x in run] for run in anchors]
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


def machine_runs(rng, code_ns: float, speeds: list[float], n: int = 40):
    """Runs on a machine whose speed changes from run to run: the code's samples and the
    anchor's, both slowed by each run's factor."""
    case = [code_ns * speed * rng.lognormal(0, 0.02, n) for speed in speeds]
    anchor = [50_000 * speed * rng.lognormal(0, 0.02, n) for speed in speeds]
    return case, anchor


def test_the_gate_divides_each_run_by_its_anchor():
    rng = np.random.default_rng(7)
    base_speeds, new_speeds = [1.0, 1.6, 1.1, 2.0, 1.3], [1.9, 1.2, 1.5, 1.0, 1.7]
    base_case, base_anchor = machine_runs(rng, 1e5, base_speeds)
    same_case, same_anchor = machine_runs(rng, 1e5, new_speeds)
    slow_case, slow_anchor = machine_runs(rng, 1.15e5, new_speeds)
    base = [_perf_record("base", base_case, anchors=base_anchor)]
    raw = gate(base, [_perf_record("same", same_case)])  # NEW without anchors: timed otherwise
    [mismatch] = raw.timed_differently
    assert (mismatch.base_method.anchored, mismatch.new_method.anchored) == (True, False)
    assert raw.failed and not (raw.unchanged or raw.ambiguous or raw.not_significant)
    raw_only = gate([_perf_record("base", base_case)], [_perf_record("same", same_case)])
    assert raw_only.ambiguous or raw_only.not_significant  # a 40% spread hides everything
    same = gate(base, [_perf_record("same", same_case, anchors=same_anchor)])
    [change] = same.unchanged
    assert change.comparison.anchored and abs(change.comparison.ratio - 1) < 0.03
    slow = gate(base, [_perf_record("slow", slow_case, anchors=slow_anchor)])
    [change] = slow.regressions
    assert change.comparison.anchored and 1.12 < change.comparison.ratio < 1.18
    assert slow.failed and "over the anchor" in gate_markdown(slow)


def test_anchored_runs_needs_every_run_anchored():
    rng = np.random.default_rng(8)
    case, anchor = machine_runs(rng, 1e5, [1.0, 2.0], n=10)
    divided = stats.anchored_runs(case, anchor, 0.2)
    assert np.allclose(divided[1] / divided[0], case[1] / case[0] / (
        np.quantile(anchor[1], 0.2) / np.quantile(anchor[0], 0.2)))
    assert stats.anchored_runs(case, anchor[:1]) is None
    assert stats.anchored_runs(case, [anchor[0], []]) is None
    assert stats.anchored_runs(case, None) is None


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


def test_merged_runs_of_a_gpu_are_judged_against_its_own_ceilings():
    """A GPU record keeps the ceilings it was judged against; the merge uses them, not the
    host's calibration (whose bigger LLC would call a 64 MiB working set cache-resident)."""
    rng = np.random.default_rng(7)
    host = {"copy_gbps": 10.0, "matmul_gflops": 100.0, "llc_bytes": 1 << 30}

    def on_gpu(run_id, samples, device):  # device None: a record of the host
        record = _perf_record(run_id, [samples])
        record["perf"]["bytes"] = 64 << 20
        if device is not None:
            record["perf"]["device_ceilings"] = device
        return record

    first, second = runs(rng, 1e5, 2, n=10)
    gpu = {"copy_gbps": 4000.0, "llc_bytes": 50 << 20}
    [record] = merge_runs([[on_gpu("r", first, gpu)], [on_gpu("r", second, gpu)]], host)
    perf = record["perf"]
    assert perf["ceiling"] == 4000.0 and not perf["cache_resident"]
    assert perf["fraction_of_ceiling"] == pytest.approx(perf["gbps"] / 4000.0)
    [unknown] = merge_runs([[on_gpu("r", first, {})], [on_gpu("r", second, {})]], host)
    assert unknown["perf"]["ceiling"] is None and unknown["perf"]["fraction_of_ceiling"] is None
    assert not unknown["perf"]["cache_resident"]  # the host's 1 GiB LLC would have said so
    [on_host] = merge_runs([[on_gpu("r", first, None)], [on_gpu("r", second, None)]], host)
    assert on_host["perf"]["ceiling"] == 10.0 and on_host["perf"]["cache_resident"]


def test_perf_repeat_records_each_run_from_a_fresh_process(tmp_path, capsys):
    results = tmp_path / "perf.jsonl"
    code = main(["perf", "-o", "GET_ROWS", "--sizes", "small", "--budget-ms", "1",
                 "--min-samples", "3", "--warmup", "1", "--no-calibrate", "--repeat", "2",
                 "--results", str(results)])
    assert code == 0
    [record] = store.read_records(results)
    assert record["perf"]["repeat"] == 2 and len(record["perf"]["runs_ns"]) == 2
    assert "run 2/2 (a fresh process)" in capsys.readouterr().out
    anchors = record["perf"]["runs_anchor_ns"]  # one anchor time per sample, in every run
    assert [len(a) for a in anchors] == [len(r) for r in record["perf"]["runs_ns"]]
    assert "anchor_ns" not in record["perf"]


def test_a_repeat_run_times_its_cases_round_robin_with_the_anchor_after_each_sample():
    from opbench.harness.registry import open_backend
    from opbench.perf import run as perf_mode
    from opbench.perf.anchor import Anchor

    backend = open_backend("cpu")
    cases = [c for c in perf_mode.perf_cases("small") if c.op in ("ROPE", "GET_ROWS")]
    order, anchored = [], []
    real_prepare = perf_mode.prepare
    original_anchor_call = Anchor.__call__

    def tracing_prepare(backend, case, seed=0):
        prepared = real_prepare(backend, case, seed)
        call = prepared.fn

        def traced():
            order.append(case.id)
            call()
        return dataclasses.replace(prepared, fn=traced)

    def traced_anchor(self):
        anchored.append(order[-1] if order else None)
        return original_anchor_call(self)

    options = perf_mode.PerfOptions(budget_ms=1, min_samples=10, warmup=1)  # 2 rounds of 5
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf_mode, "prepare", tracing_prepare)
        patch.setattr(Anchor, "__call__", traced_anchor)
        records = perf_mode.run_perf_round_robin(backend, cases, options, "r")
    backend.close()
    assert [r["case_id"] for r in records] == [c.id for c in cases]
    assert all(r["status"] == "OK" for r in records)
    for record in records:
        assert len(record["perf"]["anchor_ns"]) == len(record["perf"]["samples_ns"])
    assert anchored.count(cases[0].id) >= 10  # the anchor ran right after this case's samples
    switches = sum(a != b for a, b in zip(anchored, anchored[1:]))  # of the timed samples
    assert switches >= 2 * len(cases) - 1, "cases must take turns, not run one after another"


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat 0 must be >= 1"),
    (["--repeat", "2", "--ab", "cpu", "cpu"], "--repeat and --ab do not mix"),
])
def test_perf_repeat_usage_errors(capsys, argv, message):
    assert main(["perf", "-o", "GET_ROWS", "--sizes", "small", "--no-calibrate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_case_that_breaks_inside_the_rounds_gets_its_error_and_the_rest_their_times():
    from opbench.harness.registry import open_backend
    from opbench.perf import run as perf_mode

    backend = open_backend("cpu")
    cases = [c for c in perf_mode.perf_cases("small") if c.op in ("ROPE", "GET_ROWS")]
    broken_id = cases[1].id
    real_prepare = perf_mode.prepare

    def prepare_breaking_one(backend, case, seed=0):
        prepared = real_prepare(backend, case, seed)
        if case.id != broken_id:
            return prepared
        calls, call = [], prepared.fn

        def third_call_fails():  # the NaN check and the warm-up pass, the first sample fails
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError("kernel launch failed")
            call()
        return dataclasses.replace(prepared, fn=third_call_fails)

    options = perf_mode.PerfOptions(budget_ms=1, min_samples=5, warmup=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perf_mode, "prepare", prepare_breaking_one)
        records = perf_mode.run_perf_round_robin(backend, cases, options, "r")
    backend.close()
    status = {r["case_id"]: (r["status"], r.get("reason")) for r in records}
    assert status.pop(broken_id) == ("ERROR", "RuntimeError: kernel launch failed")
    assert {s for s, _ in status.values()} == {"OK"} and len(status) == len(cases) - 1


# -- sides timed differently: plain perf against perf --repeat ------------------------------
def _plain_record(rng, median_ns: float) -> dict:
    """What a plain `opbench perf` writes: one run's samples, no runs_ns, no anchor."""
    record = _perf_record("plain", runs(rng, median_ns, 1))
    del record["perf"]["runs_ns"]
    return record


def _repeat_record(rng, median_ns: float, repeat: int, run_id: str = "repeat") -> dict:
    case, anchor = machine_runs(rng, median_ns, [1.0] * repeat)
    record = _perf_record(run_id, case, anchors=anchor)
    record["perf"]["repeat"] = repeat
    return record


def test_the_gate_does_not_compare_a_plain_run_with_a_repeated_one():
    rng = np.random.default_rng(11)
    plain, repeated = _plain_record(rng, 1e5), _repeat_record(rng, 1.6e5, 3)
    result = gate([plain], [repeated])
    [mismatch] = result.timed_differently
    assert mismatch.base_method.describe() == "without --repeat"
    assert mismatch.new_method.describe() == "with --repeat 3 (the anchor after every sample)"
    assert result.failed and not (result.regressions or result.ambiguous)
    assert problem_lines(result) == [
        "FAIL: 1 timing(s) not compared: BASE was run without --repeat, NEW with --repeat 3 "
        "(the anchor after every sample), and that alone changes the times; rerun BASE with "
        "--repeat 3 (separate invocations are compared by runs), or NEW without --repeat: "
        "[perf] cpu/cpu:0 ROPE(x)"]
    assert headline(result).endswith("0 perf regressions, 1 timed differently (1 cases "
                                     "compared)")
    assert "### Timed differently: not compared (1)" in gate_markdown(result)
    [case] = ET.fromstring(gate_junit(result))
    assert case.find("failure").get("message").startswith("timed differently, not compared")
    [line] = problem_lines(gate([repeated], [plain]))
    assert "BASE was run with --repeat 3 (the anchor after every sample), NEW without " \
           "--repeat" in line and "; rerun NEW with --repeat 3:" in line


def test_repeats_of_different_counts_are_timed_alike():
    rng = np.random.default_rng(12)
    result = gate([_repeat_record(rng, 1e5, 3, "a")], [_repeat_record(rng, 1e5, 5, "b")])
    assert not result.timed_differently and not result.failed
    assert len(result.unchanged + result.not_significant + result.ambiguous) == 1


def _plain_and_repeated_files(tmp_path, seed: int) -> list[str]:
    """Two result files of one case: timed once without --repeat, once with --repeat 3."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, record in (("plain", _plain_record(rng, 1e5)),
                         ("repeat3", _repeat_record(rng, 1.6e5, 3))):
        with store.ResultWriter(tmp_path / f"{name}.jsonl") as writer:
            writer.write(record)
        paths.append(str(tmp_path / f"{name}.jsonl"))
    return paths


def test_cli_gate_names_the_method_of_each_side(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    paths = _plain_and_repeated_files(tmp_path, 13)
    assert main(["gate", *paths[::-1], "--summary", os.devnull]) == 1
    out = capsys.readouterr().out
    assert "BASE was run with --repeat 3" in out and "rerun NEW with --repeat 3" in out
    assert "rerun both sides" not in out


def test_report_against_a_side_timed_otherwise_says_so(tmp_path):
    from opbench.reports.render import build_report

    paths = _plain_and_repeated_files(tmp_path, 14)
    files = build_report(paths[1], tmp_path / "rep", against=paths[0])
    text = files.markdown.read_text()
    assert "0 perf regressions" in text
    assert "1 timing(s) not compared: BASE was run without --repeat, NEW with --repeat 3" in text
