"""The core never imports Ray: it is the optional extra opbench[ray]."""

from __future__ import annotations

import os
import subprocess
import sys

from opbench.harness import pool


def test_running_cases_does_not_import_ray():
    code = ("import sys; from opbench.cli.main import main; "
            "main(['test', '-o', 'CPY', '--quick', '-q', '-j', '2']); "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_finished_worker_exits_without_teardown_and_keeps_its_output():
    """A worker ends with os._exit (the interpreter's teardown with numba loaded took ~0.5 s,
    waited for at the end of every -j run): what it printed still arrives, the exit code is 0,
    and exit handlers (the teardown) do not run."""
    code = ("import atexit, multiprocessing; from opbench.harness import pool; "
            "atexit.register(print, 'teardown ran'); print('owed output', end=''); "
            "pool._exit_now(multiprocessing.Pipe()[0])")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=buffered)
    assert (done.returncode, done.stdout) == (0, "owed output"), done.stderr


class _ThreadsSeen:
    """A pool Work whose items report the cpu backend's split thread count in the worker."""

    def start(self) -> None:
        pass

    def run(self, item) -> dict:
        from opbench.backends.cpu import parallel

        return {"item": item, "threads": parallel.thread_count(),
                "env": {name: os.environ.get(name) for name in pool.WORKER_ENV}}

    def stop(self) -> None:
        pass

    def lost(self, item, status: str, reason: str) -> dict:
        return {"item": item, "lost": reason}


def test_workers_share_out_the_cores_for_the_cpu_backends_splits(monkeypatch):
    """N workers already fill the cores: each worker's kernel splits get cores / N threads (at
    least one), unless NUMBA_NUM_THREADS says otherwise."""
    from pathlib import Path

    # the workers unpickle _ThreadsSeen from this module, imported by pytest as
    # tests.harness.test_executors_core: a spawned worker finds it on the parent's sys.path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    for jobs in (1, 2):
        records = list(pool.run_items_in_workers(_ThreadsSeen(), [0, 1], jobs, 120))
        want = max(1, pool.usable_cpus() // jobs)
        assert sorted(r["item"] for r in records) == [0, 1]
        assert {r["threads"] for r in records} == {want}, records
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    records = list(pool.run_items_in_workers(_ThreadsSeen(), [0, 1], 2, 120))
    assert {r["threads"] for r in records} == {3}


def test_workers_get_one_blas_thread_and_the_callers_environment_stays_as_it_was(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    for name in pool.WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's own choice is kept
    records = list(pool.run_items_in_workers(_ThreadsSeen(), [0, 1], 2, 120))
    assert [r["env"] for r in records] == [{**pool.WORKER_ENV, "OMP_NUM_THREADS": "3"}] * 2
    assert {name: os.environ.get(name) for name in pool.WORKER_ENV} == {
        **dict.fromkeys(pool.WORKER_ENV), "OMP_NUM_THREADS": "3"}
