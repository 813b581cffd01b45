"""Where cases and scenarios run: in this process, or in worker processes (``-j N`` /
``--isolate``).

The pool runs any ``Work`` over a list of items (cases, scenario specs).  Worker processes take
one item at a time, so a crash or a hang costs exactly one item: the parent records CRASH or
TIMEOUT for it, starts a fresh worker and goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Iterator, Protocol

from .cases import Case
from .registry import backend_class, device_label, first_device, open_backend
from .runner import KnownFailures, base_record, run_case


class Work(Protocol):
    """What the pool runs, sent once to each worker process (so it must pickle): ``start`` in
    the worker, then ``run`` per item, ``stop`` at the end; ``lost`` makes, in the parent, the
    CRASH or TIMEOUT record of an item whose worker died or hung."""

    def start(self) -> None: ...

    def run(self, item: Any) -> dict: ...

    def stop(self) -> None: ...

    def lost(self, item: Any, status: str, reason: str) -> dict: ...


def make_backend(backend_ref: str, options: dict[str, Any]):
    """The backend ``backend_ref`` names (options in the ref win over ``options``), on one
    device."""
    return open_backend(backend_ref, options)


class CaseWork:
    """Cases on one backend instance per worker (made once: cases are many and short)."""

    def __init__(self, backend_ref: str, backend_name: str, options: dict, run_seed: int,
                 run_id: str) -> None:
        self.backend_ref, self.backend_name, self.options = backend_ref, backend_name, options
        self.run_seed, self.run_id = run_seed, run_id
        self.backend = None

    def start(self) -> None:
        self.backend = make_backend(self.backend_ref, self.options)
        self.known = KnownFailures(self.backend.known_failures())
        self.device_name = device_label(self.backend)
        self.device = first_device(self.backend)

    def run(self, case: Case) -> dict:
        return run_case(self.backend, case, run_seed=self.run_seed, device=self.device,
                        device_name=self.device_name, run_id=self.run_id, known=self.known)

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def lost(self, case: Case, status: str, reason: str) -> dict:
        """The record of a case whose worker died or hung (made in the parent)."""
        name = self.backend_name
        return base_record(name, case, f"{name}:0", self.run_id, status, reason)


#: what a worker sends when it begins an item: the item's --timeout counts from here, so a
#: worker's start-up (spawn, imports, backend set-up) on a loaded machine is not charged to it
BEGUN = "begun"
#: the start-up allowance before BEGUN, on top of --timeout (a hang in start-up is still caught)
STARTUP_S = 120.0


def _worker(conn, work: Work) -> None:
    work.start()
    while True:
        item = conn.recv()
        if item is None:
            break
        conn.send(BEGUN)
        conn.send(work.run(item))
    work.stop()


def run_items_inline(work: Work, items: list) -> Iterator[dict]:
    """In this process: fastest, but a crash or hang of the backend ends the run."""
    work.start()
    try:
        for item in items:
            yield work.run(item)
    finally:
        work.stop()


def run_inline(backend_ref: str, options: dict, cases: list[Case], run_seed: int,
               run_id: str) -> Iterator[dict]:
    work = CaseWork(backend_ref, backend_class(backend_ref).name, options, run_seed, run_id)
    return run_items_inline(work, cases)


class _Slot:
    """One worker process and the item it holds (``case``: a case or a scenario spec)."""

    def __init__(self, ctx, work: Work) -> None:
        self.ctx, self.work = ctx, work
        self.case: Any = None
        self.started = 0.0
        self.begun = False
        self.start()

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.conn = parent
        self.process = self.ctx.Process(target=_worker, args=(child, self.work), daemon=True)
        self.process.start()
        child.close()

    def give(self, item: Any) -> None:
        self.case, self.started, self.begun = item, time.monotonic(), False
        self.conn.send(item)

    def overdue(self, timeout: float) -> bool:
        allowed = timeout if self.begun else timeout + STARTUP_S
        return time.monotonic() - self.started > allowed

    def restart(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()
        self.case = None
        self.start()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()


def run_in_workers(backend_ref: str, backend_name: str, options: dict, cases: list[Case],
                   run_seed: int, run_id: str, jobs: int, timeout: float | None
                   ) -> Iterator[dict]:
    """Cases in worker processes (see run_items_in_workers)."""
    work = CaseWork(backend_ref, backend_name, options, run_seed, run_id)
    return run_items_in_workers(work, cases, jobs, timeout)


def run_items_in_workers(work: Work, items: list, jobs: int, timeout: float | None
                         ) -> Iterator[dict]:
    """Yield records as workers finish them; CRASH/TIMEOUT records for lost items."""
    # one BLAS/OpenMP thread per worker: N workers already fill the cores, and oversubscribed
    # BLAS threads on a busy machine made attention up to 70x slower
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx, work) for _ in range(max(1, min(jobs, len(items))))]
    queue = deque(items)
    try:
        for slot in slots:
            if queue:
                slot.give(queue.popleft())
        while any(slot.case is not None for slot in slots):
            busy = [s for s in slots if s.case is not None]
            ready = wait([s.conn for s in busy], timeout=0.5)
            for slot in busy:
                record = _collect(slot, ready, timeout)
                if record is None:
                    continue
                yield record
                slot.case = None
                if queue:
                    slot.give(queue.popleft())
    finally:
        for slot in slots:
            slot.stop()


def _collect(slot: _Slot, ready, timeout: float | None):
    if slot.conn in ready:
        try:
            message = slot.conn.recv()
            if message == BEGUN:
                slot.started, slot.begun = time.monotonic(), True
                return None
            return message
        except (EOFError, OSError):
            code = slot.process.exitcode
            record = slot.work.lost(slot.case, "CRASH",
                                    f"worker process died (exit code {code})")
            slot.restart()
            return record
    if timeout and slot.overdue(timeout):
        record = slot.work.lost(slot.case, "TIMEOUT", f"no result after {timeout:g} s")
        slot.restart()
        return record
    return None
