"""COPY_ASYNC as an op of the case tables: the cpu backend passes every case, broken copies
fail the race cases under every run seed, and each gated clause catches its bug."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from opbench.backends.cpu import CpuBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.protocol import Runtime

sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))
from test_copy_async_contract import (  # noqa: E402
    CopyIgnoresSourceQueue,
    DestinationDoesNotWait,
    SynchronizeReturnsEarly,
)

SPEC = SPECS["COPY_ASYNC"]


def _run(backend_class, cases, run_seed=0):
    backend = backend_class()
    try:
        return {c.id: run_case(backend, c, run_seed=run_seed) for c in cases}
    finally:
        backend.close()


def test_cpu_backend_passes_the_quick_table():
    records = _run(CpuBackend, [c for c in SPEC.quick_cases() if c["n"] <= 4099])
    assert {r["status"] for r in records.values()} == {"OK"}, records


@pytest.mark.parametrize("bug", [CopyIgnoresSourceQueue, DestinationDoesNotWait])
def test_every_race_case_fails_a_copy_that_does_not_wait(bug):
    races = [c for c in SPEC.cases() if c["check"] == "race"]
    assert races
    for run_seed in (0, 1):
        records = _run(bug, races, run_seed)
        assert all(r["status"] == "FAIL" for r in records.values()), records


@pytest.mark.parametrize("bug,check", [(CopyIgnoresSourceQueue, "source"),
                                       (DestinationDoesNotWait, "dest_read"),
                                       (SynchronizeReturnsEarly, "sync")])
def test_gated_clause_catches_its_bug(bug, check):
    case = next(c for c in SPEC.cases() if c["check"] == check and c["n"] <= 4099)
    record = _run(bug, [case])[case.id]
    assert record["status"] == "FAIL" and record["reason"], record


def test_backend_without_hold_skips_gated_checks_with_the_reason():
    class NoHold(CpuBackend):
        def implements(self, method):
            return method != "hold" and super().implements(method)

    case = next(c for c in SPEC.cases() if c["check"] == "source")
    record = _run(NoHold, [case])[case.id]
    assert record["status"] == "UNSUPPORTED" and "hold()" in record["reason"]


def test_a_runtime_without_hold_makes_its_backend_skip_gated_checks():
    """Triton's cuda runtime has no hold(): its backend must report the gated checks
    UNSUPPORTED (the third H200 run raised NotImplementedError in 27 of them, ERROR)."""
    from opbench.backends.runtimes.threads import ThreadRuntime

    class NoHoldRuntime(ThreadRuntime):
        hold = Runtime.hold
        stalled = Runtime.stalled

    class OnNoHoldRuntime(CpuBackend):
        def __init__(self, **options):
            super().__init__(runtime=NoHoldRuntime(), **options)

    assert CpuBackend().implements("hold") and not OnNoHoldRuntime().implements("hold")
    assert OnNoHoldRuntime().implements("copy_async")
    cases = [c for c in SPEC.quick_cases() if c["check"] in ("source", "chain", "race")]
    records = _run(OnNoHoldRuntime, cases)
    for case in cases:
        want = "OK" if case["check"] == "race" else "UNSUPPORTED"
        assert records[case.id]["status"] == want, records[case.id]


def test_64_mib_cases_are_in_the_full_table_not_quick():
    largest = [c for c in SPEC.cases() if c["n"] == 1 << 24]
    assert {c["check"] for c in largest} == {"source", "dest_read", "host", "sync", "many",
                                             "chain"}
    assert not [c for c in SPEC.quick_cases() if c["n"] == 1 << 24]


@pytest.mark.parametrize("backend_class, check, status", [
    (CpuBackend, "many", "OK"),  # every size from one element to 64 MiB in flight at once
    (CopyIgnoresSourceQueue, "source", "FAIL"),
    (DestinationDoesNotWait, "dest_read", "FAIL"),
])
def test_64_mib_gated_cases(backend_class, check, status):
    case = next(c for c in SPEC.cases() if c["check"] == check and c["n"] == 1 << 24)
    record = _run(backend_class, [case])[case.id]
    assert record["status"] == status, record
