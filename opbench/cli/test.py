"""Verb ``test``: check backends against the float64 oracles, case by case."""

from __future__ import annotations

import os
import sys
from typing import Iterator

from opbench.backends.common.host import available_memory_bytes
from opbench.errors import UsageError
from opbench.harness.cases import Case
from opbench.harness.executors import run_cases
from opbench.harness.pool import run_inline
from opbench.harness.records import environment, new_run_id
from opbench.harness.registry import backend_label

from . import output
from .common import (
    add_allow_unavailable,
    add_executor_option,
    add_large_option,
    add_shard_option,
    check_common,
    check_timeout,
    executor_arg,
    isolated,
    isolation_options,
    model_option,
    open_writer,
    option_flags,
    parse_backends,
    record_backend_run,
    run_backend,
    select_cases,
    shard_arg,
    warn_if_large_cases_outgrow_memory,
)


def register(subparsers, common) -> None:
    test = subparsers.add_parser("test", parents=[common], help="check backends against the"
                                 " float64 oracles")
    test.add_argument("--quick", action="store_true",
                      help="a seeded subset covering every op and variant (seconds)")
    model_option(test)
    add_large_option(test, "run")
    isolation_options(test, "case", 60.0)
    test.add_argument("-v", "--verbose", action="store_true",
                      help="also print unsupported cases")
    test.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    add_allow_unavailable(test)
    test.add_argument("--rope-cache", choices=["on", "off"], default=None,
                      help="backend option rope_cache (backends that have one)")
    add_executor_option(test, "case")
    add_shard_option(test)
    test.add_argument("--ranks", action="store_true",
                      help="-o COPY_ASYNC on the cpu backend: every logical device its own"
                           " process, a torch.distributed rank (gloo on 127.0.0.1); copy_async"
                           " between devices is send/receive")
    test.set_defaults(func=cmd_test)


def iter_records(name: str, args, cases: list[Case], run_id: str) -> Iterator[dict]:
    options = option_flags(args)
    if isolated(args):
        yield from run_cases(executor_arg(args), name, backend_label(name, options), options,
                             cases, args.seed, run_id, args.jobs, check_timeout(args))
    else:
        yield from run_inline(name, options, cases, args.seed, run_id)


def cmd_test(args) -> int:
    check_common(args)
    check_timeout(args)
    executor_arg(args)
    names = parse_backends(args.backend, option_flags(args))
    if args.ranks:
        check_ranks(args, names)
    cases = select_cases(args, quick=args.quick)
    if args.large:
        warn_if_large_cases_outgrow_memory(cases, available_memory_bytes())
    if args.ranks:
        cases = torchrun_cases(cases)
    if not cases:
        raise UsageError("no case matches the given -o/-p/--model/--large" + (" in this --shard"
                                                                        if args.shard else ""))
    if args.ranks and torchrun_rank() not in (None, 0):
        return _run_silent_rank(args, cases)
    run_id = new_run_id()
    writer = open_writer(args.results, shard_arg(args))
    report = output.make_reporter(args.output, verbose=args.verbose, quiet=args.quiet)
    failed = False
    try:
        if args.ranks:
            failed = _test_as_ranks(args, cases, run_id, writer, report)
        for name in names if not args.ranks else ():
            failed |= _test_backend(name, args, cases, run_id, writer, report)
    finally:
        if writer:
            writer.close()
        report.finish()
    return 1 if failed else 0


def _test_backend(name, args, cases, run_id, writer, report) -> bool:
    return run_backend(report, args, name, option_flags(args), len(cases),
                       lambda: iter_records(name, args, cases, run_id), writer)


# -- COPY_ASYNC across ranks -------------------------------------------------------------------
RANK_OPS = ["COPY_ASYNC"]


def check_ranks(args, names: list[str]) -> None:
    """--ranks runs COPY_ASYNC's contract on the cpu backend, one process per device."""
    if args.op is None or [op.strip().upper() for op in args.op.split(",")] != RANK_OPS:
        raise UsageError("--ranks runs only the async-copy contract: use -o COPY_ASYNC")
    if names != ["cpu"] or option_flags(args):
        raise UsageError("--ranks runs the cpu backend's kernels in every rank: use -b cpu"
                         " (no backend options)")
    if args.jobs != 1 or args.executor != "local" or args.isolate:
        raise UsageError("--ranks: every case already runs one process per device; drop -j,"
                         " --executor and --isolate")
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        raise UsageError("--ranks needs torch.distributed: pip install 'opbench[torch]'") from None


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (env:// rendezvous) started it, else None."""
    from opbench.harness.ranks.launch import under_torchrun

    return int(os.environ["RANK"]) if under_torchrun() else None


def torchrun_cases(cases: list[Case]) -> list[Case]:
    """Under torchrun, the cases on WORLD_SIZE ranks (a case's ranks are the job's ranks); the
    others are named on stderr by count, not run.  Without torchrun, every case."""
    if torchrun_rank() is None:
        return cases
    world = int(os.environ["WORLD_SIZE"])
    fitting = [case for case in cases if int(case["ndev"]) == world]
    if len(fitting) < len(cases) and torchrun_rank() == 0:
        print(f"opbench: under torchrun with WORLD_SIZE={world}: {len(cases) - len(fitting)} of"
              f" {len(cases)} cases need another number of ranks and do not run (-p"
              f" 'ndev={world}' selects those that do)", file=sys.stderr)
    return fitting


def _copy_rank_records(args, cases, run_id):
    from opbench.harness.ranks.copy_cases import copy_async_jobs
    from opbench.harness.ranks.launch import run_as_torchrun_rank, run_ranks

    jobs = copy_async_jobs(cases, args.seed)
    if torchrun_rank() is not None:  # this process is one rank; rank 0 gets the records
        return run_as_torchrun_rank(jobs, run_id)
    return run_ranks(jobs, run_id, check_timeout(args))


def _test_as_ranks(args, cases, run_id, writer, report) -> bool:
    env = environment({"name": "cpu", "ranks": True})
    return record_backend_run(report, "cpu", len(cases), _copy_rank_records(args, cases, run_id),
                              writer, env)


def _run_silent_rank(args, cases) -> int:
    """A torchrun rank other than 0: runs its part of every case, rank 0 reports."""
    for _record in _copy_rank_records(args, cases, new_run_id()):
        pass
    return 0
