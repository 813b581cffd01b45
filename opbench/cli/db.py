"""Verb ``db``: keep results over time in a SQLite file (``db import RUN.jsonl``)."""

from __future__ import annotations

import argparse

from opbench.errors import UsageError

EPILOG = """examples:
  opbench db import results.jsonl --commit $(git rev-parse HEAD) --branch main
  opbench db import perf.jsonl --db ci/history.sqlite
exit codes: 0 imported (or already there), 2 a bad results file or an unusable database"""


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "db", help="import result files into a SQLite history database",
        description="Results over time: runs imported into one SQLite file, read by "
        "`opbench history` and `opbench report --db`.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    imp = actions.add_parser("import", help="add the runs of result files (a run already in the"
                             " database is skipped)")
    imp.add_argument("results", nargs="+", metavar="RUN.jsonl", help="JSON Lines result file(s)")
    imp.add_argument("--commit", default=None, help="commit the runs measured (default: the"
                     " git commit recorded in the records)")
    imp.add_argument("--branch", default=None, help="branch name to store with the runs")
    add_db_option(imp)
    imp.set_defaults(func=cmd_import)
    parser.set_defaults(func=lambda args: _no_action(parser))


def add_db_option(parser) -> None:
    from opbench.reports.db import DEFAULT_DB

    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help="SQLite history database (default: %(default)s)")


def _no_action(parser) -> int:
    parser.print_help()
    return 2


def cmd_import(args) -> int:
    from opbench.harness.store import ResultFileError
    from opbench.reports.db import DatabaseError, import_file

    for path in args.results:
        try:
            result = import_file(args.db, path, commit=args.commit, branch=args.branch)
        except (ResultFileError, DatabaseError) as exc:
            raise UsageError(str(exc)) from None
        skipped = f"; {len(result.skipped)} already there" if result.skipped else ""
        print(f"{path}: imported {len(result.imported)} run(s), {result.records} records into"
              f" {args.db}{skipped}")
    return 0
