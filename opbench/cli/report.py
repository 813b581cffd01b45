"""Verb ``report``: result files -> report.md, a self-contained report.html and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from opbench.errors import UsageError


def register(subparsers, common) -> None:
    _register_report(subparsers)


def _register_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="turn result files into report.md and report.html with plots",
        description="Turn JSON Lines result files into report.md, a self-contained report.html "
        "and plots/*.png in --out.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="JSON Lines result file(s)")
    p.add_argument("--out", default="opbench-report", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from opbench.harness.store import ResultFileError
    from opbench.reports.render import build_report

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        files = build_report(args.results, out)
    except ResultFileError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {files.markdown} and {files.html} ({len(files.images)} plots)")
    return 0
