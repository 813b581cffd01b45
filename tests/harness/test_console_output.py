"""The console reporter writes unstyled lines itself where no style can show (pipes, files, CI
logs): the characters must be exactly those rich renders on a console without colour."""

import io
from collections import Counter

from rich.console import Console

from opbench.cli.output import ConsoleReporter

RECORDS = [
    {"status": "OK", "case_id": "ROPE(type=f32,ne=[128,3,33],mode=normal)", "errors": [],
     "reason": ""},
    {"status": "FAIL", "case_id": "CPY(type=f16,ne=[7,1,1])",
     "errors": ["max err [bold]2.5e-3[/] > 1e-3 at [0, 4]", "tab\there", "carriage\rreturn"],
     "reason": ""},
    {"status": "XFAIL", "case_id": "ATTN(kv=[x])", "errors": [], "reason": "known [issue]"},
    {"status": "XPASS", "case_id": "ATTN(kv=[y])", "errors": [], "reason": "stale"},
    {"status": "TIMEOUT", "case_id": "GET_ROWS(n=1)", "errors": [],
     "reason": "no result after 2 s"},
]


def _report(console: Console) -> str:
    reporter = ConsoleReporter()
    reporter.out = console
    reporter.header("Backend cpu [jit=on]")
    for record in RECORDS:
        reporter.case(record)
    reporter.backend_summary("cpu[x]", Counter(OK=1, FAIL=1))
    return console.file.getvalue()


def _console(**kwargs) -> Console:
    return Console(file=io.StringIO(), highlight=False, soft_wrap=True, emoji=False, **kwargs)


def test_plain_lines_match_what_rich_renders_without_colour():
    plain = _console()  # a StringIO is no terminal: the reporter's own writes
    assert plain.color_system is None and not plain.is_terminal
    rendered = _console(force_terminal=True, color_system=None)  # rich renders every line
    want = _report(rendered)
    assert _report(plain) == want
    assert "  CPY(type=f16,ne=[7,1,1]): FAIL\n" in want
    assert "    max err [bold]2.5e-3[/] > 1e-3 at [0, 4]\n" in want  # markup shown, not parsed
    assert "  Backend cpu[x]: FAIL\n" in want


def test_a_colour_console_still_gets_styles():
    styled = _console(force_terminal=True, color_system="standard")
    text = _report(styled)
    assert "\x1b[1;31mFAIL\x1b[0m" in text and "ROPE(type=f32,ne=[128,3,33],mode=normal)" in text


def test_a_backend_that_ran_no_case_says_so_beside_its_ok():
    plain = _console()
    reporter = ConsoleReporter()
    reporter.out = plain
    assert reporter.backend_summary("ggml", Counter(UNSUPPORTED=14)) is False
    reporter.backend_summary("cpu", Counter(OK=3, UNSUPPORTED=1))
    lines = plain.file.getvalue().splitlines()
    assert lines[:2] == ["  0/0 tests passed (14 unsupported)",
                         "  Backend ggml: OK (but no case ran: none was supported)"]
    assert lines[3] == "  Backend cpu: OK"


def test_every_line_of_an_error_stays_under_its_case():
    plain = _console()
    reporter = ConsoleReporter()
    reporter.out = plain
    reporter.case({"status": "CRASH", "case_id": "CPY(x)", "reason": "worker died",
                   "errors": ["worker died (SIGABRT); stderr tail:\nFatal Python error\n  File x"]})
    assert plain.file.getvalue().splitlines() == [
        "  CPY(x): CRASH", "    worker died (SIGABRT); stderr tail:", "    Fatal Python error",
        "      File x"]
