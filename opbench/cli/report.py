"""Verb ``report``: result files (or the history database) -> report.md, a self-contained
report.html and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from opbench.errors import UsageError

from .gate import add_backend_pair_options, backend_pair

EPILOG = """examples:
  opbench report results.jsonl perf.jsonl --out report/
  opbench report perf.jsonl --baseline torch           ratios of every backend to torch
  opbench report new.jsonl --against base.jsonl        headline: regressions against base
  opbench report new.jsonl --against base.jsonl --base-backend cpu --new-backend mine
                                                       ... comparing two differently named backends
  opbench report --db opbench.sqlite                   latest commit against the previous one
  opbench report --db opbench.sqlite --since 756216d   ... against 756216d, with the history
  opbench report --db opbench.sqlite --since v1.0      ... against the commit of tag v1.0"""


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "report", help="turn result files (or the history database) into report.md and"
        " report.html with plots", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn JSON Lines result files, or the latest runs of a history database, "
        "into report.md, a self-contained report.html and plots/*.png in --out.",
    )
    p.add_argument("results", nargs="*", metavar="RESULTS", help="JSON Lines result file(s)")
    p.add_argument("--out", default="opbench-report", metavar="DIR",
                   help="output directory (default: %(default)s)")
    p.add_argument("--baseline", default=None, metavar="BACKEND",
                   help="backend the perf ratios divide by (default: cpu if it ran, else the "
                        "first by name)")
    p.add_argument("--against", nargs="+", default=None, metavar="BASE",
                   help="result files of an earlier run: the headline counts regressions, "
                        "improvements and new failures against them (the gate's verdicts)")
    add_backend_pair_options(p, base="--against", new="RESULTS")
    p.add_argument("--db", default=None, metavar="PATH",
                   help="report the latest commit's runs of this history database instead")
    p.add_argument("--since", default=None, metavar="COMMIT|REF|DATE",
                   help="with --db: compare against this commit (sha prefix in the database, "
                        "git ref such as v1.0, or the first on or after an ISO date) and show "
                        "the history since")
    p.set_defaults(func=run_report)


def _check(args) -> Path:
    if bool(args.results) == bool(args.db):
        raise UsageError("give result files or --db PATH (one of them)")
    if args.since and not args.db:
        raise UsageError("--since needs --db")
    if args.against and args.db:
        raise UsageError("--against compares result files; with --db use --since")
    if backend_pair(args) and not args.against:
        raise UsageError("--base-backend/--new-backend pair backends for --against")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    return out


def run_report(args: argparse.Namespace) -> int:
    from opbench.harness.store import ResultFileError
    from opbench.reports.db import DatabaseError

    out = _check(args)
    try:
        files = _from_db(args, out) if args.db else _from_files(args, out)
    except (ResultFileError, DatabaseError, ValueError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write the report to {out}: {e.strerror or e}") from None
    plots = len(files.images)
    print(f"wrote {files.markdown} and {files.html} ({plots} plot{'' if plots == 1 else 's'})")
    return 0


def _from_files(args, out: Path):
    from opbench.reports.render import build_report

    return build_report(args.results, out, baseline=args.baseline, against=args.against,
                        pair=backend_pair(args))


def _from_db(args, out: Path):
    from opbench.reports.db import connect
    from opbench.reports.history import write_db_report

    conn = connect(args.db, create=False)
    try:
        return write_db_report(conn, out, since=args.since, baseline=args.baseline)
    except ImportError:
        raise UsageError("the history needs ruptures: pip install 'opbench[history]'") from None
    finally:
        conn.close()
