"""perf --ab pins both sides to one CPU set with as many CPUs as the more threaded side runs
threads, records where each side ran, and refuses a pinning that would oversubscribe."""

from __future__ import annotations

import os

import pytest

from opbench.cli.main import main
from opbench.cli.pinning import compute_threads, pin_for_ab
from opbench.errors import UsageError
from opbench.harness import store

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity")


@pytest.fixture
def restore_affinity():
    before = os.sched_getaffinity(0)
    yield sorted(before)
    os.sched_setaffinity(0, before)


class Threaded:
    def __init__(self, threads):
        self.threads = threads

    def info(self):
        return {"threads": self.threads}


def test_compute_threads_reads_the_declared_count():
    assert compute_threads(Threaded(3)) == 3 and compute_threads(Threaded(None)) == 1


def test_the_set_has_as_many_cpus_as_the_most_threaded_side(restore_affinity):
    allowed = restore_affinity
    cpus = pin_for_ab("auto", {"a": 1, "b": len(allowed)})
    assert cpus == allowed and sorted(os.sched_getaffinity(0)) == allowed
    assert pin_for_ab("auto", {"a": 1, "b": 1}) == allowed[-1:]


def test_a_side_with_more_threads_than_cpus_is_refused(restore_affinity):
    allowed = restore_affinity
    with pytest.raises(UsageError, match="b computes with .* threads but gets 1 CPU"):
        pin_for_ab(str(allowed[0]), {"a": 1, "b": 2})
    with pytest.raises(UsageError, match="would fight"):
        pin_for_ab("auto", {"a": len(allowed) + 1, "b": 1})
    assert sorted(os.sched_getaffinity(0)) == allowed  # refused: nothing pinned


def test_ab_records_say_where_each_side_ran(tmp_path, restore_affinity):
    results = tmp_path / "ab.jsonl"
    assert main(["perf", "--ab", "cpu", "cpu", "-o", "GET_ROWS", "--sizes", "small",
                 "--budget-ms", "1", "--min-samples", "3", "--warmup", "1", "--no-calibrate",
                 "--results", str(results)]) == 0
    for record in store.read_records(results):
        assert record["perf"]["threads"] == 1
        assert record["perf"]["cpu_set"] == restore_affinity[-1:]
