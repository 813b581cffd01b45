"""What the verbs that run cases (test, scenario, perf) print: console lines (colour and a
progress bar on a terminal only; perf's own test-backend-ops line), or, through the one emitter
``emit``, CSV / JSON / JUnit XML of every record on stdout."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections import Counter
from xml.sax.saxutils import escape, quoteattr

from rich.console import Console
from rich.control import strip_control_codes
from rich.markup import escape as markup_escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from opbench.harness.records import BROKEN, FAILING, NOT_JUDGED, PASSING

STYLE = {"OK": "green", "FAIL": "bold red", "ERROR": "bold red", "CRASH": "bold red",
         "TIMEOUT": "bold red", "XFAIL": "yellow", "XPASS": "yellow", "UNSUPPORTED": "dim"}


def summarize(counts: Counter) -> tuple[int, int, bool]:
    """(passed, judged, failed?) where judged excludes unsupported and known failures."""
    passed = sum(counts[s] for s in PASSING)
    judged = passed + sum(counts[s] for s in FAILING)
    return passed, judged, any(counts[s] for s in FAILING)


class ConsoleReporter:
    fmt = "console"

    def __init__(self, verbose: bool = False, quiet: bool = False) -> None:
        self.out = Console(highlight=False, soft_wrap=True, emoji=False)
        self.err = Console(stderr=True, highlight=False)
        self.verbose, self.quiet = verbose, quiet
        self._progress: Progress | None = None

    @contextlib.contextmanager
    def progress(self, backend: str, total: int):
        if not self.err.is_terminal or total < 50:
            yield lambda: None
            return
        columns = [TextColumn(f"[bold]{markup_escape(backend)}"), BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.out, transient=True) as bar:
            task = bar.add_task("cases", total=total)
            yield lambda: bar.advance(task)

    def _line(self, text: str, style: str = "") -> None:
        self._styled((text, style))

    def _styled(self, *parts: tuple[str, str]) -> None:
        """One line of (text, style) parts.  Where the console shows no style at all (a pipe,
        a file, CI's log) the text is written as it is: rich renders such a line to the same
        characters, but at ~0.2 ms a line: 0.5 s of the main process's CPU in a 2,260-case
        run (0.02 s written directly), taken from the workers on a two-core machine."""
        if self.out.color_system is None and not self.out.is_terminal:
            line = strip_control_codes("".join(text for text, _ in parts))
            self.out.file.write(line.expandtabs(8) + "\n")  # what rich does to a Text
            return
        self.out.print(Text.assemble(*((text, style or "") for text, style in parts)))

    def header(self, text: str) -> None:
        self._line(text)

    def case(self, record: dict, side: str = "") -> None:
        status = record["status"]
        if status == "UNSUPPORTED":
            if self.verbose:
                self._line(f"  {record['case_id']}: not supported [{record['reason']}]", "dim")
            return
        if status == "OK" and self.quiet:
            return
        label = {"XFAIL": "XFAIL (known failure)", "XPASS": "XPASS (stale known failure)"}
        self._styled((f"  {record['case_id']}: ", ""),
                     (label.get(status, status), STYLE[status]))
        if status != "OK":  # every line under its case: a CRASH's error holds a stderr tail
            for error in record["errors"] or [record["reason"]]:
                for line in str(error).splitlines() or [""]:
                    self._line(f"    {line}", "red" if status in FAILING else "yellow")

    def skipped_backend(self, name: str, why: str) -> None:
        self._line(f"Backend {name}: SKIPPED ({why})", "yellow")

    def unavailable_backend(self, name: str, why: str) -> None:
        self._problem(f"Backend {name}: FAIL (unavailable: {why}; --allow-unavailable skips"
                      " it)")

    def broken_backend(self, name: str, why: str) -> None:
        self._problem(f"Backend {name}: FAIL ({why})")

    def _problem(self, text: str) -> None:
        self.err.print(markup_escape(text), style="bold red", soft_wrap=True)

    def backend_summary(self, name: str, counts: Counter) -> bool:
        passed, judged, failed = summarize(counts)
        extras = [f"{counts[s]} {s.lower()}" for s in ("XFAIL", "UNSUPPORTED") if counts[s]]
        self._line(f"  {passed}/{judged} tests passed" + (f" ({', '.join(extras)})"
                                                          if extras else ""))
        self._styled((f"  Backend {name}: ", ""),
                     ("FAIL", "bold red") if failed else ("OK", "bold green"),
                     ("" if judged or failed else " (but no case ran: none was supported)", ""))
        return failed

    def finish(self) -> None:
        pass


class PerfConsoleReporter(ConsoleReporter):
    """perf's console: one test-backend-ops style line per record, as it arrives."""

    def case(self, record: dict, side: str = "") -> None:
        if not (self.quiet and record["status"] == "OK"):  # -q: only problems
            self._line(perf_line(record, side))


def perf_line(record: dict, side: str = "") -> str:
    """``  OP(...): N runs - ...``; in an A/B run prefixed by the side (``A``/``B``)."""
    from opbench.reports.console import format_perf_line

    lead = f"  {side} " if side else "  "
    if record["status"] == "OK":
        return lead + format_perf_line(record["case_id"], record["perf"])
    return f"{lead}{record['case_id']}: {record['status']} ({record['reason']})"


class CollectingReporter(ConsoleReporter):
    """Machine formats: quiet console on stderr, every record through ``emit`` at the end."""

    def __init__(self, fmt: str) -> None:
        super().__init__(quiet=True)
        self.out = Console(stderr=True, highlight=False, emoji=False)
        self.fmt = fmt
        self.records: list[dict] = []

    def header(self, text: str) -> None:
        pass

    def case(self, record: dict, side: str = "") -> None:
        self.records.append(record)

    def finish(self) -> None:
        emit(self.records, self.fmt)


def make_reporter(fmt: str, verbose: bool = False, quiet: bool = False,
                  console: type[ConsoleReporter] = ConsoleReporter) -> ConsoleReporter:
    return console(verbose, quiet) if fmt == "console" else CollectingReporter(fmt)


# -- the one emitter of machine formats ------------------------------------------------------------
CSV_FIELDS = ["backend", "device", "op", "case_id", "dtype", "status", "reason"]
#: a perf record's statistics, as CSV columns (the samples stay in --results)
PERF_FIELDS = ["n", "median_ns", "iqr_ns", "bytes", "flops", "gbps", "gflops", "bound",
               "fraction_of_ceiling", "ceiling_threads", "cache_resident", "above_ceiling"]


def emit(records: list[dict], fmt: str, stream=None) -> None:
    """Every record in ``fmt`` (csv, json or junit) on ``stream`` (stdout)."""
    {"csv": write_csv, "json": write_json, "junit": write_junit}[fmt](records, stream)


def _perf_stats(record: dict) -> dict | None:
    perf = {k: v for k, v in (record.get("perf") or {}).items() if k != "samples_ns"}
    return perf or None


def write_csv(records: list[dict], stream=None) -> None:
    timed = any(r.get("kind") == "perf" for r in records)
    fields = CSV_FIELDS + (PERF_FIELDS if timed else [])
    writer = csv.DictWriter(stream or sys.stdout, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({**record, **(_perf_stats(record) or {})})


def write_json(records: list[dict], stream=None) -> None:
    rows = []
    for r in records:
        row = {k: r.get(k) for k in CSV_FIELDS + ["metrics", "errors"]}
        if r.get("kind") == "perf":
            row["perf"] = _perf_stats(r)
        rows.append(row)
    json.dump(rows, stream or sys.stdout, indent=1, default=str)
    (stream or sys.stdout).write("\n")


def write_junit(records: list[dict], stream=None) -> None:
    stream = stream or sys.stdout
    errors = sum(r["status"] in BROKEN for r in records)
    failures = sum(r["status"] in FAILING for r in records) - errors
    skipped = sum(r["status"] in NOT_JUDGED for r in records)
    stream.write('<?xml version="1.0" encoding="utf-8"?>\n')
    stream.write(f'<testsuite name="opbench" tests="{len(records)}" failures="{failures}"'
                 f' errors="{errors}" skipped="{skipped}">\n')
    for r in records:
        stream.write(f"  <testcase classname={quoteattr(r['backend'] + '.' + r['op'])}"
                     f" name={quoteattr(r['case_id'])}>")
        if r["status"] in FAILING:
            tag = "error" if r["status"] in BROKEN else "failure"  # the run, or the result
            body = escape("\n".join(r["errors"] or [str(r["reason"])]))
            stream.write(f"<{tag} type={quoteattr(r['status'])}"
                         f" message={quoteattr(str(r['reason']))}>{body}</{tag}>")
        elif r["status"] in NOT_JUDGED:
            stream.write(f"<skipped message={quoteattr(str(r['reason']))}/>")
        stream.write("</testcase>\n")
    stream.write("</testsuite>\n")


def print_support(rows: list[dict]) -> None:
    console = Console(highlight=False, soft_wrap=True)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    by_key = {(r["op"], r["backend"]): r for r in rows}
    width = max(12, *(len(b) + 2 for b in backends))
    console.print(markup_escape(f"{'op':12s}" + "".join(f"{b:>{width}s}" for b in backends)))
    for op in ops:
        cells = []
        for b in backends:
            r = by_key[(op, b)]
            cells.append(f"{r['supported']}/{r['total']}".rjust(width))
        console.print(markup_escape(f"{op:12s}" + "".join(cells)))
    console.print()
    for r in rows:
        for reason, count in r["reasons"].most_common(6):
            console.print(markup_escape(f"{r['backend']} {r['op']}: {count} unsupported:"
                                        f" {reason}"))
