"""Verb ``history``: per case, median time and worst error across commits, with the steps."""

from __future__ import annotations

import argparse
from pathlib import Path

from opbench.errors import UsageError

from .common import compile_pattern, parse_ops
from .db import add_db_option

EPILOG = """examples:
  opbench history -o CPY                   every CPY case across the imported commits
  opbench history -b cpu -p 'f16' --steps  only the cases whose time stepped
  opbench history --plot history/          also write history/history.png
a step is where a case's median time moved to a new level (PELT change-point detection on log
time, penalty scaled to the series' own noise); it is shown at the first commit of the new level"""


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "history", help="median time and worst error per case across commits, with steps",
        description="Per case: median time and worst error across the commits imported with "
        "`opbench db import`, and the commits where the time stepped.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--backend", default=None, help="backends, comma separated")
    parser.add_argument("-o", "--op", default=None, help="ops, comma separated")
    parser.add_argument("-p", "--pattern", default=None, help="regular expression on case ids")
    parser.add_argument("--kind", choices=["test", "perf", "scenario"], default=None,
                        help="only records of this kind (default: all)")
    parser.add_argument("--since", default=None, metavar="COMMIT|REF|DATE",
                        help="start at this commit (sha prefix), git ref (v1.0) or ISO date")
    parser.add_argument("--min-change", default="5%", metavar="PCT",
                        help="smallest step reported (default: %(default)s)")
    parser.add_argument("--steps", action="store_true", help="list only cases with a step")
    parser.add_argument("--plot", default=None, metavar="DIR", help="write DIR/history.png")
    add_db_option(parser)
    parser.set_defaults(func=cmd_history)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def cmd_history(args) -> int:
    from opbench.reports import history
    from opbench.reports.db import DatabaseError, connect

    from .common import parse_threshold

    min_change = parse_threshold(args.min_change, "--min-change")
    compile_pattern(args.pattern)
    selection = dict(kind=args.kind, backends=_split(args.backend),
                     ops=parse_ops(args.op) if args.op else None, pattern=args.pattern,
                     since=args.since)
    try:
        conn = connect(args.db, create=False)
        table = history.series(conn, **selection)
        conn.close()
    except (DatabaseError, history.SinceError) as exc:
        raise UsageError(str(exc)) from None
    if table.empty:
        raise UsageError(f"no record in {args.db} matches the selection")
    steps = _change_points(history, table, min_change)
    _print(history, table, steps, only_steps=args.steps)
    if args.plot:
        _plot(table, steps, Path(args.plot))
    return 0


def _change_points(history, table, min_change):
    try:
        return history.change_points(table, min_change=min_change)
    except ImportError:
        raise UsageError("step detection needs ruptures: pip install 'opbench[history]'") from None


def _print(history, table, steps, *, only_steps: bool) -> None:
    from opbench.reports.tables import format_duration_ns

    summary = history.summary(table, steps)
    if only_steps:
        summary = summary[summary["steps"] != ""]
    commits = table.drop_duplicates("commit_label").sort_values("position")["commit_label"]
    cases = len(summary.drop_duplicates(history.CASE))
    print(f"{cases} case(s) over {len(commits)} commit(s): {' '.join(commits)}")
    wide = history.wide(table)
    mixed = _cases_timed_two_ways(history, summary)
    for row in summary.itertuples(index=False):
        key = (row.kind, row.backend, row.device, row.op, row.case_id, row.timing)
        times = " ".join(format_duration_ns(v) for v in wide.loc[key]) if key in wide.index else ""
        where = f"{row.backend}/{row.device}" if row.device else row.backend
        method = f" [timed {row.timing}]" if key[:-1] in mixed else ""
        error = "" if row.worst_error != row.worst_error else f"  worst error {row.worst_error:.3g}"
        print(f"[{row.kind}] {where} {row.case_id}{method}: {times}{error}")
        if row.steps:
            print(f"    steps at {row.steps}")
    stepped = len(steps.drop_duplicates(history.CASE))
    print(f"{len(steps)} step(s) found in {stepped} case(s)")
    if mixed:
        print(f"note: {len(mixed)} case(s) were timed both with and without perf --repeat (or "
              "with and without its anchor); each method is its own series, no step is "
              "looked for between them: the method alone changes the times")


def _cases_timed_two_ways(history, summary) -> set[tuple]:
    """Cases with more than one timing method: their lines name the method."""
    methods = summary.groupby(history.CASE, dropna=False)["timing"].nunique()
    return set(methods[methods > 1].index)


def _plot(table, steps, out: Path) -> None:
    from opbench.reports.plots import history_figure
    from opbench.reports.render import figure_png

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--plot {out}: {exc.strerror}") from None
    fig = history_figure(table, steps)
    path = out / "history.png"
    path.write_bytes(figure_png(fig))
    print(f"wrote {path}")
