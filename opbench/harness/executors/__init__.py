"""Where the case pool runs: ``local`` (this machine's worker processes, harness/pool.py) or
``ray`` (Ray tasks on actors, this machine's local Ray instance or an existing cluster).

``run_items`` runs any ``pool.Work`` (``run_cases``: the case pool); the Ray module is
imported only when Ray is chosen, so the core never needs Ray installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..cases import Case
from ..pool import CaseWork, Work, run_items_in_workers

RAY_SCHEMES = ("ray", "ray://")


@dataclass(frozen=True)
class ExecutorChoice:
    kind: str  # "local" or "ray"
    address: str | None = None  # ray: None = a new local instance; else ray.init's address


LOCAL = ExecutorChoice("local")


def parse_executor(text: str) -> ExecutorChoice:
    """``local``, ``ray`` (a local Ray instance), ``ray://HOST:PORT`` (Ray client),
    ``ray:auto`` or ``ray:HOST:PORT`` (join a running cluster's GCS)."""
    if text == "local":
        return LOCAL
    if text == "ray":
        return ExecutorChoice("ray")
    if text.startswith("ray://") and len(text) > len("ray://"):
        return ExecutorChoice("ray", text)
    if text.startswith("ray:") and len(text) > len("ray:"):
        return ExecutorChoice("ray", text[len("ray:"):])
    raise ValueError(f"--executor {text!r} must be local, ray, ray://HOST:PORT, ray:auto or"
                     " ray:HOST:PORT")


def run_items(choice: ExecutorChoice, work: Work, items: list, jobs: int,
              timeout: float | None) -> Iterator[dict]:
    """Records as items finish, CRASH/TIMEOUT records for lost ones, whatever the executor."""
    if choice.kind == "ray":
        from . import ray as ray_executor  # Ray is an optional extra: imported only when chosen

        yield from ray_executor.run_in_ray(choice.address, work, items, jobs, timeout)
        return
    yield from run_items_in_workers(work, items, jobs, timeout)


def run_cases(choice: ExecutorChoice, backend_ref: str, backend_name: str, options: dict,
              cases: list[Case], run_seed: int, run_id: str, jobs: int,
              timeout: float | None) -> Iterator[dict]:
    """The case pool (one backend instance per worker) on the chosen executor."""
    work = CaseWork(backend_ref, backend_name, options, run_seed, run_id)
    return run_items(choice, work, cases, jobs, timeout)
