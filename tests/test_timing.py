"""Timing (against a fake clock: no wall-clock assertions), throughput, and calibrate."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.perf import calibrate, timing


class FakeClock:
    """Stands in for perf_counter_ns; the code under test advances it by 'doing work'."""

    def __init__(self) -> None:
        self.now = 1_000_000
        self.log: list[str] = []

    def __call__(self) -> int:
        return self.now

    def work(self, name: str, ns: int):
        def run() -> None:
            self.log.append(name)
            self.now += ns
        return run


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter_ns", fake)
    return fake


def test_default_timer_includes_the_synchronization(clock):
    # an async backend returns at once and does the work in sync(): that time must count
    samples = timing.measure(clock.work("fn", 100), sync=clock.work("sync", 900), warmup=2,
                             budget_ms=0, min_samples=5)
    assert list(samples.ns) == [1000] * 5
    # warm-up: 2 calls then one sync; then call+sync per sample
    assert clock.log[:3] == ["fn", "fn", "sync"]
    assert clock.log[3:] == ["fn", "sync"] * 5


def test_repeats_until_the_budget_is_spent(clock):
    samples = timing.measure(clock.work("fn", 1_000_000), sync=lambda: None, warmup=0,
                             budget_ms=10, min_samples=3)
    assert len(samples) == 10 and samples.budget_ms == 10


def test_min_and_max_samples_bound_the_count(clock):
    slow = timing.measure(clock.work("fn", 50_000_000), sync=lambda: None, warmup=0,
                          budget_ms=10, min_samples=4)
    assert len(slow) == 4  # budget spent after one sample, min_samples still honoured
    fast = timing.measure(clock.work("fn", 1), sync=lambda: None, warmup=0,
                          budget_ms=1000, min_samples=2, max_samples=7)
    assert len(fast) == 7


def test_flush_runs_untimed_before_every_sample_and_backend_timer_is_used(clock):
    flush = clock.work("flush", 10_000_000)  # expensive, but outside the timed region
    samples = timing.measure(clock.work("fn", 5), sync=lambda: None, warmup=0, budget_ms=0,
                             min_samples=3, flush=flush, timer=lambda fn: (fn(), 42.0)[1])
    assert list(samples.ns) == [42, 42, 42]
    assert clock.log == ["flush", "fn"] * 3


@pytest.mark.parametrize("kw, message", [
    ({"budget_ms": -1}, "budget_ms=-1"),
    ({"min_samples": 0}, "min_samples=0"),
    ({"min_samples": 5, "max_samples": 2}, "max_samples=2 must be >= min_samples=5"),
])
def test_bad_limits_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        timing.measure(lambda: None, sync=lambda: None, **kw)


def test_interleaved_rounds_alternate_subjects(clock):
    subjects = {
        "A": timing.Subject(clock.work("A", 1000), lambda: None),
        "B": timing.Subject(clock.work("B", 2000), lambda: None),
    }
    result = timing.measure_interleaved(subjects, warmup=1, budget_ms=0, min_samples=20,
                                        per_round=2, seed=0)
    assert list(result["A"].ns) == [1000] * 20 and list(result["B"].ns) == [2000] * 20
    timed = clock.log[2:]  # after one warm-up call each
    runs = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert all(run[0] == run[1] for run in runs)  # blocks of per_round
    rounds = [sorted(a[0] + b[0]) for a, b in zip(runs[::2], runs[1::2])]
    assert rounds == [["A", "B"]] * 10  # every round times both, in a shuffled order
    assert {run[0] for run in runs[::2]} == {"A", "B"}  # the order is not fixed


def test_interleaved_subjects_settle_before_each_change_outside_the_budget(clock, monkeypatch):
    """With settle_ms the clock idles before a batch whenever the subject changes (never
    between batches of one subject), and the idle time does not use up the budget."""
    def sleep(seconds):
        clock.log.append(f"idle {seconds * 1e3:g}")
        clock.now += int(seconds * 1e9)

    monkeypatch.setattr(timing.time, "sleep", sleep)
    subjects = {"A": timing.Subject(clock.work("A", 1000), lambda: None),
                "B": timing.Subject(clock.work("B", 1000), lambda: None)}
    result = timing.measure_interleaved(subjects, warmup=0, budget_ms=0.01, min_samples=1,
                                        per_round=2, seed=0, settle_ms=3)
    # 0.01 ms a subject: 10 samples each, however long the idles (3 ms each) took
    assert len(result["A"].ns) == len(result["B"].ns) == 10
    for before, after in zip(clock.log, clock.log[1:]):
        if after in ("A", "B") and before in ("A", "B"):
            assert before == after  # no change of subject without an idle between
    idles = [i for i, entry in enumerate(clock.log) if entry.startswith("idle")]
    assert clock.log[idles[0]] == "idle 3" and len(idles) >= 5
    assert all(clock.log[i + 1] != clock.log[i - 1] for i in idles[1:])  # only at a change
    with pytest.raises(ValueError, match="settle_ms=-1"):
        timing.measure_interleaved(subjects, settle_ms=-1)


def test_after_settling_a_subject_warms_up_again_untimed_and_outside_the_budget(clock,
                                                                              monkeypatch):
    """The idle puts the subject's own threads (and an idle CPU) to sleep too: its first calls
    after it wake them.  They run untimed, ``warmup`` of them, and do not use up the budget."""
    monkeypatch.setattr(timing.time, "sleep",
                        lambda seconds: clock.log.append("idle") or None)
    subjects = {name: timing.Subject(clock.work(name, 1000), clock.work(f"sync {name}", 0))
                for name in ("A", "B")}
    result = timing.measure_interleaved(subjects, warmup=2, budget_ms=0.01, min_samples=1,
                                        per_round=2, seed=0, settle_ms=3)
    assert len(result["A"].ns) == len(result["B"].ns) == 10  # as many as without re-warming
    assert all(ns == 1000 for name in "AB" for ns in result[name].ns)
    idles = [i for i, entry in enumerate(clock.log) if entry == "idle"]
    assert len(idles) >= 5
    for i in idles:  # two untimed calls and a sync, then the batch: two timed calls
        name = clock.log[i + 1]
        assert clock.log[i + 1:i + 4] == [name, name, f"sync {name}"]
        assert clock.log[i + 4:i + 8] == [name, f"sync {name}"] * 2


def test_summarize():
    stats = timing.summarize(np.array([10, 20, 30, 40, 1000]))
    assert stats["median_ns"] == 30 and stats["n"] == 5
    assert stats["q1_ns"] == 20 and stats["q3_ns"] == 40 and stats["iqr_ns"] == 20
    assert stats["min_ns"] == 10 and stats["max_ns"] == 1000
    with pytest.raises(ValueError, match="zero samples"):
        timing.summarize([])


def test_throughput_and_roofline_bound():
    ceilings = {"copy_gbps": 20.0, "matmul_gflops": 400.0}
    # 1 MB in 100 us = 10 GB/s; 1 MFLOP is nothing: memory-bound at 50% of copy bandwidth
    memory = timing.throughput(100_000, nbytes=10**6, flops=10**6, ceilings=ceilings)
    assert memory["gbps"] == pytest.approx(10.0) and memory["gflops"] == pytest.approx(10.0)
    assert memory["bound"] == "memory" and memory["fraction_of_ceiling"] == pytest.approx(0.5)
    # 1 GFLOP over 1 MB in 10 ms: 100 GFLOP/s, compute-bound at 25% of the GEMM rate
    compute = timing.throughput(10**7, nbytes=10**6, flops=10**9, ceilings=ceilings)
    assert compute["bound"] == "compute" and compute["fraction_of_ceiling"] == pytest.approx(0.25)
    bare = timing.throughput(1000, nbytes=1000)
    assert bare["gbps"] == pytest.approx(1.0) and bare["fraction_of_ceiling"] is None
    with pytest.raises(ValueError, match="median_ns=0"):
        timing.throughput(0, nbytes=1)


def test_perf_block_keeps_every_sample():
    samples = timing.Samples(np.array([100, 300, 200], dtype=np.int64), warmup=2, budget_ms=5)
    block = timing.perf_block(samples, nbytes=200, ceilings={"copy_gbps": 2.0})
    assert block["samples_ns"] == [100, 300, 200] and block["median_ns"] == 200
    assert block["gbps"] == pytest.approx(1.0)
    assert block["fraction_of_ceiling"] == pytest.approx(0.5)
    json.dumps(block)  # storable as is


# -- calibrate -----------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_measure(threads, copy_bytes, matmul_n, budget_ms=1000.0):
        calls.append((copy_bytes, matmul_n))
        return {"copy_gbps": 10.0 + len(calls), "matmul_gflops": 100.0 * threads,
                "threads": threads}

    monkeypatch.setattr(calibrate, "measure_with_threads", fake_measure)
    monkeypatch.setattr(calibrate, "cpu_count", lambda: 2)
    return calls


def test_ceilings_are_measured_once_and_cached_per_cpu(cache, tmp_path):
    assert calibrate.load_ceilings(measure_if_missing=False) is None
    first = calibrate.load_ceilings()
    # one core, then all (2) cores; the top-level rates are all cores'
    assert first["one_core"]["copy_gbps"] == 11.0 and first["all_cores"]["copy_gbps"] == 12.0
    assert first["copy_gbps"] == 12.0 and first["all_cores"]["threads"] == 2
    assert calibrate.load_ceilings() == first and len(cache) == 2
    stored = json.loads((tmp_path / "cache" / "ceilings.json").read_text())
    assert list(stored) == [calibrate.records.cpu_model()]
    assert stored[calibrate.records.cpu_model()]["one_core"]["matmul_gflops"] == 100.0
    assert calibrate.calibrate(force=True)["one_core"]["copy_gbps"] == 13.0 and len(cache) == 4


def test_an_older_one_core_cache_entry_is_measured_again(cache, tmp_path, capsys):
    path = tmp_path / "cache" / "ceilings.json"
    path.parent.mkdir()
    path.write_text(json.dumps({calibrate.records.cpu_model(): {"copy_gbps": 27.6,
                                                                "matmul_gflops": 76.4}}))
    assert calibrate.load_ceilings(measure_if_missing=False) is None
    assert calibrate.stale_entry()
    assert main(["perf", "--sizes", "small", "-o", "CPY", "-p", "type=f16", "--budget-ms",
                 "1", "--min-samples", "3", "--warmup", "1", "--no-calibrate"]) == 0
    assert capsys.readouterr().err == (
        "opbench: the ceilings cache holds an older opbench's figures (one core only, or a "
        "copy ceiling without streaming stores); run `opbench calibrate` for fractions of "
        "the ceilings\n")
    assert calibrate.load_ceilings()["one_core"]["copy_gbps"] == 11.0 and len(cache) == 2
    assert not calibrate.stale_entry()


def test_a_copy_ceiling_of_np_copyto_alone_is_measured_again(cache, tmp_path):
    """An entry from before the streaming copy: a streaming copy would read as faster than
    the machine against it."""
    path = tmp_path / "cache" / "ceilings.json"
    path.parent.mkdir()
    rates = {"copy_gbps": 27.6, "matmul_gflops": 76.4}
    path.write_text(json.dumps({calibrate.records.cpu_model(): {
        **rates, "one_core": rates, "all_cores": {**rates, "threads": 2}}}))
    assert calibrate.load_ceilings(measure_if_missing=False) is None and calibrate.stale_entry()
    fresh = calibrate.load_ceilings()
    assert fresh["one_core"]["copy_gbps"] == 11.0 and "copies" in fresh and len(cache) == 2


def test_the_copy_ceiling_is_the_faster_of_the_ways_to_copy(monkeypatch):
    import time

    def slow_copy(dst, src):
        time.sleep(0.004)
        np.copyto(dst, src)

    seen = []
    monkeypatch.setattr(calibrate, "ceiling_copies", lambda: {"slow": slow_copy,
                                                      "fast": lambda d, s: seen.append(1)})
    rate = calibrate.measure_copy_bandwidth(2**20, budget_ms=20, threads=2)
    assert seen and rate > 2 * 2**20 / 4e6  # above what the slow copy can reach: the fast one


def test_cli_calibrate(cache, tmp_path, capsys):
    assert main(["calibrate", "--copy-mib", "8", "--matmul-n", "128"]) == 0
    assert cache == [(8 * 2**20, 128)] * 2
    out = capsys.readouterr().out
    assert "copy bandwidth: 11.00 GB/s on 1 core, 12.00 GB/s on 2 cores" in out
    assert "matmul rate:    100.00 GFLOP/s on 1 core, 200.00 GFLOP/s on 2 cores" in out
    assert "busy" not in out
    assert main(["calibrate", "--json"]) == 0 and len(cache) == 2  # cached
    assert json.loads(capsys.readouterr().out)["matmul_gflops"] == 200.0


def test_corrupt_cache_is_a_usage_error_until_forced(cache, tmp_path, capsys):
    path = tmp_path / "cache" / "ceilings.json"
    path.parent.mkdir()
    path.write_text("{broken")
    assert main(["calibrate"]) == 2
    assert "run `opbench calibrate --force`" in capsys.readouterr().err
    assert main(["calibrate", "--force"]) == 0
    assert calibrate.load_ceilings(measure_if_missing=False)["copy_gbps"] == 12.0


def test_cli_calibrate_says_when_all_cores_measured_below_one(cache, monkeypatch, capsys):
    monkeypatch.setattr(calibrate, "measure_with_threads", lambda threads, *sizes: {
        "copy_gbps": 10.0 / threads, "matmul_gflops": 50.0, "threads": threads})
    assert main(["calibrate"]) == 0
    assert "note: 2 cores measured below one core: the machine was busy" in (
        capsys.readouterr().out)
    assert calibrate.load_ceilings()["copy_gbps"] == 10.0  # the machine's: the higher


def test_real_measurements_are_positive_rates():
    # tiny sizes: checks the arithmetic runs end to end, not the machine's speed
    assert np.isfinite(calibrate.measure_copy_bandwidth(2**20, budget_ms=5)) > 0
    assert calibrate.measure_copy_bandwidth(2**20, budget_ms=5, threads=3) > 0
    assert calibrate.measure_matmul_rate(64, budget_ms=5) > 0
    measured = calibrate.measure_with_threads(2, 2**20, 64, budget_ms=5)  # a fresh interpreter
    assert measured["threads"] == 2 and all(measured[rate] > 0 for rate in calibrate.RATES)


def test_the_last_level_cache_is_read_from_the_os():
    llc = calibrate.last_level_cache_bytes()
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache/index0"):
        assert llc is not None and llc >= 2**16
    assert calibrate.last_level_cache_bytes(cpu=10**6) is None  # no such CPU: unknown


CALIBRATION = {"one_core": {"copy_gbps": 10.0, "matmul_gflops": 50.0},
               "all_cores": {"copy_gbps": 16.0, "matmul_gflops": 180.0, "threads": 4},
               "llc_bytes": 2**20}


@pytest.mark.parametrize("threads, copy, matmul", [
    (1, 10.0, 50.0),  # one thread: one core's
    (2, 16.0, 100.0),  # no more than two cores' worth, nor than all cores'
    (4, 16.0, 180.0), (64, 16.0, 180.0),  # all cores, however many threads
])
def test_the_ceiling_follows_the_backends_threads(threads, copy, matmul):
    ceilings = calibrate.ceilings_for(CALIBRATION, threads)
    assert (ceilings["copy_gbps"], ceilings["matmul_gflops"]) == (copy, matmul)
    assert ceilings["threads"] == min(threads, 4) and ceilings["llc_bytes"] == 2**20


def test_a_noisy_all_core_figure_below_one_core_is_no_tighter_bound():
    noisy = {**CALIBRATION, "all_cores": {"copy_gbps": 8.0, "matmul_gflops": 40.0, "threads": 2}}
    assert calibrate.ceilings_for(noisy, 2)["copy_gbps"] == 10.0
    assert calibrate.ceilings_for({"copy_gbps": 3.0}, 8) == {"copy_gbps": 3.0}  # flat: as is
    assert calibrate.ceilings_for(None, 8) is None


def test_beyond_the_copy_ceiling_or_within_the_cache_is_cache_resident():
    ceilings = calibrate.ceilings_for(CALIBRATION, 1)
    # 768 kB (within the 1 MiB cache, above half of it) in 30 us: 26 GB/s, above the 10 GB/s
    # ceiling: it ran from cache
    above = timing.throughput(30_000, nbytes=3 * 2**18, ceilings=ceilings)
    assert above["cache_resident"] and above["fraction_of_ceiling"] is None
    # 512 kB fits half the cache: from cache, however slow
    small = timing.throughput(10**6, nbytes=2**19, ceilings=ceilings)
    assert small["cache_resident"] and small["fraction_of_ceiling"] is None
    # 768 kB does not: a fraction of the memory ceiling
    assert not timing.throughput(10**6, nbytes=3 * 2**18, ceilings=ceilings)["cache_resident"]
    # 8 MiB at 8.4 GB/s: from memory, 84% of the one-core ceiling
    memory = timing.throughput(10**6, nbytes=8 * 2**20, ceilings=ceilings)
    assert not memory["cache_resident"] and memory["fraction_of_ceiling"] == pytest.approx(
        0.839, abs=1e-3)
    assert memory["ceiling_threads"] == 1
    # 2 MiB (above the cache) at 21 GB/s: the ceiling is wrong, not the cache's doing
    beyond = timing.throughput(100_000, nbytes=2 * 2**20, ceilings=ceilings)
    assert beyond["above_ceiling"] and not beyond["cache_resident"]
    assert beyond["fraction_of_ceiling"] is None and not memory["above_ceiling"]
    # cold samples (the caches evicted before each) read from memory whatever their size
    cold = timing.throughput(10**6, nbytes=2**19, ceilings=ceilings, cold=True)
    assert not cold["cache_resident"] and cold["fraction_of_ceiling"] == pytest.approx(0.0524,
                                                                                     abs=1e-4)
    cold_fast = timing.throughput(30_000, nbytes=3 * 2**18, ceilings=ceilings, cold=True)
    assert cold_fast["above_ceiling"] and not cold_fast["cache_resident"]
    # compute-bound calls are never called cache-resident
    compute = timing.throughput(10**6, nbytes=2**19, flops=10**9, ceilings=ceilings)
    assert compute["bound"] == "compute" and not compute["cache_resident"]


def test_backend_subject_uses_the_backends_sync_timer_and_flush():
    calls = []

    class Fake:
        def synchronize(self, device=None):
            calls.append(("sync", device))

        def timer(self):
            return lambda fn: (fn(), 7.0)[1]

        def flush_l2(self):
            calls.append(("flush", None))

    subject = timing.backend_subject(Fake(), lambda: calls.append(("fn", None)), "dev1",
                                     cold=True)
    assert subject.time_once() == 7.0
    assert calls == [("flush", None), ("sync", "dev1"), ("fn", None)]
    warm = timing.backend_subject(Fake(), lambda: None)
    assert warm.flush is None
