"""What every verb shares: the common options, op/backend/case selection, the results file and
the per-backend record loop.  Verb modules import from here, never from each other."""

from __future__ import annotations

import argparse
import re
from collections import Counter

from opbench.errors import UsageError
from opbench.harness.cases import Case, filter_cases
from opbench.harness.ops import SPECS
from opbench.harness.registry import backend_options, open_backend, parse_ref, split_backend_list
from opbench.harness.shards import Shard, parse_shard, take_shard
from opbench.harness.store import ResultWriter


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def common_options() -> argparse.ArgumentParser:
    """Options every verb that runs cases shares."""
    common = Parser(add_help=False)
    common.add_argument("-b", "--backend", default="cpu",
                        help="backends, comma separated: a registered name, package.module:Class"
                             " or path/file.py:Class, each optionally with options"
                             " (cpu:rope_cache=off,jit=off; opbench doctor lists them)"
                             " (default: cpu)")
    common.add_argument("-o", "--op", default=None, help="ops, comma separated (default: all)")
    common.add_argument("-p", "--pattern", default=None,
                        help="regular expression matched against case ids")
    common.add_argument("--devices", type=int, default=1, help="logical devices (default: 1)")
    common.add_argument("--seed", type=int, default=0, help="input seed (default: 0)")
    common.add_argument("-j", "--jobs", type=int, default=1,
                        help="worker processes (default: 1)")
    common.add_argument("--results", default=None,
                        help="append JSON Lines records to this file as each case finishes")
    common.add_argument("--output", choices=["console", "csv", "json", "junit"],
                        default="console", help="output format on stdout")
    return common


def isolation_options(parser: argparse.ArgumentParser, item: str, timeout: float) -> None:
    """--isolate and --timeout of a verb whose items (cases, scenarios) may run in workers."""
    parser.add_argument("--isolate", action="store_true",
                        help="run each backend in child processes: a crash or hang becomes a"
                             f" CRASH/TIMEOUT record for that {item} and the run goes on")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"per-{item} limit in seconds with --isolate or -j"
                             f" (default {timeout:g})")


# -- selection -------------------------------------------------------------------------------
def parse_ops(value: str | None) -> list[str]:
    if not value:
        return list(SPECS)
    ops = [op.strip().upper() for op in value.split(",") if op.strip()]
    unknown = [op for op in ops if op not in SPECS]
    if unknown:
        raise UsageError(f"unknown op {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    return ops


def parse_backends(value: str, extra: dict | None = None) -> list[str]:
    """The ``-b`` refs (``NAME[:opt=val,...]``), each checked now -- backend found, options
    known and well-formed, ``extra`` (option flags such as --rope-cache) declared by it -- so
    a typo is a usage error before anything runs."""
    refs = split_backend_list(value)
    if not refs:
        raise UsageError("no backend given to -b")
    for ref in refs:
        backend_options(parse_ref(ref), extra)
    return refs


def compile_pattern(pattern: str | None) -> re.Pattern | None:
    """The -p regular expression, or a usage error naming what is wrong with it."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"bad regular expression -p {pattern!r}: {exc}") from None


def select_cases(args, quick: bool = False) -> list[Case]:
    compile_pattern(args.pattern)
    selected: list[Case] = []
    for op in parse_ops(args.op):
        spec = SPECS[op]
        cases = spec.quick_cases(seed=args.seed) if quick else spec.cases()
        selected += filter_cases(cases, args.pattern)
    return take_shard(selected, shard_arg(args))


def add_shard_option(parser) -> None:
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N (1-based; a stable split by case id: the N"
                             " shards are disjoint and together the whole selection); records"
                             " carry it for `opbench merge`")


def shard_arg(args) -> Shard | None:
    text = getattr(args, "shard", None)
    if text is None:
        return None
    try:
        return parse_shard(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def option_flags(args) -> dict:
    """Backend options given as flags: ``--rope-cache on|off`` is ``rope_cache=on|off`` for
    every -b backend (an option in the ref itself wins)."""
    options = {}
    if getattr(args, "rope_cache", None):
        options["rope_cache"] = args.rope_cache
    return options


def check_common(args) -> None:
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1 worker")
    if args.devices < 1:
        raise UsageError(f"--devices {args.devices}: needs at least 1 device")


def parse_threshold(text: str, option: str = "--threshold") -> float:
    from opbench.perf.gate import parse_threshold as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


# -- records ---------------------------------------------------------------------------------
def open_writer(path: str | None, shard: Shard | None = None) -> ResultWriter | None:
    if not path:
        return None
    writer = ResultWriter(path, stamp={"shard": str(shard)} if shard else None)
    try:
        writer.open()
    except OSError as exc:
        raise UsageError(f"cannot write results to {path!r}: {exc.strerror}") from None
    return writer


def record_backend_run(report, backend_name: str, total: int, records, writer, env) -> bool:
    """Store, print and count one backend's records as they come; True when any failed.
    Shared by every verb that runs cases (test, scenario)."""
    counts: Counter = Counter()
    with report.progress(backend_name, total) as advance:
        for record in records:
            record["env"] = env
            if writer:
                writer.write(record)
            counts[record["status"]] += 1
            report.case(record)
            advance()
    return report.backend_summary(backend_name, counts)


def backend_info(name: str, options: dict) -> dict:
    try:
        backend = open_backend(name, options)
        info = {"name": backend.name, **backend.info()}
        backend.close()
        return info
    except Exception as exc:  # info is best effort; the run itself reports real errors
        return {"name": name, "info_error": str(exc)}
