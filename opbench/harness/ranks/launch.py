"""Launching devices-as-ranks runs: N local processes (a free port on 127.0.0.1, tcp://
rendezvous), or this process as one rank of a torchrun job (env:// rendezvous).

The launcher watches its ranks: a rank that raises, dies or hangs (no step progress for
``timeout`` seconds) ends that scenario with one record naming the rank, the step and the
cause; every rank process is then killed and joined (none is left behind) and the remaining
scenarios run in a fresh process group.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
from collections.abc import Iterator

from ..scenario.config import ScenarioSpec
from .driver import NOT_STARTED, WAITING_ALL, Fault, RankJob, Status, rank_main

START_TIMEOUT_S = 300.0  # importing torch and compiling kernels in N fresh processes
POLL_S = 0.1
FAULT_SETTLE_S = 1.0  # after a first fault, how long the other ranks' reports may take
#: what a rank's error says when it is only the consequence of a peer that died
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                               "MASTER_PORT"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_jobs(specs, delay_ranks=None) -> list[RankJob]:
    delay = frozenset(delay_ranks) if delay_ranks is not None else None
    return [s if hasattr(s, "fault_record") else RankJob(s, delay_ranks=delay) for s in specs]


def run_ranks(specs: list, run_id: str, timeout: float, fault: Fault | None = None,
              delay_ranks=None) -> Iterator[dict]:
    """Records as jobs (ScenarioSpecs, RankJobs or other jobs with their ``devices``, ``run``
    and ``fault_record``: copy_cases.CopyCaseJob) finish; one process group per device count,
    smallest first."""
    jobs = sorted(as_jobs(specs, delay_ranks), key=lambda job: job.devices)
    for devices, group in itertools.groupby(jobs, key=lambda job: job.devices):
        remaining = list(group)
        while remaining:
            world = _World(devices, remaining, run_id, fault)
            yield from world.run(timeout)
            remaining = remaining[world.next_spec:]


def run_as_torchrun_rank(specs: list[ScenarioSpec], run_id: str, fault: Fault | None = None,
                         delay_ranks=None) -> Iterator[dict]:
    """This process is one rank of a torchrun job: every scenario needs devices == WORLD_SIZE.
    Rank 0 yields the records; the other ranks yield nothing."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sink = _ListSink()
    rank_main(rank, world, "env://", as_jobs(specs, delay_ranks), sink,
              [0, NOT_STARTED, -1] * world, run_id, fault)
    yield from (message[2] for message in sink.items if message[0] == "record")


def check_torchrun_world(specs: list[ScenarioSpec]) -> None:
    world = int(os.environ["WORLD_SIZE"])
    wrong = [spec for spec in specs if spec.devices != world]
    if wrong:
        raise ValueError(f"under torchrun every scenario runs on WORLD_SIZE={world} ranks; "
                         f"{wrong[0].id} has devices={wrong[0].devices}")


class _ListSink:
    def __init__(self) -> None:
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)


class _World:
    """One process group of ``devices`` ranks running ``specs`` until done or a fault."""

    def __init__(self, devices: int, jobs: list, run_id: str, fault) -> None:
        self.devices, self.run_id = devices, run_id
        self.jobs = jobs
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.cells = ctx.Array("i", [0, NOT_STARTED, -1] * devices, lock=False)
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [ctx.Process(target=rank_main, daemon=True, args=(
            rank, devices, init, jobs, self.queue, self.cells, run_id, fault))
            for rank in range(devices)]
        self.next_spec = len(jobs)
        self.done: set[int] = set()

    def run(self, timeout: float) -> Iterator[dict]:
        for proc in self.procs:
            proc.start()
        try:
            yield from self._watch(timeout)
        finally:
            self._stop()

    def _watch(self, timeout: float) -> Iterator[dict]:
        last, last_change = None, time.monotonic()
        while len(self.done) < self.devices:
            message = self._next_message()
            if message is not None and message[0] == "error":
                yield self._first_fault([message])
                return
            if message is not None:
                last_change = time.monotonic()
                record = self._handle(message)
                if record is not None:
                    yield record
                continue
            snapshot = list(self.cells)
            if snapshot != last:
                last, last_change = snapshot, time.monotonic()
            lost = self._dead_rank() or self._hung(time.monotonic() - last_change, timeout)
            if lost:
                yield lost
                return

    def _next_message(self):
        try:
            return self.queue.get(timeout=POLL_S)
        except queue_module.Empty:
            return None

    def _handle(self, message) -> dict | None:
        kind = message[0]
        if kind == "record":
            return message[2]
        if kind == "done":
            self.done.add(message[1])
            return None
        _, rank, index, step, summary = message  # "error"
        self.next_spec = index + 1
        return self.jobs[index].fault_record(self.run_id, "ERROR",
                            f"rank {rank} raised at step {_step(step)}: {summary}")

    def _state(self, rank: int) -> tuple[int, int, int]:
        base = rank * Status.FIELDS
        return tuple(self.cells[base:base + Status.FIELDS])

    def _first_fault(self, errors: list) -> dict:
        """One fault ends the group; its peers then fail too (a receive from a dead rank raises
        "connection reset").  Wait a moment for every report, then name the cause: a rank that
        died without reporting, else a rank whose error is not a lost connection."""
        deadline = time.monotonic() + FAULT_SETTLE_S
        while time.monotonic() < deadline:
            message = self._next_message()
            if message is not None and message[0] == "error":
                errors.append(message)
        reported = {message[1] for message in errors}
        for rank, proc in enumerate(self.procs):
            if proc.exitcode not in (None, 0) and rank not in reported | self.done:
                index, step, _ = self._state(rank)
                self.next_spec = index + 1
                return self.jobs[index].fault_record(self.run_id, "CRASH",
                                    f"rank {rank} died (exit code {proc.exitcode}) at step "
                                    f"{_step(step)}")
        causes = [m for m in errors if not any(w in m[4] for w in LOST_PEER)] or errors
        return self._handle(causes[0])

    def _dead_rank(self) -> dict | None:
        if any(proc.exitcode not in (None, 0) for proc in self.procs):
            return self._first_fault([])
        return None

    def _hung(self, idle: float, timeout: float) -> dict | None:
        states = [self._state(rank) for rank in range(self.devices)]
        # start-up and a scenario's set-up (oracle, weights, JIT) are not steps: seconds on a
        # loaded machine; --timeout is about a step that makes no progress
        starting = any(step < 0 for _, step, _ in states)
        if idle <= (START_TIMEOUT_S if starting else timeout):
            return None
        index = min(spec for spec, _, _ in states)
        suspects = [r for r, (_, _, waiting) in enumerate(states) if waiting == -1] or list(
            range(self.devices))
        waiting = [f"rank {r} on {'every rank' if w == WAITING_ALL else f'rank {w}'}"
                   for r, (_, _, w) in enumerate(states) if w != -1]
        where = ", ".join(f"rank {r} at step {_step(states[r][1])}" for r in suspects)
        self.next_spec = index + 1
        return self.jobs[index].fault_record(self.run_id, "TIMEOUT",
                            f"hung: {where} (no progress in {timeout:g} s"
                            + (f"; waiting: {', '.join(waiting)})" if waiting else ")"))

    def _stop(self) -> None:
        """No rank is left behind: finished ones are joined, the rest killed and joined."""
        for proc in self.procs:
            if proc.is_alive() and len(self.done) == self.devices:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
        self.queue.close()
        self.queue.join_thread()


def _step(step: int) -> str:
    return "start-up" if step == NOT_STARTED else ("setup" if step < 0 else str(step))
