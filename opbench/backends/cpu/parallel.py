"""Splitting one kernel call over the machine's cores, with results independent of the split.

A kernel that supports splitting takes a half-open range ``[lo, hi)`` of its outermost
independent axis (tokens, kv heads, rows): every output element is computed by exactly one
part with the same operations in the same order, so the result does not depend on how many
parts there are.  The numba kernels release the GIL (``nogil``), so plain threads run them
in parallel; the calling thread does the first part itself, so nested or concurrent callers
(several logical devices) always make progress.

The thread count is ``NUMBA_NUM_THREADS`` when set (numba's own knob, so one setting governs
every parallel loop), else the number of CPUs this process may run on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_state = threading.local()  # .inside: this thread is running a part
_blas_lock = threading.Lock()
_blas_held = False  # see hold_blas_at_one_thread


def configured_threads() -> int | None:
    """``NUMBA_NUM_THREADS`` when set to a count, else None (every CPU this process may use)."""
    configured = os.environ.get("NUMBA_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else None


def thread_count() -> int:
    configured = configured_threads()
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of near-equal size covering range(n), empty ones left out."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_split(kernel: Callable[[int, int], None], n: int, *, min_per_part: int = 1,
              calls_blas: bool = False) -> None:
    """kernel(lo, hi) over range(n) in parts of at least ``min_per_part`` (small calls stay on
    one thread: waking another costs tens of microseconds).  ``calls_blas``: the parts call
    BLAS (see ``hold_blas_at_one_thread``)."""
    min_per_part = max(1, min_per_part)
    # fewer than two parts' worth: no split to compute (small calls are the common case)
    parts = [] if n < 2 * min_per_part else split(n, min(thread_count(), n // min_per_part))
    if len(parts) <= 1 or getattr(_state, "inside", False):
        # one part, or called from inside a part (a pool thread waiting for the pool could
        # wait forever): run here
        if n:
            kernel(0, n)
        return
    if calls_blas:
        hold_blas_at_one_thread()
    futures = [_pool().submit(_as_part, kernel, lo, hi) for lo, hi in parts[1:]]
    try:
        _as_part(kernel, *parts[0])
    finally:
        for future in futures:
            future.result()


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


def _as_part(kernel: Callable[[int, int], None], lo: int, hi: int) -> None:
    _state.inside = True
    try:
        kernel(lo, hi)
    finally:
        _state.inside = False


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, thread_count() - 1),
                                   thread_name_prefix="opbench-cpu-part")
    return _POOL


def _forget_pool_after_fork() -> None:
    # a forked child (the scenario matrix's workers) inherits the pool object but not its
    # threads: work submitted to it would wait forever
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
