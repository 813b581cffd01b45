"""Where cases run: in this process, or in worker processes (``-j N`` / ``--isolate``).

Worker processes take one case at a time, so a crash or a hang costs exactly one case: the
parent records CRASH or TIMEOUT for it, starts a fresh worker and goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Iterator

from .cases import Case
from .registry import device_label, first_device, open_backend
from .runner import KnownFailures, base_record, run_case


def make_backend(backend_ref: str, options: dict[str, Any]):
    """The backend ``backend_ref`` names (options in the ref win over ``options``), on one
    device."""
    return open_backend(backend_ref, options)


def _worker(conn, backend_ref: str, options: dict, run_seed: int, run_id: str) -> None:
    backend = make_backend(backend_ref, options)
    known = KnownFailures(backend.known_failures())
    name = device_label(backend)
    device = first_device(backend)
    while True:
        case = conn.recv()
        if case is None:
            break
        conn.send(run_case(backend, case, run_seed=run_seed, device=device, device_name=name,
                           run_id=run_id, known=known))
    backend.close()


def run_inline(backend_ref: str, options: dict, cases: list[Case], run_seed: int,
               run_id: str) -> Iterator[dict]:
    backend = make_backend(backend_ref, options)
    known = KnownFailures(backend.known_failures())
    device = first_device(backend)
    name = device_label(backend)
    try:
        for case in cases:
            yield run_case(backend, case, run_seed=run_seed, device=device, device_name=name,
                           run_id=run_id, known=known)
    finally:
        backend.close()


class _Slot:
    def __init__(self, ctx, args) -> None:
        self.ctx, self.args = ctx, args
        self.case: Case | None = None
        self.started = 0.0
        self.start()

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.conn = parent
        self.process = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.process.start()
        child.close()

    def give(self, case: Case) -> None:
        self.case, self.started = case, time.monotonic()
        self.conn.send(case)

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


def _failure_record(slot: _Slot, backend_name: str, status: str, reason: str, run_id: str):
    return base_record(backend_name, slot.case, f"{backend_name}:0", run_id, status, reason)


def run_in_workers(backend_ref: str, backend_name: str, options: dict, cases: list[Case],
                   run_seed: int, run_id: str, jobs: int, timeout: float | None
                   ) -> Iterator[dict]:
    """Yield records as workers finish them; CRASH/TIMEOUT records for lost cases."""
    # one BLAS/OpenMP thread per worker: N workers already fill the cores, and oversubscribed
    # BLAS threads on a busy machine made attention up to 70x slower
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    ctx = mp.get_context("spawn")
    slots = [_Slot(ctx, (backend_ref, options, run_seed, run_id))
             for _ in range(max(1, min(jobs, len(cases))))]
    queue = deque(cases)
    try:
        for slot in slots:
            if queue:
                slot.give(queue.popleft())
        while any(slot.case is not None for slot in slots):
            busy = [s for s in slots if s.case is not None]
            ready = wait([s.conn for s in busy], timeout=0.5)
            for slot in busy:
                record = _collect(slot, ready, backend_name, run_id, timeout)
                if record is None:
                    continue
                yield record
                slot.case = None
                if queue:
                    slot.give(queue.popleft())
    finally:
        for slot in slots:
            slot.stop()


def _collect(slot: _Slot, ready, backend_name: str, run_id: str, timeout: float | None):
    if slot.conn in ready:
        try:
            return slot.conn.recv()
        except (EOFError, OSError):
            code = slot.process.exitcode
            record = _failure_record(slot, backend_name, "CRASH",
                                     f"worker process died (exit code {code})", run_id)
            slot.restart()
            return record
    if timeout and time.monotonic() - slot.started > timeout:
        record = _failure_record(slot, backend_name, "TIMEOUT",
                                 f"no result after {timeout:g} s", run_id)
        slot.restart()
        return record
    return None
