"""Splitting one kernel call over the machine's cores, with results independent of the split.

A kernel that supports splitting takes a half-open range ``[lo, hi)`` of its outermost
independent axis (tokens, kv heads, rows): every output element is computed by exactly one
part with the same operations in the same order, so the result does not depend on how many
parts there are.  The numba kernels release the GIL (``nogil``), so plain threads run them
in parallel; the calling thread claims parts too, so nested or concurrent callers (several
logical devices) always make progress.

The thread count is ``NUMBA_NUM_THREADS`` when set (numba's own knob, so one setting governs
every parallel loop), else the number of CPUs this process may run on.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from ..common.host import usable_cpus

_state = threading.local()  # .inside: this thread is running a part
_blas_lock = threading.Lock()
_blas_held = False  # see hold_blas_at_one_thread


def configured_threads() -> int | None:
    """``NUMBA_NUM_THREADS`` when set to a count, else None (every CPU this process may use)."""
    configured = os.environ.get("NUMBA_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else None


def thread_count() -> int:
    return configured_threads() or usable_cpus()


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of near-equal size covering range(n), empty ones left out."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_split(kernel: Callable[[int, int], None], n: int, *, min_per_part: int = 1,
              calls_blas: bool = False) -> None:
    """kernel(lo, hi) over range(n) in parts of at least ``min_per_part`` (small calls stay on
    one thread: waking another costs tens of microseconds).  ``calls_blas``: the parts call
    BLAS (see ``hold_blas_at_one_thread``).

    One part per thread, claimed by the calling thread and by the part threads as they come:
    when a part thread is late, the caller runs its part too instead of waiting for it.  (Four
    smaller parts a thread, so a late thread would join what is left, were slower here: a
    512-token prefill 1.17 -> 0.98 of ggml, a [128, 8, 512] RoPE 1.78 -> 1.41, in one run.
    Claimed from native code without the GIL, ``run_claimed``, small chunks pay: the copies,
    RoPE, KV_ROTATE and SET_ROWS use that.)"""
    min_per_part = max(1, min_per_part)
    # fewer than two parts' worth: no split, nor thread count, to compute (small calls are the
    # common case)
    if n < 2 * min_per_part or (threads := thread_count()) < 2 or getattr(
            _state, "inside", False):
        # one part, or called from inside a part (a part thread waiting for the crew could
        # wait forever): run here
        if n:
            kernel(0, n)
        return
    if calls_blas:
        hold_blas_at_one_thread()
    _crew().run(_Job(kernel, split(n, min(threads, n // min_per_part))))


#: a claimed split of fewer elements than this runs on the calling thread alone when every
#: part thread is asleep: waking one costs the caller 13-33 us here and the woken thread
#: starts 26-47 us later, on a machine just idle slower still.  RoPE over [512 tokens,
#: 8 heads, 128] f32, cold, after the kernel table's 20 ms settle: 247-272 us alone against
#: 480-564 us waking the crew; at 4M elements the wake pays (1232 against 983 us).  A crew
#: still watching for work (calls back to back) joins at any size (docs/perf.md, "Nineteenth
#: pass").
WAKE_ELEMENTS = 1 << 21


def run_claimed(kernel: Callable[[np.ndarray, np.ndarray], None], chunks: int,
                threads: int | None = None, elements: int | None = None) -> None:
    """kernel(counter, posted) on every thread of the crew and on this one, for a kernel that
    first adds one to posted[0] (it posts the job, see ``_Crew.run``), then runs chunks it
    claims from ``counter`` one at a time until none of the ``chunks`` is left, counting each
    it finishes (``numba_kernels.claim_next`` and ``chunk_done``; counter is [next chunk,
    chunks finished]).  No thread waits for another to start: a part thread that comes late
    finds fewer chunks, or none; and the caller returns once every chunk is counted, without
    waiting for the part threads to take the GIL back.  Made for the memory-bound copies; the
    figures are in docs/perf.md, "Tenth pass".  ``threads``: ``thread_count()`` when the
    caller has it already.  ``elements``: the call's size, for ``WAKE_ELEMENTS``."""
    counter = np.zeros(2, np.int64)
    threads = min(threads or thread_count(), chunks)
    if threads < 2 or getattr(_state, "inside", False):
        kernel(counter, np.zeros(1, np.int64))
        return
    crew = _crew()
    if elements is not None and elements < WAKE_ELEMENTS and crew.asleep():
        kernel(counter, np.zeros(1, np.int64))
        return
    crew.run(_Job(lambda lo, hi: kernel(counter, crew.posted), [(0, chunks)] * threads),
             counted=(counter, chunks))


def hold_blas_at_one_thread() -> None:
    """From the first split whose parts call BLAS on, NumPy's BLAS (OpenBLAS, MKL) runs on
    one thread for the rest of the process: each part is a thread already, and BLAS's own
    threads on top oversubscribe the cores.  Limiting it per call was not enough: restoring
    the thread count after each call woke BLAS's threads, which spin for a while and took the
    cores from the next call's parts.  A 512-token prefill, interleaved in one process: 55 ms
    with the limit kept, 68 ms limited per call, 88-120 ms not limited.  A BLAS threadpoolctl
    does not know is left as it is."""
    global _blas_held
    if _blas_held:
        return
    with _blas_lock:
        if not _blas_held:
            from threadpoolctl import threadpool_limits  # imported on first use: ~10 ms

            threadpool_limits(limits=1, user_api="blas")  # kept: the result is dropped
            _blas_held = True


# How long a part thread keeps watching for the next job after one, and a caller for its job's
# end, before it sleeps on an event.  A thread woken from an event (a futex) starts 0.1-0.3 ms
# late on a virtual machine whose host deschedules idle vCPUs, and polling from Python cannot
# help (a thread that wants the GIL back sleeps on a futex too), so the watch runs in a numba
# loop without the GIL (``wait_for_change``), spinning with the CPU's pause hint as OpenMP's
# idle threads do.  0.3 ms is about OpenMP's spin at GOMP_SPINCOUNT=10000 (how the peers run in
# benchmarks/perf_compare.py) and kept the gain of a 2 ms watch while taking a core from a
# neighbour process for less time; the figures are in docs/perf.md ("Ninth pass").
SPIN_SECONDS = 0.0003


_job_end_lock = threading.Lock()  # orders a job's end against a caller going to sleep


class _Job:
    """One split call: its parts, claimed in order by whichever thread asks next."""

    __slots__ = ("kernel", "parts", "_claims", "_finished", "finished_cell", "_done", "error")

    def __init__(self, kernel: Callable[[int, int], None], parts: list[tuple[int, int]]):
        self.kernel, self.parts = kernel, parts
        self._claims = itertools.count()  # next() is atomic: each index goes to one thread
        self._finished = itertools.count(1)
        self.finished_cell = np.zeros(1, np.int64)  # 1 once every part has run (watched)
        # the event a caller sleeps on, made only when one does: making one for every job cost
        # a few microseconds of every split, and callers mostly see the end while watching
        self._done: threading.Event | None = None
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run parts until none is left unclaimed."""
        while (index := next(self._claims)) < len(self.parts):
            if self.error is None:  # after a failure the rest are only counted
                self._run(*self.parts[index])
            if next(self._finished) == len(self.parts):
                self.finished_cell[0] = 1
                with _job_end_lock:  # a caller that found the cell 0 has made its event
                    done = self._done
                if done is not None:
                    done.set()

    def wait(self) -> None:
        """Sleep until every part has run."""
        with _job_end_lock:  # the cell is set before the finisher looks for an event
            if self.finished_cell[0]:
                return
            self._done = done = threading.Event()
        done.wait()

    def _run(self, lo: int, hi: int) -> None:
        _state.inside = True
        try:
            self.kernel(lo, hi)
        except BaseException as error:  # handed to the caller, which raises it
            self.error = error
        finally:
            _state.inside = False


class _Crew:
    """Part threads that join queued jobs (callers on several threads share them)."""

    def __init__(self, size: int):
        self._queue: collections.deque[_Job] = collections.deque()
        self.posted = np.zeros(1, np.int64)  # bumped for every job queued (watched)
        self._work = threading.Event()  # set with it (slept on) while a part thread sleeps
        self._sleeping = 0  # part threads asleep on _work, or about to be
        self._sleeping_lock = threading.Lock()
        self._watch, self._count_watch = _gil_free_watches()
        self.size = size
        for i in range(size):
            threading.Thread(target=self._serve, name=f"opbench-cpu-part-{i}",
                             daemon=True).start()

    def asleep(self) -> bool:
        """Every part thread sleeps on the event, or is about to (a read without the lock: a
        thread waking or falling asleep meanwhile only makes one call split or not)."""
        return self._sleeping >= self.size

    def run(self, job: _Job, counted: tuple[np.ndarray, int] | None = None) -> None:
        """``counted``: (counter, n) of a claimed job, done when counter[1] reaches n (a part
        that fails never counts its chunk: then the job's own end is waited for); its kernel
        bumps ``posted`` itself, from numba."""
        # one entry per part thread that may join: the caller takes a part itself
        self._queue.extend([job] * min(self.size, len(job.parts) - 1))
        if counted is None:
            self.posted[0] += 1
        # queued before the look: a part thread counted as sleeping after it sees the job in
        # its own last look at the queue, or is woken here
        if self._sleeping:
            self._work.set()
        job.work()
        if counted is not None and self._count_watch(*counted):
            return
        if not self._watch(job.finished_cell, 0):
            job.wait()
        if job.error is not None:
            raise job.error

    def _serve(self) -> None:
        while True:
            posted = int(self.posted[0])  # read before the look: a job after it changes it
            try:
                job = self._queue.popleft()
            except IndexError:
                if not self._watch(self.posted, posted):
                    self._sleep()
                continue
            job.work()

    def _sleep(self) -> None:
        """Sleep until a job is queued: counted as sleeping, then the event cleared, then a
        last look at the queue (a job queued before the count is seen there; one after it
        sets the event)."""
        with self._sleeping_lock:
            self._sleeping += 1
        self._work.clear()
        if not self._queue:
            self._work.wait()
        with self._sleeping_lock:
            self._sleeping -= 1


def _gil_free_watches() -> tuple[Callable[[np.ndarray, int], bool],
                                 Callable[[np.ndarray, int], bool]]:
    """watch(cell, seen): True as soon as cell[0] != seen; count_watch(counter, n): True as
    soon as counter[1] >= n; each False after about SPIN_SECONDS (at once without numba: the
    caller then sleeps on its event)."""
    from . import jit  # jit imports this module

    if not jit.available():
        return (lambda cell, seen: bool(cell[0] != seen),
                lambda counter, n: bool(counter[1] >= n))
    wait_for_change, wait_for_count = jit.wait_for_change, jit.wait_for_count
    start = time.perf_counter()
    wait_for_change(np.zeros(1, np.int64), 0, 10_000)  # how long a look takes here
    rounds = int(SPIN_SECONDS * 10_000 / max(time.perf_counter() - start, 1e-6))
    return (lambda cell, seen: wait_for_change(cell, seen, rounds),
            lambda counter, n: wait_for_count(counter, 1, n, rounds))


_CREW: _Crew | None = None
_crew_lock = threading.Lock()


def _crew() -> _Crew:
    global _CREW
    if _CREW is None:
        with _crew_lock:
            if _CREW is None:
                _CREW = _Crew(max(1, thread_count() - 1))
    return _CREW


def _forget_crew_after_fork() -> None:
    # a forked child (the scenario matrix's workers) inherits the crew object but not its
    # threads: the caller would claim and run every part alone
    global _CREW
    _CREW = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_crew_after_fork)
