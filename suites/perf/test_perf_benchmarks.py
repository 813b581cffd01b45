"""One pytest-benchmark per perf case, on the backend of ``--backend`` (suites/conftest.py).

The timed target is the backend call *and* its synchronize (the cpu timer's rule: a call is
done when its queued work is); inputs and outputs are allocated once per case by
``perf.prepare`` and the NaN check runs before timing, as in ``opbench perf``."""

from __future__ import annotations

import pytest

from opbench.perf import run as perf
from opbench.perf import timing


def test_perf(benchmark, backend, perf_case):
    reason = perf.refusal(backend, perf_case)
    if reason:
        pytest.skip(reason)
    prepared = perf.prepare(backend, perf_case)
    problem = perf.nan_problem(backend, prepared)
    assert problem is None, problem
    device = perf.device_of(backend)

    def call() -> None:
        prepared.fn()
        backend.synchronize(device)

    benchmark.extra_info.update(case_id=perf_case.id, backend=backend.name,
                                bytes=prepared.nbytes, flops=prepared.flops)
    benchmark.pedantic(call, setup=lambda: backend.synchronize(device), rounds=_rounds(benchmark),
                       iterations=1, warmup_rounds=timing.DEFAULT_WARMUP)
    if not benchmark.disabled:
        _device_time(benchmark, backend, prepared)


def _rounds(benchmark) -> int:
    return 1 if benchmark.disabled else timing.DEFAULT_MIN_SAMPLES


def _device_time(benchmark, backend, prepared) -> None:
    """The backend's own timer (the cpu backend's measures device time) beside the wall clock."""
    subject = perf.subject_for(backend, prepared, perf.PerfOptions())
    samples = timing.measure(subject.fn, sync=subject.sync, timer=subject.timer, warmup=1,
                             budget_ms=200, min_samples=20)
    block = timing.perf_block(samples, nbytes=prepared.nbytes or None,
                              flops=prepared.flops or None)
    benchmark.extra_info.update(device_median_ns=block["median_ns"], gbps=block["gbps"],
                                gflops=block["gflops"])
