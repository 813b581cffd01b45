"""``opbench perf`` end to end on the small perf table, plus its units (bytes, flops, refs).

Budgets are a few milliseconds and --min-samples small, so the file runs in seconds; nothing here
asserts a duration (samples are only counted, never compared with a clock)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.cli.perf import ab_labels
from opbench.errors import UsageError
from opbench.harness.cases import Case
from opbench.harness.ops import SPECS
from opbench.harness.ops.attn import visible_keys
from opbench.harness.ops.copies import cpy_case, get_rows_case, set_rows_case
from opbench.harness.records import cpu_model
from opbench.harness.registry import split_ref
from opbench.harness.store import read_records
from opbench.perf import run as perf

FAST = ["--sizes", "small", "--budget-ms", "2", "--min-samples", "3", "--warmup", "1"]
LINE = re.compile(r"^  [A-Z_]+\(.*\): \d+ runs - \d+\.\d\d us/run - \d+ kB/run - \d+\.\d\d "
                  r"(GB/s|GFLOP/s)( \(\d+% of (copy bandwidth|matmul rate), \d+ cores?\)"
                  r"|, cache-resident \(working set [\d.]+ (kB|MiB)\))?$")


@pytest.fixture(autouse=True)
def no_ceilings(tmp_path, monkeypatch):
    """An empty ceilings cache: perf must not calibrate (seconds) inside unit tests."""
    monkeypatch.setenv("OPBENCH_CACHE_DIR", str(tmp_path / "cache"))


def perf_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["perf", *FAST, "--no-calibrate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def backend_file(tmp_path, body: str) -> str:
    path = tmp_path / "fake_backends.py"
    path.write_text("from opbench.backends.cpu import CpuBackend\n\n" + textwrap.dedent(body))
    return str(path)


# -- the verb end to end ---------------------------------------------------------------------------
CANNOT_OPEN = """
    class CannotOpen(CpuBackend):
        name = "cannot-open"

        def __init__(self, **options):
            raise RuntimeError("cannot open device 0")
"""


@pytest.mark.parametrize("repeat", [[], ["--repeat", "2"]])
def test_a_backend_whose_constructor_raises_fails_in_one_line_and_the_next_one_runs(
        tmp_path, capsys, repeat):
    fake, results = backend_file(tmp_path, CANNOT_OPEN), tmp_path / "r.jsonl"
    code, out, err = perf_main(capsys, "-b", f"{fake}:CannotOpen,cpu", "-o", "CPY", "-p",
                               "type=f16", "--results", str(results), *repeat)
    assert code == 1 and "Traceback" not in out + err
    assert "Backend cannot-open: FAIL (backend" in out
    assert "RuntimeError: cannot open device 0" in out
    assert {r["backend"] for r in read_records(results)} == {"cpu"}


HANGS_ON_A_TRANSPOSE = """
    import time

    class HangsOnATranspose(CpuBackend):
        name = "hangs"

        def cpy(self, src, out, perm, step=1, stream=None):
            if tuple(perm) == (1, 0, 2):
                time.sleep(600)
            super().cpy(src, out, perm, step, stream)
"""


@pytest.mark.parametrize("sides, named", [(["-b", "{fake}"], "hangs"),
                                          (["--ab", "cpu", "{fake}"], "cpu and hangs")])
def test_a_case_past_the_timeout_stops_the_run_naming_it_and_keeps_the_records(
        tmp_path, sides, named):
    fake = backend_file(tmp_path, HANGS_ON_A_TRANSPOSE) + ":HangsOnATranspose"
    results = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "opbench", "perf", *FAST, "--no-calibrate",
                           *[s.format(fake=fake) for s in sides], "-o", "CPY", "--timeout", "2",
                           "--pin-cpu", "none", "--results", str(results)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 124, done.stderr
    assert (f"perm=[1,0,2],step=1) on {named} ran past --timeout 2 s; stopping (records "
            "written so far are kept)") in done.stderr
    assert "in cpy" in done.stderr  # where it hung
    first = "CPY(type_src=f32,type=f16,ne=[64,4,64],perm=[0,1,2],step=1)"
    assert {r["case_id"] for r in read_records(results)} == {first}


@pytest.mark.parametrize("argv, message", [
    (["--timeout", "0"], "needs a number of seconds > 0"),
    (["--timeout", "5", "--repeat", "2"], "with --repeat or a REF@PATH side"),
])
def test_perf_timeout_refusals(capsys, argv, message):
    code, _, err = perf_main(capsys, "-o", "CPY", *argv)
    assert code == 2 and message in err


def test_an_ab_side_whose_constructor_raises_ends_the_run_in_one_line(tmp_path, capsys):
    fake = backend_file(tmp_path, CANNOT_OPEN)
    code, out, err = perf_main(capsys, "--ab", "cpu", f"{fake}:CannotOpen", "-o", "CPY")
    assert code == 1 and "Traceback" not in out + err
    assert "could not be constructed: RuntimeError: cannot open device 0" in err


def test_perf_writes_every_sample_and_prints_test_backend_ops_lines(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code, out, _ = perf_main(capsys, "-o", "CPY,ROPE", "--results", str(results))
    assert code == 0
    records = read_records(results)
    assert {r["op"] for r in records} == {"CPY", "ROPE"}
    assert len(records) == len([c for c in perf.perf_cases("small") if c.op in ("CPY", "ROPE")])
    for r in records:
        assert r["kind"] == "perf" and r["status"] == "OK"
        assert len(r["perf"]["samples_ns"]) == r["perf"]["n"] >= 3
        assert r["perf"]["bytes"] > 0 and r["perf"]["gbps"] > 0
    assert len({r["run_id"] for r in records}) == 1
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(lines) == len(records)
    assert all(LINE.match(line) for line in lines), lines


def write_calibration(tmp_path, calibration: dict) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ceilings.json").write_text(json.dumps({cpu_model(): calibration}))


#: ceilings far above what a small case reaches, so none counts as cache-resident
HIGH = {"copy_gbps": 1500.0, "matmul_gflops": 5000.0,
        "one_core": {"copy_gbps": 1000.0, "matmul_gflops": 2500.0},
        "all_cores": {"copy_gbps": 1500.0, "matmul_gflops": 5000.0, "threads": 2},
        "copies": ["np.copyto", "streaming"]}
THREADED = """
    class OneThread(CpuBackend):
        name = "one-thread"

        def info(self):
            return {**super().info(), "threads": 1}

    class TwoThreads(CpuBackend):
        name = "two-threads"

        def info(self):
            return {**super().info(), "threads": 2}
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to run 2 threads")
@pytest.mark.parametrize("cls, ceiling, cores", [("OneThread", 1000.0, "1 core"),
                                                 ("TwoThreads", 1500.0, "2 cores")])
def test_perf_line_uses_the_ceiling_of_the_backends_threads(tmp_path, capsys, cls, ceiling,
                                                            cores):
    write_calibration(tmp_path, HIGH)
    results = tmp_path / "r.jsonl"
    ref = backend_file(tmp_path, THREADED) + ":" + cls
    code, out, _ = perf_main(capsys, "-b", ref, "-o", "CPY", "-p", "type=f16",
                             "--results", str(results))
    assert code == 0
    assert re.search(rf"GB/s \(\d+% of copy bandwidth, {cores}\)$", out.strip().splitlines()[-1])
    for record in read_records(results):
        assert record["perf"]["ceiling"] == ceiling
        assert record["perf"]["ceiling_threads"] == int(cores[0])


def test_the_cpu_backend_splits_over_every_cpu_and_gets_their_ceiling(tmp_path, capsys):
    write_calibration(tmp_path, HIGH)
    results = tmp_path / "r.jsonl"
    assert perf_main(capsys, "-o", "CPY", "-p", "type=f16", "--results", str(results))[0] == 0
    cpus = min(len(os.sched_getaffinity(0)), HIGH["all_cores"]["threads"])
    assert {r["perf"]["ceiling_threads"] for r in read_records(results)} == {cpus}
    with pytest.MonkeyPatch.context() as patch:  # told one thread: one core's ceiling
        patch.setenv("NUMBA_NUM_THREADS", "1")
        assert perf_main(capsys, "-o", "CPY", "-p", "type=f16", "--results",
                         str(tmp_path / "one.jsonl"))[0] == 0
    assert {r["perf"]["ceiling"] for r in read_records(tmp_path / "one.jsonl")} == {1000.0}


ON_DEVICES = """
    class MeasuredGpu(CpuBackend):
        name = "measured-gpu"

        def device_ceilings(self, device=None):
            return {"copy_gbps": 1e6, "llc_bytes": 1024}

    class UnmeasuredGpu(CpuBackend):
        name = "unmeasured-gpu"

        def device_ceilings(self, device=None):
            return {}

    class UnmeasurableGpu(CpuBackend):
        name = "unmeasurable-gpu"

        def device_ceilings(self, device=None):
            raise RuntimeError("out of memory for the copy")
"""
LOW = {"copy_gbps": 1e-3, "matmul_gflops": 1e-3, "one_core": {"copy_gbps": 1e-3,
       "matmul_gflops": 1e-3}, "all_cores": {"copy_gbps": 1e-3, "matmul_gflops": 1e-3,
                                             "threads": 2},
       "copies": ["np.copyto"]}


def test_a_backend_on_another_device_is_judged_against_that_devices_ceilings(tmp_path, capsys):
    """The host's calibration (here so low that every host case reads as cache-resident) does
    not judge a backend whose device declares its own ceilings, or declares it knows none."""
    write_calibration(tmp_path, LOW)
    fake = backend_file(tmp_path, ON_DEVICES)
    results = tmp_path / "r.jsonl"
    code, out, _ = perf_main(capsys, "-b", f"{fake}:MeasuredGpu,{fake}:UnmeasuredGpu,"
                             f"{fake}:UnmeasurableGpu", "-o", "CPY", "-p", "type=f16",
                             "--results", str(results))
    assert code == 0  # ceilings that cannot be measured only leave the fraction out
    measured, unmeasured = ([r["perf"] for r in read_records(results)
                             if r["backend"] in names]
                            for names in (("measured-gpu",),
                                          ("unmeasured-gpu", "unmeasurable-gpu")))
    for block in measured:
        assert block["ceiling"] == 1e6 and block["ceiling_threads"] is None
        assert block["device_ceilings"] == {"copy_gbps": 1e6, "llc_bytes": 1024}
        assert block["fraction_of_ceiling"] == pytest.approx(block["gbps"] / 1e6)
    for block in unmeasured:
        assert block["ceiling"] is None and block["fraction_of_ceiling"] is None
        assert not block["cache_resident"] and not block["above_ceiling"]
    lines = [line for line in out.splitlines() if line.startswith("  CPY")]
    assert lines[0].endswith("% of the device's copy bandwidth)"), lines
    assert lines[-1].endswith("GB/s"), lines  # no fraction, no label


EVENT_TIMED = """
    import time

    from opbench.backends.common.event_timer import EventTimer

    class EventTimedCpu(CpuBackend):
        # a device timer over the host clock, with no spin to queue: the perf block keeps
        # the host's enqueue time beside the samples
        name = "event-timed-cpu"

        def timer(self):
            # a 50 ms "spin" (it does nothing): an enqueue counts as hidden unless slower
            return EventTimer(spin=lambda ns: None, record=time.perf_counter_ns,
                              wait=lambda event: None, elapsed_ns=lambda a, b: b - a,
                              spin_ns=50_000_000)
"""


def test_a_device_timers_launch_time_is_kept_in_the_perf_block(tmp_path, capsys):
    fake = backend_file(tmp_path, EVENT_TIMED)
    results = tmp_path / "r.jsonl"
    code, _, _ = perf_main(capsys, "-b", f"cpu,{fake}:EventTimedCpu", "-o", "CPY",
                           "-p", "type=f16", "--results", str(results))
    assert code == 0
    blocks = {r["backend"]: r["perf"] for r in read_records(results)}
    timed = blocks["event-timed-cpu"]  # records name a backend by its class's name
    # the call is all host work here: its enqueue time is the sample's time
    assert 0 < timed["launch_median_ns"] <= 1.5 * timed["median_ns"]
    assert timed["launch_exposed"] == 0  # each enqueue was shorter than the spin asked for
    assert timed["launch_waits_for_device"] is False
    assert "launch_median_ns" not in blocks["cpu"]  # the host clock keeps no launch time


def test_a_figure_above_the_ceiling_prints_cache_resident(tmp_path, capsys):
    low = {"copy_gbps": 1e-3, "matmul_gflops": 1e-3, "one_core": {"copy_gbps": 1e-3,
           "matmul_gflops": 1e-3}, "all_cores": {"copy_gbps": 1e-3, "matmul_gflops": 1e-3,
                                                 "threads": 2},
           "copies": ["np.copyto"]}
    write_calibration(tmp_path, low)  # every case beats it: no impossible percentage
    results = tmp_path / "r.jsonl"
    code, out, _ = perf_main(capsys, "-o", "CPY", "-p", "type=f16", "--results", str(results))
    assert code == 0 and "%" not in out
    [record] = [r for r in read_records(results)][-1:]
    size = record["perf"]["bytes"] / 1024  # the small case moves less than 1 MiB
    assert out.strip().splitlines()[-1].endswith(f"GB/s, cache-resident (working set "
                                                 f"{size:.0f} kB)")
    assert record["perf"]["cache_resident"] and record["perf"]["fraction_of_ceiling"] is None


def test_attention_counts_flops_and_is_compute_bound_at_prefill():
    case = next(c for c in perf.perf_cases("full") if c.op == "ATTN" and c["nq"] == 512
                and c["hs"] == (128, 128))
    inputs_free_flops = SPECS["ATTN"].work(case)[1]
    # causal 512x512: 512*513/2 visible pairs per head, 2 flops per multiply-add over Dk+Dv
    assert inputs_free_flops == 2 * (512 * 513 // 2) * 32 * 256


def test_visible_keys_causal_window_and_decode():
    assert visible_keys(1, 4096, True, 0) == 4096  # decode sees the whole context
    assert visible_keys(3, 3, True, 0) == 1 + 2 + 3
    assert visible_keys(3, 3, False, 0) == 9
    assert visible_keys(4, 4, True, 2) == 1 + 2 + 2 + 2


def test_copy_bytes_count_the_read_and_the_write():
    case = cpy_case("f32", "f16", (4096, 8, 128))
    spec = SPECS["CPY"]
    inputs = spec.make_inputs(case, np.random.default_rng(0))
    nbytes, flops = perf.work(case, inputs, spec.outputs(case, inputs))
    assert (nbytes, flops) == (16 * 2**20 + 8 * 2**20, 0)


def test_row_ops_count_only_the_rows_they_touch():
    spec = SPECS["GET_ROWS"]
    case = get_rows_case("f16", "f32", (8, 128), 4096, 8192)
    inputs = spec.make_inputs(case, np.random.default_rng(0))
    assert perf.work(case, inputs, spec.outputs(case, inputs))[0] == 4096 * 1024 * (2 + 4)
    spec = SPECS["SET_ROWS"]
    case = set_rows_case("f32", "f16", (8, 128), 4096, 16384)
    inputs = spec.make_inputs(case, np.random.default_rng(0))
    assert perf.work(case, inputs, spec.outputs(case, inputs))[0] == 4096 * 1024 * (4 + 2)


def test_full_table_is_valid_model_shapes_with_unique_ids():
    cases = perf.perf_cases("full")
    assert len({c.id for c in cases}) == len(cases)
    for case in cases:
        SPECS[case.op].validate(case)
    rope = [c for c in cases if c.op == "ROPE"]
    assert {c["mode"] for c in rope} == {"neox", "normal"}
    assert any(c["ne"] == (128, 32, 512) for c in rope)
    decode = [c["nkv"] for c in cases if c.op == "ATTN" and c["nq"] == 1]
    assert {4096, 8192, 32768} <= set(decode)
    assert any(c.op == "ATTN" and c["sc"] and c["win"] for c in cases)  # Gemma-like


def test_json_and_csv_outputs_carry_the_statistics(capsys):
    code, out, _ = perf_main(capsys, "-o", "CPY", "--output", "json")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["perf"]["median_ns"] > 0 for r in rows)
    assert "samples_ns" not in rows[0]["perf"]  # the samples belong in --results
    code, out, _ = perf_main(capsys, "-o", "CPY", "--output", "csv")
    header, first = out.splitlines()[:2]
    assert code == 0 and "median_ns" in header and "iqr_ns" in header and ",OK," in first


# -- refusals and errors ---------------------------------------------------------------------------
def test_interpreter_backend_is_refused_not_timed(tmp_path, capsys):
    path = backend_file(tmp_path, """
        class Interpreted(CpuBackend):
            name = "interp"
            is_interpreter = True
        """)
    results = tmp_path / "r.jsonl"
    code, out, _ = perf_main(capsys, "-b", f"{path}:Interpreted", "-o", "ROPE",
                             "--results", str(results))
    assert code == 0
    records = read_records(results)
    assert records and all(r["status"] == "UNSUPPORTED" and r["perf"] is None for r in records)
    assert "interpreter" in records[0]["reason"]
    assert "UNSUPPORTED (interpreter mode" in out


def test_nan_output_is_an_error_not_a_fast_time(tmp_path, capsys):
    path = backend_file(tmp_path, """
        class SkipsCopies(CpuBackend):
            name = "skips"

            def cpy(self, src, out, perm, step=1, stream=None):
                pass  # the output keeps its NaN poison
        """)
    results = tmp_path / "r.jsonl"
    code, out, _ = perf_main(capsys, "-b", f"{path}:SkipsCopies", "-o", "CPY",
                             "--results", str(results))
    assert code == 1
    records = read_records(results)
    assert records and all(r["status"] == "ERROR" and r["perf"] is None for r in records)
    assert "NaN" in records[0]["reason"] and "ERROR" in out


@pytest.mark.parametrize("argv, message", [
    (["-o", "NOPE"], "unknown op"),
    (["-p", "("], "bad regular expression"),
    (["-p", "no-such-case"], "no perf case"),
    (["--budget-ms", "-1"], "--budget-ms"),
    (["--min-samples", "0"], "--min-samples"),
    (["-b", "nosuch"], "unknown backend"),
    (["-b", "cpu:nosuch=1"], "unknown cpu backend option"),
    (["-b", "cpu:=1"], "is not opt=value"),
    (["--output", "junit"], "junit"),
    (["--ab", "cpu", "cpu", "--threshold", "5"], "--threshold"),
    (["--sizes", "huge"], "invalid choice"),
    (["--pin-cpu", "lots"], "--pin-cpu"),
    (["-j", "2"], "one case at a time"),
    (["--epochs", "0"], "--epochs"),
    (["--settle-ms", "-2"], "--settle-ms"),
    (["--settle-ms", "nan"], "--settle-ms"),
    (["--settle-ms", "inf"], "--settle-ms"),
    (["--pin-cpu", "4096"], "not one of this process's CPUs"),
    (["--executor", "ray"], "this machine's measured ceilings"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = perf_main(capsys, "-o", "CPY", *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


# -- A/B ------------------------------------------------------------------------------------------
def test_ab_interleaves_both_sides_into_one_run_and_prints_ratios(tmp_path, capsys):
    results = tmp_path / "ab.jsonl"
    code, out, _ = perf_main(capsys, "-o", "ROPE", "--ab", "cpu", "cpu:rope_cache=off",
                             "--results", str(results), "--pin-cpu", "none")
    assert code == 0
    records = read_records(results)
    assert {r["backend"] for r in records} == {"cpu", "cpu:rope_cache=off"}
    assert len({r["run_id"] for r in records}) == 1
    assert all(r["perf"]["n"] >= 3 for r in records)
    assert "B/A ratio of q0.2 times" in out  # the gate's quantile unless --quantile says
    assert {r["perf"]["settle_ms"] for r in records} == {0.0}  # said, for a reader of the run
    table = [line for line in out.splitlines() if re.match(r"^\s+\d+\.\d{3} +\[", line)]
    assert len(table) == len(records) // 2
    assert all(re.search(r"(regression|improvement|unchanged|not significant)", t) for t in table)


def test_ab_of_one_backend_with_itself_gets_distinct_names():
    assert ab_labels("cpu", "cpu") == ("cpu#A", "cpu#B")
    assert ab_labels("cpu", "cpu:jit=0") == ("cpu", "cpu:jit=0")


def test_split_ref_keeps_class_references_and_parses_options():
    assert split_ref("cpu") == ("cpu", {})
    assert split_ref("path/file.py:Class") == ("path/file.py:Class", {})
    assert split_ref("pkg.mod:Class") == ("pkg.mod:Class", {})
    assert split_ref("cpu:rope_cache=off,delay_max_ms=1.5") == (
        "cpu", {"rope_cache": "off", "delay_max_ms": 1.5})
    assert split_ref("dir/f.py:C:jit=0") == ("dir/f.py:C", {"jit": 0})
    with pytest.raises(UsageError):
        split_ref("cpu:jit=1,oops")


def test_refusal_reports_unsupported_ops():
    from opbench.protocol import Backend

    class NoOps(Backend):  # the harness reads declared abilities (is_interpreter) off Backend
        name = "none"

        def supports(self, case):
            return "none does not implement ROPE"

    assert perf.refusal(NoOps(), Case.make("ROPE")) == "none does not implement ROPE"


def test_ab_pins_to_one_cpu_by_default_and_gives_the_cpus_back(monkeypatch, capsys):
    calls = []
    original = os.sched_getaffinity(0)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: calls.append(set(cpus)))
    code, _, _ = perf_main(capsys, "-o", "CPY", "-p", "type=f16", "--ab", "cpu", "cpu")
    assert code == 0
    assert calls == [{max(original)}, set(original)]  # pinned for the run, then restored
    calls.clear()
    perf_main(capsys, "-o", "CPY", "-p", "type=f16")
    assert calls == [set(original)]  # plain perf does not pin; the restore is harmless


def test_ab_epochs_allocate_fresh_buffers_and_pool_their_samples(monkeypatch):
    from opbench.cli.perf import open_for_timing

    prepares = []
    real_prepare = perf.prepare
    monkeypatch.setattr(perf, "prepare",
                        lambda backend, case, seed=0: prepares.append(backend) or
                        real_prepare(backend, case, seed))
    sides = {"A": open_for_timing("cpu")[0], "B": open_for_timing("cpu")[0]}
    options = perf.PerfOptions(budget_ms=1, min_samples=6, warmup=0, epochs=3)
    try:
        records = perf.run_ab_case(sides, perf.perf_cases("small")[0], options, "run")
    finally:
        for backend in sides.values():
            backend.close()
    assert len(prepares) == 6  # 3 epochs x 2 sides
    assert all(r["status"] == "OK" and r["perf"]["n"] >= 6 for r in records.values())
    assert records["A"]["perf"]["n"] == len(records["A"]["perf"]["samples_ns"])


def test_perf_and_test_share_one_emitter(capsys):
    """Both verbs' csv and json come from cli.output.emit: the same leading columns and keys,
    perf adding its statistics."""
    perf_csv = perf_main(capsys, "-o", "CPY", "--output", "csv")[1].splitlines()[0].split(",")
    assert main(["test", "-o", "CPY", "--quick", "--output", "csv"]) == 0
    test_csv = capsys.readouterr().out.splitlines()[0].split(",")
    assert perf_csv[:len(test_csv)] == test_csv and "median_ns" in perf_csv[len(test_csv):]
    (perf_row, *_) = json.loads(perf_main(capsys, "-o", "CPY", "--output", "json")[1])
    assert main(["test", "-o", "CPY", "-p", "f32.*f16", "--quick", "--output", "json"]) == 0
    (test_row, *_) = json.loads(capsys.readouterr().out)
    assert set(perf_row) == set(test_row) | {"perf"}


class Declares:
    def __init__(self, threads):
        self.threads = threads

    def info(self):
        if self.threads == "broken":
            raise RuntimeError("info is best effort")
        return {"threads": self.threads}


@pytest.mark.parametrize("declared, running, needs", [
    (8, 3, 8), (2, 2, 2), ("cpus", 3, 1), (None, 1, 1), (0, 1, 1), ("broken", 1, 1)])
def test_running_threads_follow_the_declaration_within_the_cpus(monkeypatch, declared,
                                                               running, needs):
    monkeypatch.setattr(perf, "cpu_count", lambda: 3)
    assert perf.running_threads(Declares(declared)) == running
    assert perf.compute_threads(Declares(declared)) == needs  # what --ab pins CPUs for


class _CountingBuffer:
    """Stands in for the host flush's buffer: counts the writes ``flush_host_caches`` makes."""

    def __init__(self):
        self.writes = 0

    def __iadd__(self, value):
        self.writes += 1
        return self


@pytest.mark.parametrize("name", ["cpu", "ggml", "torch"])
def test_cold_perf_on_a_host_backend_flushes_the_host_before_every_sample(name, monkeypatch):
    from opbench.backends.common import host
    from opbench.harness.registry import open_backend

    if name != "cpu":
        pytest.importorskip({"ggml": "ggml", "torch": "torch"}[name])
    counter = _CountingBuffer()
    monkeypatch.setattr(host, "_flush_buffer", counter)
    backend = open_backend(name)
    try:
        options = perf.PerfOptions(budget_ms=5, min_samples=4, warmup=2, cold=True)
        record = perf.run_perf_case(backend, cpy_case("f32", "f16", (64, 4, 64)), options, "r")
        warm = perf.run_perf_case(backend, cpy_case("f32", "f16", (64, 4, 64)),
                                  perf.PerfOptions(budget_ms=5, min_samples=4), "r")
    finally:
        backend.close()
    assert record["status"] == "OK" and warm["status"] == "OK"
    assert counter.writes == len(record["perf"]["samples_ns"]) >= 4  # none for the warm run
    assert record["perf"]["cold"] and not warm["perf"]["cold"]  # the record says which


def test_a_host_flush_rewrites_twice_the_last_level_cache(monkeypatch):
    from opbench.backends.common import host

    monkeypatch.setattr(host, "last_level_cache_bytes", lambda: 2**20)
    monkeypatch.setattr(host, "_flush_buffer", None)
    host.flush_host_caches()
    first = host._flush_buffer
    assert first.nbytes == 2 * 2**20 and np.all(first == 1)  # every byte written
    host.flush_host_caches()
    assert host._flush_buffer is first and np.all(first == 2)  # allocated once
    monkeypatch.setattr(host, "last_level_cache_bytes", lambda: None)
    monkeypatch.setattr(host, "ASSUMED_LLC_BYTES", 3 * 2**19)
    monkeypatch.setattr(host, "_flush_buffer", None)
    host.flush_host_caches()
    assert host._flush_buffer.nbytes == 3 * 2**20  # size unknown: the fallback
