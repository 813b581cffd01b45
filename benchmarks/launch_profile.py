"""Where a backend's host time per call goes: the enqueue of one perf case, profiled.

On a GPU a small op's call is mostly the host's work: checks, argument packing, a JIT's
launcher, torch's dispatcher (the fourth H200 run: Triton's 16 MiB copy took torch's time plus
~55 us, all before the kernel started). For each backend and case this enqueues the call
``--calls`` times, synchronizing every ``--calls // 10`` calls so no queue fills, and prints
the mean host time of one enqueue and the functions that took most of it (cProfile, by own
time). Cases are picked by a regular expression on their perf case ids.

    python benchmarks/launch_profile.py -b cupy,torch,triton -c '^CPY.*perm=\\[0,1,2\\]'
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import sys
import time

from opbench.harness.registry import open_backend, split_backend_list
from opbench.perf.run import perf_cases, prepare


def cases_matching(pattern: str, sizes: str) -> list:
    wanted = re.compile(pattern)
    found = [case for case in perf_cases(sizes) if wanted.search(case.id)]
    if not found:
        raise SystemExit(f"error: no {sizes} perf case matches {pattern!r}")
    return found


def enqueue_times(fn, sync, calls: int) -> float:
    """Mean host nanoseconds of one enqueue, the synchronizations outside the clock."""
    batch, total = max(1, calls // 10), 0
    for done in range(0, calls, batch):
        start = time.perf_counter_ns()
        for _ in range(min(batch, calls - done)):
            fn()
        total += time.perf_counter_ns() - start
        sync()
    return total / calls


def profile(fn, sync, calls: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    enqueue_times(fn, sync, calls)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:])


def run_backend(name: str, cases: list, calls: int, top: int) -> None:
    backend = open_backend(name)
    try:
        for case in cases:
            prepared = prepare(backend, case)
            sync = backend.synchronize
            for _ in range(3):  # compile and load outside the clock
                prepared.fn()
            sync()
            mean_ns = enqueue_times(prepared.fn, sync, calls)
            print(f"\n## {name}: {case.id}\n\nhost time per enqueue: {mean_ns / 1e3:.1f} us "
                  f"(mean of {calls})\n")
            print(profile(prepared.fn, sync, calls, top))
    finally:
        backend.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", "--backends", default="cpu", help="comma-separated backend names")
    parser.add_argument("-c", "--cases", default=r"^CPY", help="regular expression on case ids")
    parser.add_argument("--sizes", default="full", help="perf case sizes: full or small")
    parser.add_argument("--calls", type=int, default=500, help="enqueues timed and profiled")
    parser.add_argument("--top", type=int, default=15, help="functions listed per case")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    cases = cases_matching(args.cases, args.sizes)
    for name in split_backend_list(args.backends):
        run_backend(name, cases, args.calls, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
