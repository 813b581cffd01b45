"""One rank of a devices-as-ranks scenario run: the same engine and judge as in-process, on
the cpu backend given a ``RankRuntime`` (this rank runs only its own device's work), plus the
message check.

Every rank runs every step; after each step the ranks exchange (all-gather) their message
check, so all of them stop at the same step.  Readbacks are broadcast from the owner, so every
rank judges the same values; rank 0 writes the record.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

from opbench.backends.common.host import usable_cpus
from opbench.backends.cpu import CpuBackend
from opbench.backends.runtimes.ranks import RankRuntime, Transport

from ..records import make_record
from ..scenario.config import ScenarioSpec
from ..scenario.engine import Readout
from ..scenario.judge import (
    ENGINES,
    judge_step,
    low_precision_run,
    oracle_run,
    scenario_options,
)
from .plan import counted, describe_difference, step_plan

FAULTS = ("raise", "exit", "hang")
NOT_STARTED, READY = -2, -1  # status step values before the first step
WAITING_ALL = -2  # status waiting_on: in a collective with every rank


@dataclass(frozen=True)
class RankJob:
    """One scenario of a rank run.  ``engine_cls`` / ``runtime_cls`` replace the split's engine
    or ``RankRuntime`` (the bug zoo's broken parts); ``delay_ranks``: with ``spec.delay``,
    only these ranks' streams are delayed (None: every rank's)."""

    spec: ScenarioSpec
    engine_cls: type | None = None
    runtime_cls: type | None = None
    delay_ranks: frozenset | None = None
    label: str = ""

    @property
    def devices(self) -> int:
        return self.spec.devices

    def run(self, rank: int, world: int, readback, status, fault, run_id: str) -> dict:
        return _run_one(rank, world, self, readback, status, fault, run_id)

    def fault_record(self, run_id: str, status: str, reason: str) -> dict:
        return fault_record(self.spec, run_id, status, reason)


@dataclass(frozen=True)
class Fault:
    """Fault injection: ``kind`` at the start of ``step`` on ``rank`` (every scenario)."""

    kind: str
    rank: int
    step: int

    @staticmethod
    def parse(text: str) -> Fault:
        kind, _, rest = text.partition(":")
        rank, _, step = rest.partition(":")
        if kind not in FAULTS or not rank.isdigit() or not step.isdigit():
            raise ValueError(f"--inject-fault {text!r} must be KIND:RANK:STEP with KIND one of"
                             f" {', '.join(FAULTS)}, e.g. hang:1:2")
        return Fault(kind, int(rank), int(step))

    def strike(self, rank: int, step: int) -> None:
        if (rank, step) != (self.rank, self.step):
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault on rank {rank} at step {step}")
        if self.kind == "exit":
            os._exit(7)  # no cleanup, no message: as a segfault looks to the launcher
        time.sleep(3600)


class Status:
    """Per rank: current scenario index, step and the peer it is blocked on (shared memory
    with the launcher, which names a hung rank from it).  A plain list without a launcher."""

    FIELDS = 3

    def __init__(self, cells, rank: int) -> None:
        self.cells, self.base = cells, rank * self.FIELDS

    def set(self, spec: int | None = None, step: int | None = None) -> None:
        if spec is not None:
            self.cells[self.base] = spec
        if step is not None:
            self.cells[self.base + 1] = step

    def waiting(self, peer: int | None) -> None:
        self.cells[self.base + 2] = -1 if peer is None else peer


def readout_digest(readout: Readout) -> str:
    """sha256 of every value the host read back in a step (layers, then output)."""
    digest = hashlib.sha256()
    for array in [*readout.result.layers, readout.result.output]:
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def in_process_steps(spec: ScenarioSpec, engine_cls=None) -> list[dict]:
    """The same scenario with every device in this process (the cpu backend): per step, the
    readback digest and the step's seconds, to set beside a rank run."""
    cfg = spec.config()
    weights, plans, _ = oracle_run(cfg, spec.evict)
    backend = CpuBackend(**scenario_options(spec))  # the worker-thread runtime
    try:
        engine = (engine_cls or ENGINES[spec.split])(backend, spec, cfg, weights)
        steps = []
        for plan in plans:
            start = time.perf_counter()
            readout = engine.step(plan)
            backend.synchronize()
            steps.append({"step": plan.step, "seconds": time.perf_counter() - start,
                          "digest": readout_digest(readout)})
        return steps
    finally:
        backend.close()


def run_rank_scenario(backend: CpuBackend, spec: ScenarioSpec, status: Status,
                      fault: Fault | None, engine_cls=None) -> dict:
    """Run every step on this rank; the judgement every rank agrees on, as a dict."""
    import torch.distributed as dist

    cfg = spec.config()
    weights, plans, expected = oracle_run(cfg, spec.evict)
    lows = low_precision_run(cfg, spec.evict, spec.kv_dtype) or [None] * len(plans)
    engine = (engine_cls or ENGINES[spec.split])(backend, spec, cfg, weights)
    runtime = backend.runtime
    steps: list[dict] = []
    worst = {"nmse": 0.0, "max_rel": 0.0}
    divergence, problems = None, []
    for plan, want, low in zip(plans, expected, lows):
        status.set(step=plan.step)
        if fault:
            fault.strike(runtime.rank, plan.step)
        start = time.perf_counter()
        readout = engine.step(plan)
        backend.synchronize()
        seconds = time.perf_counter() - start
        got = counted(runtime.take_log())
        mine = describe_difference(plan.step, runtime.rank,
                                   step_plan(spec, cfg, plan.n_q)[runtime.rank], got)
        per_rank: list = [None] * runtime.world
        status.waiting(WAITING_ALL)
        dist.all_gather_object(per_rank, (mine, _totals(got)), group=runtime.transport
                               .readback_group)
        status.waiting(None)
        divergence, step_worst = judge_step(plan.step, readout, want, low=low)
        worst = {k: max(worst[k], step_worst[k]) for k in worst}
        problems = [p for p, _ in per_rank if p]
        steps.append({"step": plan.step, "seconds": round(seconds, 6), **step_worst,
                      "digest": readout_digest(readout),
                      "messages": [totals for _, totals in per_rank]})
        if divergence or problems:
            break
    return {"divergence": divergence, "problems": problems, "worst": worst, "steps": steps}


def _totals(messages) -> dict:
    out = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0}
    for (direction, _peer, nbytes), count in messages.items():
        key = "sent" if direction == "send" else "received"
        out[key] += count
        out[f"{key}_bytes"] += count * nbytes
    return out


def scenario_fields(spec: ScenarioSpec, run_id: str) -> dict:
    return dict(kind="scenario", backend="cpu", op="SCENARIO", case_id=spec.id, run_id=run_id,
                params={**spec.as_dict(), "ranks": True}, dtype=spec.kv_dtype,
                device=f"{spec.devices} rank(s)")


def result_record(spec: ScenarioSpec, run_id: str, result: dict) -> dict:
    div, problems = result["divergence"], result["problems"]
    errors = ([div.describe()] if div else []) + problems
    scenario = {**spec.as_dict(), "ranks": spec.devices, "steps_run": len(result["steps"]),
                "divergence": None if div is None else div.__dict__,
                "communication": problems or None, "per_step": result["steps"]}
    return make_record(status="FAIL" if errors else "OK", metrics=result["worst"],
                       errors=errors, scenario=scenario, **scenario_fields(spec, run_id))


def fault_record(spec: ScenarioSpec, run_id: str, status: str, reason: str) -> dict:
    return make_record(status=status, reason=reason, errors=[reason],
                       scenario={**spec.as_dict(), "ranks": spec.devices, "divergence": None},
                       **scenario_fields(spec, run_id))


def rank_main(rank: int, world: int, init_method: str, jobs: list, sink, cells,
              run_id: str, fault: Fault | None = None) -> None:
    """A rank's process: join the group, run ``jobs`` (RankJobs, or anything with their
    ``run``), rank 0 sends records to ``sink``.
    An exception is reported as ("error", rank, scenario index, step, summary)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    # the ranks share the cores, as the pool's workers do (``pool.run_items_in_workers``)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, usable_cpus() // world)))
    import torch.distributed as dist

    status = Status(cells, rank)
    status.set(spec=0, step=NOT_STARTED)
    index = 0
    try:
        from opbench.backends.cpu import jit

        jit.available()  # compiling (or loading) the kernels takes seconds: part of start-up
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        readback = dist.new_group(backend="gloo")
        status.set(step=READY)
        for index, job in enumerate(jobs):
            status.set(spec=index, step=READY)
            record = job.run(rank, world, readback, status, fault, run_id)
            if rank == 0:
                sink.put(("record", index, record))
        dist.destroy_process_group()
        sink.put(("done", rank))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then this rank ends
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        step = cells[status.base + 1]
        sink.put(("error", rank, index, step, summary))
        if hasattr(sink, "close"):
            sink.close()
            sink.join_thread()
        sys.exit(1)


def _run_one(rank, world, job: RankJob, readback, status, fault, run_id):
    transport = Transport(rank, world, readback, on_wait=status.waiting)
    options = scenario_options(job.spec)
    delayed = options.pop("delay", False) and (job.delay_ranks is None or rank in job.delay_ranks)
    runtime = (job.runtime_cls or RankRuntime)(
        rank, world, transport, delayed, options.pop("delay_seed", 0),
        options.pop("delay_max_ms", 2.0))
    backend = CpuBackend(runtime=runtime, **options)
    try:
        result = run_rank_scenario(backend, job.spec, status, fault, job.engine_cls)
    finally:
        backend.close()
    record = result_record(job.spec, run_id, result)
    if job.label:
        record["scenario"]["label"] = job.label
    return record
