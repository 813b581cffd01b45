"""COPY_ASYNC's contract cases across ranks: each logical device its own process, copy_async
between devices the rank runtime's send/receive (``opbench test -o COPY_ASYNC --ranks``).

Every rank runs the same check (the same host program), on the cpu backend given a
``RankRuntime``; readbacks are broadcast from the owner, so the data checks agree on every
rank, and a clause about timing (the host was blocked, a synchronize returned early) is judged
by the rank that runs the device in question (harness/contracts.py).  The ranks then exchange
their verdicts: the case fails when any rank saw a violation, and the record names the rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from opbench.backends.cpu import CpuBackend
from opbench.backends.runtimes.ranks import RankRuntime, Transport

from ..cases import Case
from ..runner import base_record, run_case
from .driver import WAITING_ALL

#: how a rank's verdict ranks when the ranks disagree: the worst one names the case
SEVERITY = ("OK", "UNSUPPORTED", "FAIL", "ERROR")


@dataclass(frozen=True)
class CopyCaseJob:
    """One COPY_ASYNC case on ``case["ndev"]`` ranks; ``runtime_cls`` replaces RankRuntime
    (the bug zoo's broken transports)."""

    case: Case
    run_seed: int = 0
    runtime_cls: type | None = None

    @property
    def devices(self) -> int:
        return int(self.case["ndev"])

    @property
    def id(self) -> str:
        return self.case.id

    def run(self, rank: int, world: int, readback, status, fault, run_id: str) -> dict:
        """This rank's part of the case; every rank returns the agreed record."""
        import torch.distributed as dist

        status.set(step=0)  # a case is one step: --inject-fault KIND:RANK:0 strikes every case
        if fault:
            fault.strike(rank, 0)
        transport = Transport(rank, world, readback, on_wait=status.waiting)
        make = self.runtime_cls or RankRuntime
        backend = CpuBackend(runtime=make(rank, world, transport))
        # the race check's delayed siblings are ranks of this process group too
        backend.delayed_sibling = lambda delay_seed: CpuBackend(
            runtime=make(rank, world, transport, True, delay_seed))
        try:
            record = run_case(backend, self.case, run_seed=self.run_seed, run_id=run_id,
                              device_name=f"{world} rank(s)")
        finally:
            backend.close()
        verdicts: list = [None] * world
        status.waiting(WAITING_ALL)
        dist.all_gather_object(verdicts, (record["status"], record["reason"]), group=readback)
        status.waiting(None)
        return agreed_record(record, verdicts)

    def fault_record(self, run_id: str, status: str, reason: str) -> dict:
        record = base_record("cpu", self.case, f"{self.devices} rank(s)", run_id, status, reason)
        record["errors"] = [reason]
        return record


def agreed_record(record: dict, verdicts: list[tuple[str, str | None]]) -> dict:
    """Rank 0's record with the worst verdict of all ranks, naming the rank that gave it."""
    worst = max(range(len(verdicts)), key=lambda r: SEVERITY.index(verdicts[r][0])
                if verdicts[r][0] in SEVERITY else len(SEVERITY))
    status, reason = verdicts[worst]
    if status == "OK":
        return record
    if status != "UNSUPPORTED":
        reason = f"rank {worst}: {reason}"
    record.update(status=status, reason=reason, errors=[reason])
    return record


def copy_async_jobs(cases: list[Case], run_seed: int) -> list[CopyCaseJob]:
    return [CopyCaseJob(case, run_seed) for case in cases]
