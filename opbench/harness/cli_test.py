"""Verbs ``test``, ``support``, ``list`` and ``doctor``."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterator

from . import output
from .cases import Case, filter_cases
from .errors import UsageError
from .ops import SPECS
from .pool import make_backend, run_in_workers, run_inline
from .registry import backend_class, registered_names
from .store import ResultWriter, environment


def register(subparsers, common) -> None:
    test = subparsers.add_parser("test", parents=[common], help="check backends against the"
                                 " float64 oracles")
    test.add_argument("--quick", action="store_true",
                      help="a seeded subset covering every op and variant (seconds)")
    test.add_argument("--isolate", action="store_true",
                      help="run each backend in child processes: a crash or hang becomes a"
                           " CRASH/TIMEOUT record for that case and the run goes on")
    test.add_argument("--timeout", type=float, default=60.0,
                      help="per-case limit in seconds with --isolate or -j (default 60)")
    test.add_argument("-v", "--verbose", action="store_true",
                      help="also print unsupported cases")
    test.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    test.add_argument("--rope-cache", choices=["on", "off"], default=None,
                      help="backend option rope_cache (backends that have one)")
    test.set_defaults(func=cmd_test)
    support = subparsers.add_parser("support", parents=[common],
                                    help="op x backend support matrix with reasons")
    support.set_defaults(func=cmd_support)
    listing = subparsers.add_parser("list", parents=[common], help="list ops or case ids")
    listing.add_argument("--quick", action="store_true", help="list the quick subset")
    listing.set_defaults(func=cmd_list)
    doctor = subparsers.add_parser("doctor", help="every backend: available or why not,"
                                   " devices, versions")
    doctor.set_defaults(func=cmd_doctor)


# -- selection -------------------------------------------------------------------------------
def parse_ops(value: str | None) -> list[str]:
    if not value:
        return list(SPECS)
    ops = [op.strip().upper() for op in value.split(",") if op.strip()]
    unknown = [op for op in ops if op not in SPECS]
    if unknown:
        raise UsageError(f"unknown op {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    return ops


def parse_backends(value: str) -> list[str]:
    names = [b.strip() for b in value.split(",") if b.strip()]
    if not names:
        raise UsageError("no backend given to -b")
    for name in names:
        backend_class(name)  # raises UsageError for unknown names and bad references
    return names


def select_cases(args, quick: bool = False) -> list[Case]:
    if args.pattern:
        try:
            re.compile(args.pattern)
        except re.error as exc:
            raise UsageError(f"bad regular expression -p {args.pattern!r}: {exc}") from None
    selected: list[Case] = []
    for op in parse_ops(args.op):
        spec = SPECS[op]
        cases = spec.cases()
        if quick:
            cases = spec.quick_cases(seed=args.seed)
        selected += filter_cases(cases, args.pattern)
    return selected


def backend_options(args) -> dict:
    options = {}
    if getattr(args, "rope_cache", None):
        options["rope_cache"] = args.rope_cache == "on"
    return options


def _check_common(args) -> None:
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: needs at least 1 worker")
    if args.devices < 1:
        raise UsageError(f"--devices {args.devices}: needs at least 1 device")


# -- test ------------------------------------------------------------------------------------
def iter_records(name: str, args, cases: list[Case], run_id: str) -> Iterator[dict]:
    options = backend_options(args)
    if args.jobs > 1 or getattr(args, "isolate", False):
        yield from run_in_workers(name, backend_class(name).name, options, cases, args.seed,
                                  run_id, args.jobs, args.timeout)
    else:
        yield from run_inline(name, options, cases, args.seed, run_id)


def open_writer(path: str | None) -> ResultWriter | None:
    if not path:
        return None
    writer = ResultWriter(path)
    try:
        writer.open()
    except OSError as exc:
        raise UsageError(f"cannot write results to {path!r}: {exc.strerror}") from None
    return writer


def cmd_test(args) -> int:
    _check_common(args)
    names = parse_backends(args.backend)
    cases = select_cases(args, quick=args.quick)
    if not cases:
        raise UsageError("no case matches the given -o/-p")
    from .store import new_run_id

    run_id = new_run_id()
    writer = open_writer(args.results)
    report = output.make_reporter(args.output, verbose=args.verbose, quiet=args.quiet)
    failed = False
    try:
        for name in names:
            failed |= _test_backend(name, args, cases, run_id, writer, report)
    finally:
        if writer:
            writer.close()
        report.finish()
    return 1 if failed else 0


def _test_backend(name, args, cases, run_id, writer, report) -> bool:
    cls = backend_class(name)
    ok, why = cls.available()
    if not ok:
        report.skipped_backend(cls.name, why)
        return False
    env = environment(_backend_info(name, args))
    return record_backend_run(report, cls.name, len(cases),
                              iter_records(name, args, cases, run_id), writer, env)


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


def _backend_info(name: str, args) -> dict:
    try:
        backend = make_backend(name, backend_options(args))
        info = {"name": backend.name, **backend.info()}
        backend.close()
        return info
    except Exception as exc:  # info is best effort; the run itself reports real errors
        return {"name": name, "info_error": str(exc)}


# -- support, list, doctor -------------------------------------------------------------------
def cmd_support(args) -> int:
    names = parse_backends(args.backend)
    cases = select_cases(args)
    rows = []
    for name in names:
        cls = backend_class(name)
        ok, why = cls.available()
        backend = make_backend(name, {}) if ok else None
        for op in parse_ops(args.op):
            op_cases = [c for c in cases if c.op == op]
            rows.append(_support_row(cls.name, op, op_cases, backend, why))
        if backend:
            backend.close()
    output.print_support(rows)
    return 0


def _support_row(backend_name, op, cases, backend, unavailable_reason) -> dict:
    if backend is None:
        return {"op": op, "backend": backend_name, "supported": 0, "total": len(cases),
                "reasons": Counter({f"unavailable: {unavailable_reason}": len(cases)})}
    reasons: Counter = Counter()
    supported = 0
    for case in cases:
        verdict = backend.supports(case)
        if verdict is True:
            supported += 1
        else:
            reasons[str(verdict)] += 1
    return {"op": op, "backend": backend_name, "supported": supported, "total": len(cases),
            "reasons": reasons}


def cmd_list(args) -> int:
    if args.op or args.pattern or args.quick:
        for case in select_cases(args, quick=args.quick):
            print(case.id)
        return 0
    for op, spec in SPECS.items():
        cases = spec.cases()
        quick = spec.quick_cases()
        print(f"{op:10s} {len(cases):6d} cases ({len(quick)} in --quick)  "
              f"variants: {', '.join(spec.variant_keys)}")
    print(f"{'total':10s} {sum(len(s.cases()) for s in SPECS.values()):6d} cases")
    return 0


def cmd_doctor(args) -> int:
    for name in registered_names():
        try:
            cls = backend_class(name)
        except UsageError as exc:
            print(f"{name:8s} not loadable: {exc}")
            continue
        ok, why = cls.available()
        if not ok:
            print(f"{name:8s} unavailable: {why}")
            continue
        backend = make_backend(name, {})
        info = backend.info()
        backend.close()
        details = ", ".join(f"{k}={v}" for k, v in info.items())
        print(f"{name:8s} available  {details}")
    return 0
