"""Where cases and scenarios run: in this process, or in worker processes (``-j N`` /
``--isolate``).

The pool runs any ``Work`` over a list of items (cases, scenario specs).  Worker processes take
one item at a time, so a crash or a hang costs exactly one item: the parent records CRASH or
TIMEOUT for it, starts a fresh worker and goes on.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from multiprocessing import reduction
from multiprocessing.connection import wait
from typing import Any, Iterator, Protocol

from opbench.backends.common.host import usable_cpus
from opbench.errors import BackendSetupError

from . import draws
from .cases import Case
from .registry import backend_class, backend_label, device_label, first_device, open_backend
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
        # compiled loops load here, in start-up's allowance, not in the first case's --timeout
        draws.warm_up()
        self.backend.warm_up()
        self.known = KnownFailures(self.backend.known_failures())
        self.device_name = device_label(self.backend)
        self.device = first_device(self.backend)

    def run(self, case: Case) -> dict:
        return run_case(self.backend, case, run_seed=self.run_seed, device=self.device,
                        device_name=self.device_name, run_id=self.run_id, known=self.known,
                        label=self.backend_name)

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def lost(self, case: Case, status: str, reason: str) -> dict:
        """The record of a case whose worker died or hung (made in the parent)."""
        device = f"{backend_class(self.backend_ref).name}:0"  # the label may carry options
        return base_record(self.backend_name, case, device, self.run_id, status, reason)


#: what a worker sends when it begins an item: the item's --timeout counts from here, so a
#: worker's start-up (spawn, imports, backend set-up) on a loaded machine is not charged to it
BEGUN = "begun"
#: the start-up allowance before BEGUN, on top of --timeout (a hang in start-up is still caught)
STARTUP_S = 120.0


SETUP_FAILED = "opbench-backend-setup-failed"  # the first message of a worker that has none
STDERR_TAIL_LINES = 8


def setup_failure(backend_ref: str, exc: BaseException) -> str:
    return f"backend {backend_ref!r} could not be constructed: {type(exc).__name__}: {exc}"


def _start(work: Work) -> None:
    """``work.start()``; a backend that cannot be constructed is BackendSetupError (the CLI
    reports it once for the backend, instead of once per item)."""
    try:
        work.start()
    except Exception as exc:
        ref = getattr(work, "backend_ref", "backend")
        raise BackendSetupError(setup_failure(ref, exc)) from None


class WorkerLog:
    """A worker's stderr: a file without a name (unlinked from the start), so nothing is left
    in the temp folder however the parent ends -- even SIGKILLed.  The parent keeps it open
    and reads it back with pread; the worker gets the same open file as a descriptor,
    handed over by multiprocessing when the worker is spawned (see ``__reduce__``)."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()  # O_TMPFILE on Linux, else unlinked at once
        self.fd = self.file.fileno()

    def __reduce__(self):
        # pickled for the spawned child: DupFd passes the descriptor to it
        return _worker_log_fd, (reduction.DupFd(self.fd),)

    def text(self) -> str:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.file.close()


def _worker_log_fd(dup) -> int:
    return dup.detach()


def _quiet_worker_signals(stderr_fd: int | None) -> None:
    """Ctrl-C in a terminal reaches the whole process group: the parent handles it (keeps the
    records, exits 130), so workers ignore it instead of printing KeyboardInterrupt tracebacks.
    Stderr goes to a file the parent reads back when the worker dies, and faulthandler puts
    the Python stack of a SIGSEGV/SIGABRT there."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stderr_fd is not None:
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace",
                          closefd=False)
        faulthandler.enable(sys.stderr, all_threads=False)  # the crashing thread's stack


def _start_ignoring_sigint(process) -> None:
    """Start ``process`` with SIGINT ignored from its first instruction on.

    A spawned worker spends its first second importing; a Ctrl-C to the process group then
    would end it with a KeyboardInterrupt traceback before ``_quiet_worker_signals`` runs. An
    ignored disposition survives exec (Python keeps it), so the worker starts ignoring it. The
    parent's main thread blocks SIGINT meanwhile: one directed at it in those milliseconds stays
    pending and reaches the restored handler. (One the kernel hands to another thread of the
    parent, such as a BLAS thread, is dropped: pressing Ctrl-C again then ends the run.)"""
    if threading.current_thread() is not threading.main_thread():
        process.start()  # signal dispositions can only be changed from the main thread
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker(conn, work: Work, stderr_fd: int | None = None, threads: int | None = None) -> None:
    _quiet_worker_signals(stderr_fd)
    if threads:  # before any backend starts: the cpu backend's parts read it (unless set)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    try:
        _start(work)
    except BackendSetupError as exc:
        conn.send((SETUP_FAILED, str(exc)))
        return
    try:
        while (item := conn.recv()) is not None:
            conn.send(BEGUN)
            conn.send(work.run(item))
    except (EOFError, OSError):
        return  # the parent is gone (killed): nothing to report to, end quietly
    work.stop()
    _exit_now(conn)


def _exit_now(conn) -> None:
    """End a worker whose work is done without the interpreter's teardown: with numba's
    kernels loaded it took 0.45-0.6 s, and the parent waits for every worker's exit before the
    run's summary.  Everything the worker owes was sent; its own output is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing left to flush into it
    conn.close()
    os._exit(0)


def run_items_inline(work: Work, items: list) -> Iterator[dict]:
    """In this process: fastest, but a crash or hang of the backend ends the run."""
    _start(work)
    try:
        for item in items:
            yield work.run(item)
    finally:
        work.stop()


def run_inline(backend_ref: str, options: dict, cases: list[Case], run_seed: int,
               run_id: str) -> Iterator[dict]:
    work = CaseWork(backend_ref, backend_label(backend_ref, options), options, run_seed, run_id)
    return run_items_inline(work, cases)


class _Slot:
    """One worker process and the item it holds (``case``: a case or a scenario spec)."""

    def __init__(self, ctx, work: Work, threads: int | None = None) -> None:
        self.ctx, self.work, self.threads = ctx, work, threads
        self.case: Any = None
        self.started = 0.0
        self.begun = False
        self.log: WorkerLog | None = None
        self.start()

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.conn = parent
        self._close_log()
        self.log = WorkerLog()  # a fresh one: a restarted worker's tail is its own
        self.process = self.ctx.Process(target=_worker,
                                        args=(child, self.work, self.log, self.threads),
                                        daemon=True)
        _start_ignoring_sigint(self.process)
        child.close()

    def _close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def give(self, item: Any) -> None:
        self.case, self.started, self.begun = item, time.monotonic(), False
        try:
            self.conn.send(item)
        except OSError:
            pass  # the worker already ended; _collect reads why (setup failure or death)

    def death(self) -> str:
        """Why the worker died: reap it first (before that its exit code is None), then the
        signal name or exit code and the last lines it wrote to stderr."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                cause = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                cause = f"killed by signal {-code}"
        else:
            cause = f"exit code {code}"
        tail = _tail(self.log.text() if self.log else "", STDERR_TAIL_LINES)
        return f"worker process died ({cause})" + (f"; its stderr ends:\n{tail}" if tail else "")

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
            self.process.join(timeout=2)
        self._close_log()


# faulthandler's frames of the harness itself and its module list: noise next to the user's
# frames and messages
_PLUMBING = ("/multiprocessing/", '"<string>"', "Extension modules:", "/opbench/harness/")


def _tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of what the worker wrote to stderr, without the process-start
    frames and module list of faulthandler's dump (the user's frames and messages are what
    tells)."""
    kept = [line for line in text.splitlines()
            if line.strip() and not any(noise in line for noise in _PLUMBING)]
    return "\n".join(kept[-lines:])


def run_in_workers(backend_ref: str, backend_name: str, options: dict, cases: list[Case],
                   run_seed: int, run_id: str, jobs: int, timeout: float | None
                   ) -> Iterator[dict]:
    """Cases in worker processes (see run_items_in_workers)."""
    work = CaseWork(backend_ref, backend_name, options, run_seed, run_id)
    return run_items_in_workers(work, cases, jobs, timeout)


#: one BLAS/OpenMP thread per worker: N workers already fill the cores, and oversubscribed
#: BLAS threads on a busy machine made attention up to 70x slower
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "OMP_WAIT_POLICY": "passive"}


@contextlib.contextmanager
def _worker_env() -> Iterator[None]:
    """``WORKER_ENV`` where the caller has not set it, for the workers spawned (and respawned)
    inside; the caller's environment as it was afterwards (a library caller, or a test run,
    keeps its own)."""
    added = {name: value for name, value in WORKER_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def run_items_in_workers(work: Work, items: list, jobs: int, timeout: float | None
                         ) -> Iterator[dict]:
    """Yield records as workers finish them; CRASH/TIMEOUT records for lost items."""
    with _worker_env():
        yield from _run_items(work, items, jobs, timeout)


def _run_items(work: Work, items: list, jobs: int, timeout: float | None) -> Iterator[dict]:
    ctx = mp.get_context("spawn")
    workers = max(1, min(jobs, len(items)))
    # likewise the cpu backend's kernel splits: the cores shared out among the workers
    # (``opbench test -j 2`` on two cores: 7.4-7.9 s with two threads a worker, 6.4-7.7 s with
    # one; a worker's part thread took the core its neighbour was running on)
    threads = max(1, usable_cpus() // workers)
    slots = [_Slot(ctx, work, threads) for _ in range(workers)]
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
        except (EOFError, OSError):
            record = slot.work.lost(slot.case, "CRASH", slot.death())
            slot.restart()
            return record
        if message == BEGUN:
            slot.started, slot.begun = time.monotonic(), True
            return None
        if isinstance(message, tuple) and message[:1] == (SETUP_FAILED,):
            raise BackendSetupError(message[1])  # every worker would fail alike: stop once
        return message
    if timeout and slot.overdue(timeout):
        record = slot.work.lost(slot.case, "TIMEOUT", f"no result after {timeout:g} s")
        slot.restart()
        return record
    return None
