"""What ``--delay on`` buys: how often a timing-dependent race is caught, and at what cost.

    PYTHONPATH=. python benchmarks/delay_catch.py [--every-item]

The race: ``copy_async`` whose destination waits on an event the source stream recorded
*before* the copy, so the destination may read its buffer before the copy lands, or after,
depending on which thread runs first.  Every multi-device f32 ``gemma3`` scenario of the
matrix runs with that copy, with delays off and on (same split, toggles and seed), and a
correct backend runs the same scenarios for the time.  ``--every-item`` puts the sleep
before every queued item but event records (the placement before the segment rule), to
compare the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "bugzoo"))

import scenario_bugs  # noqa: E402

from opbench.backends.common.arrays import plain  # noqa: E402
from opbench.backends.cpu import CpuBackend  # noqa: E402
from opbench.backends.runtimes import threads  # noqa: E402
from opbench.harness.scenario.matrix import matrix  # noqa: E402


class RecordBeforeCopy(CpuBackend):
    """The destination waits for everything queued on the source before the copy, not the copy."""

    def copy_async(self, src, dst_device, stream=None):
        runtime = self.runtime
        dst = self.empty(src.shape, src.dtype, dst_device)
        source, target = plain(src), plain(dst)
        src_stream = runtime.stream(runtime.owner("src", src))
        dst_stream = runtime.stream(dst.device)
        dst_stream.wait(src_stream.record())
        src_stream.submit(lambda: np.copyto(target, source))
        return dst


def _run_sleeping_before_every_item(self) -> None:
    while True:
        work = self._queue.get()
        if work is threads._STOP:
            return
        self._current = work
        if self._delay is not None and not threads._is_event_set(work):
            self._delay.sleep()
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - as Stream._run
            self._keep_first(error)
        self._current = None
        self._finished += 1


def sweep(specs, bug) -> tuple[int, float]:
    caught, start = 0, time.perf_counter()
    for spec in specs:
        caught += not scenario_bugs.run_bug(bug, spec).ok
    return caught, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-item", action="store_true",
                        help="sleep before every queued item but event records")
    args = parser.parse_args()
    if args.every_item:
        threads.Stream._run = _run_sleeping_before_every_item
    scenario_bugs.BACKEND_BUGS = (*scenario_bugs.BACKEND_BUGS, RecordBeforeCopy)
    warnings.simplefilter("ignore", RuntimeWarning)  # NaN poison read by the racy runs
    specs = [s for s in matrix() if s.devices >= 2 and s.model == "gemma3"
             and s.kv_dtype == "f32" and not s.delay]
    for delay in (False, True):
        chosen = [dataclasses.replace(s, delay=delay) for s in specs]
        caught, racy_s = sweep(chosen, RecordBeforeCopy)
        _, correct_s = sweep(chosen, CpuBackend)
        print(f"delay {'on ' if delay else 'off'}: caught {caught}/{len(chosen)}; "
              f"correct backend {correct_s:.1f} s ({racy_s:.1f} s with the race)", flush=True)


if __name__ == "__main__":
    main()
