"""Cross-commit A/B: ``opbench perf --ab cpu@../base cpu``, each side from its own source tree.

Each side runs in its own worker process (``ab_worker.py``, started with that side's tree first
on ``PYTHONPATH``, so the side imports its own opbench and backends); this process drives both
round by round as the in-process ``--ab`` does (``timing.measure_interleaved``: alternating
batches of samples in a seeded random order, ``--epochs`` of fresh buffers), then asks each side
to judge the outputs of its timed calls against its oracle, and writes the records.  A record's
``env.source`` names the tree it ran from: path, git commit and whether tracked files differ
from that commit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opbench.backends.common.host import usable_cpus
from opbench.errors import UsageError
from opbench.harness.records import case_record

from . import ab_worker, timing
from .calibrate import bounding_ceilings, with_device_ceilings

WORKER = Path(ab_worker.__file__).resolve()
#: the oldest opbench commit whose tree a worker can run (it has ab_worker.ENTRY_POINTS)
OLDEST_COMMIT = "3c9d735"


class WorkerDied(RuntimeError):
    """A side's worker process ended in the middle of the run (its kernel crashed it)."""


class SideError(RuntimeError):
    """A side's worker answered a request with an error (its kernel raised while timed)."""

    def __init__(self, label: str, error: str) -> None:
        super().__init__(error)
        self.label = label


# -- source trees ----------------------------------------------------------------------------------
def split_source(text: str) -> tuple[str, str | None]:
    """``cpu:opt=1@../base`` -> (``cpu:opt=1``, ``../base``); no ``@``: (text, None)."""
    ref, at, path = text.rpartition("@")
    if not at:
        return text, None
    if not ref or not path:
        raise UsageError(f"--ab {text!r}: write BACKEND@PATH (a backend, then a source tree)")
    return ref, path


def this_tree() -> Path:
    """The source tree of the opbench this process runs."""
    import opbench

    return Path(opbench.__file__).resolve().parent.parent


def _git(tree: Path, *argv: str) -> str | None:
    try:
        done = subprocess.run(["git", *argv], cwd=tree, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@dataclass(frozen=True)
class Source:
    path: Path
    commit: str | None  # git HEAD of the tree, None when it is not a git checkout
    dirty: bool | None  # tracked files differ from that commit

    def describe(self) -> dict:
        return {"path": str(self.path), "commit": self.commit, "dirty": self.dirty}

    def short(self) -> str:
        if self.commit is None:
            return f"{self.path} (not a git checkout)"
        return f"{self.path} at {self.commit[:12]}{' + local changes' if self.dirty else ''}"


def source_tree(text: str | None, side: str) -> Source:
    """The tree a side runs from (this process's own for None); a usage error when it is not
    a directory holding an opbench package."""
    path = this_tree() if text is None else Path(text).expanduser().resolve()
    if not path.is_dir():
        raise UsageError(f"--ab {side}: {text} is not a directory")
    if not (path / "opbench" / "__init__.py").is_file():
        raise UsageError(f"--ab {side}: {text} holds no opbench source tree "
                         "(no opbench/__init__.py)")
    commit = _git(path, "rev-parse", "HEAD")
    status = _git(path, "status", "--porcelain", "--untracked-files=no") if commit else None
    return Source(path, commit, bool(status) if commit else None)


# -- one side's worker -----------------------------------------------------------------------------
class WorkerSide:
    """A running worker: its source, and what ``open`` told about the backend."""

    def __init__(self, label: str, ref: str, source: Source, sizes: str) -> None:
        self.label, self.ref, self.source = label, ref, source
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(source.path)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(source.path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True, encoding="utf-8")
        self.sizes = sizes
        self.opened = False

    def start(self) -> None:
        """Check the worker's hello, then open the backend (the worker's imports ran
        meanwhile, both sides' at once)."""
        self._handshake()
        try:
            opened = self.request("open", ref=self.ref, sizes=self.sizes)
        except SideError as exc:  # an unknown backend or option, as that tree sees it
            raise UsageError(f"--ab {self.label}: {exc}") from None
        self.name, self.device, self.threads = opened["name"], opened["device"], opened["threads"]
        self.follows_cpus = bool(opened.get("follows_cpus"))
        self.cases = set(opened["cases"])
        self.env = {**opened["env"], "git_commit": self.source.commit,
                    "source": self.source.describe()}
        self.opened = True

    def _handshake(self) -> None:
        hello = self._read()
        if hello is None:
            raise UsageError(f"--ab {self.label}: the worker for {self.source.path} ended before "
                             f"it started: {self.cause()}")
        if hello.get("protocol") != ab_worker.PROTOCOL:
            raise UsageError(f"--ab {self.label}: the worker speaks protocol "
                             f"{hello.get('protocol')}, this opbench {ab_worker.PROTOCOL}")
        if hello.get("error"):
            raise UsageError(f"--ab {self.label}: opbench in {self.source.path} does not import:"
                             f" {hello['error']}")
        loaded = Path(hello["file"]).resolve()
        if not loaded.is_relative_to(self.source.path):
            raise UsageError(f"--ab {self.label}: the worker imported opbench from {loaded}, "
                             f"not from {self.source.path}")
        if hello["missing"]:
            raise UsageError(f"--ab {self.label}: opbench in {self.source.path} is too old for a "
                             f"cross-commit A/B: it lacks {', '.join(hello['missing'])} (it needs "
                             f"opbench from commit {OLDEST_COMMIT} on; see docs/ci.md)")

    def _read(self) -> dict | None:
        line = self.process.stdout.readline()
        return json.loads(line) if line else None

    def request(self, command: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"cmd": command, **fields}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the read below finds the worker gone and says why
        answer = self._read()
        if answer is None:
            raise WorkerDied(f"the worker of {self.label} ended during '{command}': "
                             f"{self.cause()}")
        if not answer["ok"]:
            raise SideError(self.label, answer["error"])
        return answer

    def cause(self) -> str:
        """Why the worker ended: exit code or signal, and the last lines of its stderr."""
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit code {code}"
        self.stderr.seek(0)
        tail = " | ".join(line.strip() for line in self.stderr.read().splitlines()[-5:])
        return f"{how}; stderr: {tail}" if tail else how

    def pin(self, cpus: list[int] | None) -> None:
        """Every thread of the worker (those its backend started too) on ``cpus``."""
        if cpus is None:
            return
        for tid in os.listdir(f"/proc/{self.process.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), set(cpus))
            except ProcessLookupError:
                pass  # a thread that ended meanwhile

    def close(self) -> None:
        if self.process.poll() is None and not self.opened:
            self.process.kill()  # still importing, or refused: nothing of it to keep
            self.process.wait()
        elif self.process.poll() is None:
            try:
                self.request("close")
                self.process.wait(timeout=30)
            except (WorkerDied, SideError, subprocess.TimeoutExpired, OSError, ValueError):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.stderr):
            try:
                stream.close()
            except OSError:
                pass  # a pipe whose reader is gone


def start_sides(specs: Mapping[str, tuple[str, str | None]], sizes: str) -> dict[str, WorkerSide]:
    """label -> a started, opened worker for each (ref, path) side; all closed on failure."""
    sources = {label: source_tree(path, label) for label, (_, path) in specs.items()}
    sides: dict[str, WorkerSide] = {}
    try:
        for label, (ref, _) in specs.items():
            sides[label] = WorkerSide(label, ref, sources[label], sizes)
        for side in sides.values():
            side.start()
    except BaseException:
        for side in sides.values():
            side.close()
        raise
    return sides


# -- timing one case -------------------------------------------------------------------------------
#: a worker's batch of samples lasts at least this long: a round trip to a process on a busy
#: machine can wait for a time slice (milliseconds), and 5 samples of a 20 us kernel would
#: leave the budget to the waits; 5 ms keeps many rounds per case for drift to hit both sides
SLICE_MS = 5.0


class RemoteSubject:
    """A ``timing.Subject`` whose calls run in a worker: a batch of samples per round trip."""

    def __init__(self, side: WorkerSide, limit: int) -> None:
        self.side, self.limit = side, limit

    def warm_up(self, calls: int) -> None:
        self.side.request("warmup", calls=calls)

    def time_batch(self, samples: int) -> list[int]:
        return self.side.request("time", samples=samples, slice_ms=SLICE_MS,
                                 limit=self.limit)["ns"]


def run_cross_case(sides: Mapping[str, WorkerSide], case, options, run_id: str,
                   placement: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """``case`` on every side, interleaved in ``options.epochs`` epochs of fresh buffers, then
    each side's timed outputs judged: one record per side.  When a side cannot run the case
    (not in its tree's table, unsupported, broken), neither is timed."""
    absent = {label: ("UNSUPPORTED", f"no perf case {case.id} in {side.source.path}", [])
              for label, side in sides.items() if case.id not in side.cases}
    if absent:
        return _failures(sides, case, run_id, absent)
    try:
        return _timed_case(sides, case, options, run_id, placement or {})
    except SideError as exc:  # e.g. the kernel raised while timed: that side's ERROR
        return _failures(sides, case, run_id, {exc.label: ("ERROR", str(exc), [])})
    finally:
        for side in sides.values():
            if side.process.poll() is None:
                side.request("release")


def _timed_case(sides, case, options, run_id, placement) -> dict[str, dict]:
    epochs = max(1, options.epochs)
    taken: dict[str, list] = {label: [] for label in sides}
    facts: dict[str, dict] = {}
    for epoch in range(epochs):
        facts = {label: side.request("prepare", case=case.id, seed=options.seed,
                                     cold=options.cold, fresh_inputs=options.fresh_inputs)
                 for label, side in sides.items()}
        failed = {label: (a["status"], a["reason"], a["errors"]) for label, a in facts.items()
                  if a["status"] != "OK"}
        if failed:
            return _failures(sides, case, run_id, failed)
        samples = timing.measure_interleaved(
            {label: RemoteSubject(side, timing.DEFAULT_MAX_SAMPLES // epochs)
             for label, side in sides.items()},
            warmup=options.warmup, budget_ms=options.budget_ms / epochs,
            min_samples=math.ceil(options.min_samples / epochs), seed=options.seed + epoch,
            settle_ms=options.settle_ms)
        for label in sides:
            taken[label].append(samples[label].ns)
    problems = {label: side.request("judge")["problem"] for label, side in sides.items()}
    return {label: _record(side, case, run_id, taken[label], facts[label], problems[label],
                           options, placement.get(label, {}))
            for label, side in sides.items()}


def _record(side: WorkerSide, case, run_id, parts, facts, problem, options, placement) -> dict:
    if problem:
        return _side_record(side, case, "ERROR", run_id, reason=problem)
    samples = timing.Samples(np.concatenate(parts).astype(np.int64), options.warmup,
                             options.budget_ms)
    device = facts.get("device_ceilings")
    block = timing.perf_block(samples, nbytes=facts["bytes"] or None, flops=facts["flops"] or None,
                              ceilings=bounding_ceilings(device, options.ceilings,
                                                         _ceiling_threads(side, placement)),
                              cold=options.cold)
    perf = {**with_device_ceilings(block, device),
            "output_judged": facts["output_judged"], "fresh_inputs": options.fresh_inputs,
            "settle_ms": options.settle_ms,
            **placement}
    return _side_record(side, case, "OK", run_id, perf=perf)


def _ceiling_threads(side: WorkerSide, placement: Mapping) -> int:
    """Threads the side computes with: a backend that follows its CPUs uses all of its set,
    or, unpinned, every CPU the worker inherited from this process (as ``running_threads``
    counts them in process; its need for pinning, ``side.threads``, is 1)."""
    if side.follows_cpus:
        return len(placement["cpu_set"]) if placement.get("cpu_set") else usable_cpus()
    return side.threads


def _side_record(side: WorkerSide, case, status: str, run_id: str, **fields) -> dict:
    return case_record("perf", side.label, case, status, run_id, device=side.device,
                       env=side.env, **fields)


def _failures(sides, case, run_id, failed) -> dict[str, dict]:
    records = {}
    for label, side in sides.items():
        status, reason, errors = failed.get(
            label, ("UNSUPPORTED", "not timed: the other side of the A/B could not run it", []))
        records[label] = _side_record(side, case, status, run_id, reason=reason,
                                      errors=errors)
    return records


def crash_records(sides, case, run_id, died: WorkerDied) -> dict[str, dict]:
    """The case's records when a worker died on it: CRASH with the cause for the side whose
    worker is gone, not timed for the other."""
    failed = {label: ("CRASH", str(died), []) for label, side in sides.items()
              if side.process.poll() is not None}
    return _failures(sides, case, run_id, failed)


def not_timed(sides, case, run_id, why: str) -> dict[str, dict]:
    """The records of a case left untimed (a worker died on an earlier case)."""
    return _failures(sides, case, run_id, {label: ("ERROR", why, []) for label in sides})
