"""Where a small case's time goes: the backend op against the rest of ``run_case``, with the
thread runtime's inline fast path on and off, interleaved in one process.

    PYTHONPATH=. python benchmarks/case_overhead.py --per-op 40 --rounds 5

Picks up to ``--per-op`` seeded cases per op whose inputs hold at most ``--max-elements``
values, warms them up once, then runs every case with the fast path off and on, back to back
in a seeded random order (so a neighbour's load hits both alike), for ``--rounds`` rounds.
"backend op" is the op's call plus ``synchronize``: the kernel and the hand-off to it; the
rest is inputs, oracle, upload, download, judging, record.  Per op, the "floor" is the part of
the rest that any harness judging against a seeded float64 oracle pays: seeding, drawing the
inputs, the oracle; where it alone exceeds the op, no trimming of the rest reaches 1x.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from opbench.harness import runner
from opbench.harness.records import new_run_id
from opbench.harness.registry import open_backend

OPS = ("ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS", "CPY")


def small_cases(per_op: int, max_elements: int) -> list:
    rng, chosen = np.random.default_rng(0), []
    for op in OPS:
        spec, picked = runner.SPECS[op], []
        table = spec.cases()
        for i in rng.permutation(len(table)):
            arrays = spec.make_inputs(table[i], np.random.default_rng(0)).arrays.values()
            if sum(np.asarray(a).size for a in arrays) <= max_elements:
                picked.append(table[i])
            if len(picked) == per_op:
                break
        chosen += picked
    return chosen


class OpClock:
    """Adds the time spent in every spec's ``call`` and the backend's ``synchronize``."""

    def __init__(self, backend) -> None:
        self.seconds = 0.0
        for op in OPS:
            runner.SPECS[op].call = self.timed(runner.SPECS[op].call)
        backend.synchronize = self.timed(backend.synchronize)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


RUN_ID = new_run_id()  # one per run, as the CLI's workers pass it (not one per case)


def run_timed(backend, clock: OpClock, case, fast: bool) -> tuple[float, float]:
    backend.runtime.INLINE_FAST_PATH = fast
    backend.synchronize()  # applies the switch (the stream is drained)
    clock.seconds, start = 0.0, time.perf_counter()
    runner.run_case(backend, case, run_id=RUN_ID)
    return time.perf_counter() - start, clock.seconds


def floor_seconds(case) -> tuple[float, float]:
    """The part of the rest no oracle-judged harness can skip: (seeding the case's generator
    and drawing its inputs, computing the float64 oracle)."""
    spec, start = runner.SPECS[case.op], time.perf_counter()
    inputs = spec.make_inputs(case, np.random.default_rng(case.seed(0)))
    drawn = time.perf_counter()
    spec.reference(case, inputs, np.float64)
    return drawn - start, time.perf_counter() - drawn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-op", type=int, default=40)
    p.add_argument("--max-elements", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    cases = small_cases(args.per_op, args.max_elements)
    backend = open_backend("cpu")
    for case in cases:  # warm-up: numba loads its kernels, caches fill
        runner.run_case(backend, case, run_id=RUN_ID)
    clock = OpClock(backend)
    order = np.random.default_rng(1)
    totals = {False: np.zeros((args.rounds, 2)), True: np.zeros((args.rounds, 2))}
    by_op = {op: np.zeros((args.rounds, 4)) for op in OPS}  # inline: total, op, draw, oracle
    for r in range(args.rounds):
        for case in cases:  # both modes back to back, in a seeded random order
            for fast in order.permutation([False, True]):
                timed = run_timed(backend, clock, case, bool(fast))
                totals[bool(fast)][r] += timed
                if fast:
                    by_op[case.op][r, :2] += timed
            by_op[case.op][r, 2:] += floor_seconds(case)
    backend.close()
    n = len(cases)
    print(f"{n} small cases (<= {args.max_elements} input values), {args.rounds} rounds, both "
          f"modes per case in random order; medians over rounds; load {os.getloadavg()[0]:.1f}")
    for fast, label in ((False, "worker threads"), (True, "inline fast path")):
        total, op = (np.median(totals[fast][:, i]) / n * 1e3 for i in (0, 1))
        print(f"  {label:16s}: {total:6.3f} ms a case, backend op {op:6.3f} ms, the rest "
              f"{total - op:6.3f} ms ({(total - op) / op:.2f}x the op)")
    print("per op, inline (ms a case); floor = draw (seeding, drawing the inputs) + the float64 "
          "oracle, the part of the rest no oracle-judged harness skips:")
    print(f"  {'op':10s} {'cases':>5s} {'op':>7s} {'rest':>7s} {'rest/op':>8s} {'draw':>7s} "
          f"{'oracle':>7s} {'floor/op':>8s}")
    for name in OPS:
        count = sum(case.op == name for case in cases)
        if not count:
            continue
        total, op, draw, oracle = (np.median(by_op[name][:, i]) / count * 1e3 for i in range(4))
        print(f"  {name:10s} {count:5d} {op:7.3f} {total - op:7.3f} {(total - op) / op:8.2f} "
              f"{draw:7.3f} {oracle:7.3f} {(draw + oracle) / op:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
