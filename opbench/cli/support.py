"""Verb ``support``: the op x backend support matrix, with the reasons for what is not."""

from __future__ import annotations

from collections import Counter

from opbench.harness.ops import support
from opbench.harness.pool import setup_failure
from opbench.harness.registry import backend_class, open_backend

from . import output
from .common import common_options, parse_backends, parse_ops, refuse_unused, select_cases

UNUSED = ("--devices", "--seed", "-j", "--results", "--output")


def register(subparsers, common) -> None:
    support = subparsers.add_parser("support", parents=[common_options(UNUSED)],
                                    help="op x backend support matrix with reasons")
    support.set_defaults(func=cmd_support)


def cmd_support(args) -> int:
    refuse_unused(args, "support", list(UNUSED),
                  " (it asks each backend which cases it supports; nothing runs)")
    names = parse_backends(args.backend)
    cases = select_cases(args)
    rows, broken = [], False
    for name in names:
        cls = backend_class(name)
        backend, why = _open(name)
        broken |= backend is None and cls.available()[0]
        for op in parse_ops(args.op):
            op_cases = [c for c in cases if c.op == op]
            rows.append(_support_row(cls.name, op, op_cases, backend, why))
        if backend:
            backend.close()
    output.print_support(rows)
    return 1 if broken else 0


def _open(name: str):
    """(backend, None), or (None, why not): not available here, or a constructor that raised
    (then the matrix still prints, and the exit code is 1)."""
    ok, why = backend_class(name).available()
    if not ok:
        return None, why
    try:
        return open_backend(name), None
    except Exception as exc:
        return None, setup_failure(name, exc)


def _support_row(backend_name, op, cases, backend, unavailable_reason) -> dict:
    if backend is None:
        return {"op": op, "backend": backend_name, "supported": 0, "total": len(cases),
                "reasons": Counter({f"unavailable: {unavailable_reason}": len(cases)})}
    reasons: Counter = Counter()
    supported = 0
    for case in cases:
        verdict = support(backend, case)
        if verdict is True:
            supported += 1
        else:
            reasons[str(verdict)] += 1
    return {"op": op, "backend": backend_name, "supported": supported, "total": len(cases),
            "reasons": reasons}
