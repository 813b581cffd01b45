"""The anchor: a fixed piece of NumPy work timed right after every sample of a ``perf
--repeat`` run, so two separate invocations can be compared on a machine whose speed drifts.

On a shared machine a neighbour's job changes how fast *everything* runs, from moment to moment
and from one run to the next: on a 2-vCPU CI runner with one busy neighbour process the 20th
percentile of one small case moved 1.6-2x between fresh runs.  The anchor's work does not depend
on the code under test (it is NumPy's, with fixed inputs), so its time measures the machine at
that moment; dividing each sample by the anchor timed beside it takes the machine's drift out
and leaves the code's.  Measured on that runner (8 fresh runs, 9 small cases, cases timed
round-robin): the run-to-run coefficient of variation of each case's 20th percentile went from
16-20% (raw) to 2-5% (per-sample ratio to the anchor); a memory-only or compute-only anchor
alone left 4-8%, so the anchor does a bit of both.  ``opbench gate`` uses the ratios when every
run of both sides carries anchors (``stats.anchored_runs``); docs/ci.md has the figures.

The anchor only speaks for the host: only backends whose device is the CPU are anchored."""

from __future__ import annotations

import time

import numpy as np

#: memory-bound part: a 2 MiB copy (in the last-level cache of most machines, so it measures
#: the core's load/store speed, not DRAM another process may be saturating)
COPY_ELEMENTS = 256 * 1024
#: compute-bound part: a vectorized sine of 16 Ki doubles
SINE_ELEMENTS = 16 * 1024


class Anchor:
    """Call it to time the anchor's work once; it returns nanoseconds."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._copy_from = rng.random(COPY_ELEMENTS)
        self._copy_to = np.empty_like(self._copy_from)
        self._sine_of = rng.random(SINE_ELEMENTS)
        self._sine_to = np.empty_like(self._sine_of)
        self()  # first touch of the pages, outside any sample

    def __call__(self) -> int:
        start = time.perf_counter_ns()
        np.copyto(self._copy_to, self._copy_from)
        np.sin(self._sine_of, out=self._sine_to)
        return time.perf_counter_ns() - start
