"""``opbench perf --repeat R``: R independent runs of the whole table, each in a fresh process
(fresh imports, allocations and buffers), run after run, so every case sees R process starts
spread over the invocation.  The records merge into one per case with each run's samples apart
(``perf.runs_ns``); that is what lets ``opbench gate`` compare two separate invocations."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
from pathlib import Path

from opbench.errors import UsageError
from opbench.harness.registry import backend_label
from opbench.harness.store import ResultWriter, read_records
from opbench.perf import run as perf_mode
from opbench.perf.runs import merge_runs


def one_run(refs: list[str], cases: list, options, run_id: str, path: str) -> None:
    """The body of one run's process: every backend, every case, records to ``path``."""
    from .perf import open_for_timing  # the child imports the verb afresh: its own first run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    with ResultWriter(path) as writer:
        for ref in refs:
            backend, _ = open_for_timing(ref)
            if backend is None:
                continue  # the parent reports unavailable backends once
            env = perf_mode.backend_env(backend)
            try:
                for record in perf_mode.run_perf_round_robin(backend, cases, options, run_id,
                                                             label=backend_label(ref), env=env):
                    writer.write(record)
            finally:
                backend.close()


def repeated_records(refs: list[str], cases: list, options, run_id: str, repeat: int,
                     progress) -> list[dict]:
    """Run the table ``repeat`` times in fresh processes; the merged records."""
    context = mp.get_context("spawn")
    runs = []
    with tempfile.TemporaryDirectory(prefix="opbench-repeat-") as folder:
        for index in range(repeat):
            progress(f"run {index + 1}/{repeat} (a fresh process)")
            path = str(Path(folder) / f"run{index}.jsonl")
            process = context.Process(target=one_run,
                                      args=(refs, cases, options, run_id, path))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise UsageError(f"--repeat: run {index + 1} ended with exit code "
                                 f"{process.exitcode}; no record of this invocation is kept")
            runs.append(read_records(path) if os.path.exists(path) else [])
    return merge_runs(runs, options.ceilings)
