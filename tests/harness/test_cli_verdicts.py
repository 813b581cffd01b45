"""The CLI never lets a run go green by what it skipped, never loses a run to one broken
backend, and never answers with a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from opbench.cli.main import main
from opbench.harness.ops import SPECS

UNAVAILABLE = textwrap.dedent("""
    from opbench.backends.cpu import CpuBackend

    class Absent(CpuBackend):
        name = "absent"

        @classmethod
        def available(cls):
            return False, "pip install absent-kernels"
""")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def backend_file(tmp_path, source: str, name: str = "user_backend.py") -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


@pytest.mark.parametrize("verb", [["test", "-o", "CPY", "--quick"], ["scenario", "--steps", "1"]])
def test_a_named_unavailable_backend_fails_with_its_reason(tmp_path, capsys, verb):
    absent = backend_file(tmp_path, UNAVAILABLE) + ":Absent"
    code, out, err = run(capsys, *verb, "-b", f"{absent},cpu")
    assert code == 1
    assert "Backend absent: FAIL (unavailable: pip install absent-kernels" in err
    assert "Backend cpu: OK" in out  # the other backend still ran
    code, out, err = run(capsys, *verb, "-b", f"{absent},cpu", "--allow-unavailable")
    assert code == 0 and "Backend absent: SKIPPED (pip install absent-kernels)" in out


# -- a broken backend costs one line, never the run ----------------------------------------
CONSTRUCTOR_RAISES = textwrap.dedent("""
    import multiprocessing
    from opbench.backends.cpu import CpuBackend

    class Always(CpuBackend):
        name = "ctorboom"

        def __init__(self, **options):
            raise ValueError("constructor boom")

    class InWorkers(CpuBackend):
        name = "workerboom"

        def __init__(self, **options):
            if multiprocessing.parent_process() is not None:
                raise RuntimeError("no device in a child process")
            super().__init__(**options)
""")


@pytest.mark.parametrize("mode", [[], ["-j", "2"], ["--isolate"]])
def test_a_raising_constructor_fails_its_backend_once_and_the_others_run(tmp_path, capsys, mode):
    ref = backend_file(tmp_path, CONSTRUCTOR_RAISES) + ":Always"
    code, out, err = run(capsys, "test", "-b", f"{ref},cpu", "-o", "CPY", "--quick", "-q", *mode)
    assert code == 1
    assert err.count("Backend ctorboom: FAIL") == 1
    assert "could not be constructed: ValueError: constructor boom" in err
    assert "Traceback" not in err + out and "CRASH" not in out
    assert "Backend cpu: OK" in out


def test_a_raising_constructor_fails_its_scenario_backend_in_one_line(tmp_path, capsys):
    ref = backend_file(tmp_path, CONSTRUCTOR_RAISES) + ":Always"
    code, out, err = run(capsys, "scenario", "--steps", "1", "-b", f"{ref},cpu")
    assert code == 1 and err.count("Backend ctorboom: FAIL") == 1
    assert "Traceback" not in err and "Backend cpu: OK" in out


def test_a_constructor_raising_only_in_workers_fails_once_not_per_case(tmp_path, capsys):
    ref = backend_file(tmp_path, CONSTRUCTOR_RAISES) + ":InWorkers"
    code, out, err = run(capsys, "test", "-b", ref, "-o", "CPY", "--quick", "-j", "2")
    assert code == 1
    assert err.count("Backend workerboom: FAIL") == 1
    assert "RuntimeError: no device in a child process" in err
    assert "CRASH" not in out and "Traceback" not in err


def test_support_reports_a_raising_constructor_in_the_matrix(tmp_path, capsys):
    ref = backend_file(tmp_path, CONSTRUCTOR_RAISES) + ":Always"
    code, out, err = run(capsys, "support", "-b", f"{ref},cpu", "-o", "CPY")
    assert code == 1 and "Traceback" not in err
    assert re.search(r"ctorboom CPY: \d+ unsupported: unavailable: backend", out)
    assert "could not be constructed: ValueError: constructor boom" in out


@pytest.mark.parametrize("source, where, what", [
    ("import os\n\nclass X(object)\n    pass\n", 3, "SyntaxError"),
    ("import os\nimport opbench_no_such_module\n", 2, "ModuleNotFoundError"),
    ("x = 1\nraise RuntimeError('boom at import')\n", 2, "RuntimeError: boom at import"),
])
def test_a_backend_file_that_does_not_import_is_one_line_with_file_and_line(
        tmp_path, capsys, source, where, what):
    path = backend_file(tmp_path, source, "bad_backend.py")
    code, out, err = run(capsys, "test", "-b", f"{path}:X", "-o", "CPY", "--quick")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"bad_backend.py:{where}: " in err and what in err


CRASHING = textwrap.dedent("""
    import ctypes
    import os
    import sys
    import time
    from opbench.backends.cpu import CpuBackend

    class Abort(CpuBackend):
        name = "aborter"

        def cpy(self, src, out, perm, step=1, stream=None):
            print("last words before the abort", file=sys.stderr, flush=True)
            os.abort()

    class Segv(CpuBackend):
        name = "segv"

        def cpy(self, src, out, perm, step=1, stream=None):
            ctypes.string_at(0)

    class Hang(CpuBackend):
        name = "hang"

        def cpy(self, src, out, perm, step=1, stream=None):
            time.sleep(60)
""")
ONE_CPY = ["-o", "CPY", "--quick", "-p", r"type_src=f16,type=f16,ne=\[5,3,64\],perm=\[1,0,2\]"]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("cls, signal_name", [("Abort", "SIGABRT"), ("Segv", "SIGSEGV")])
def test_a_crash_record_names_the_signal_and_keeps_the_stderr_tail(
        tmp_path, capsys, cls, signal_name):
    ref = backend_file(tmp_path, CRASHING, "crashing_backend.py") + ":" + cls
    results = tmp_path / "r.jsonl"
    code, out, err = run(capsys, "test", "-b", ref, *ONE_CPY, "--isolate",
                         "--results", str(results))
    assert code == 1
    [record] = _records(results)
    assert record["status"] == "CRASH"
    assert f"worker process died (killed by {signal_name})" in record["reason"]
    assert "crashing_backend.py" in record["reason"]  # faulthandler's frame of the user's code
    if cls == "Abort":
        assert "last words before the abort" in record["reason"]


def test_timeout_alone_isolates_and_must_be_positive(tmp_path, capsys):
    ref = backend_file(tmp_path, CRASHING) + ":Hang"
    results = tmp_path / "r.jsonl"
    code, _, _ = run(capsys, "test", "-b", ref, *ONE_CPY, "--timeout", "1",
                     "--results", str(results))
    assert code == 1
    assert [r["status"] for r in _records(results)] == ["TIMEOUT"]
    for bad in ("0", "-1", "nan"):
        code, _, err = run(capsys, "test", "-b", ref, *ONE_CPY, "--timeout", bad)
        assert code == 2 and "needs a number of seconds > 0" in err


@pytest.mark.parametrize("argv, message", [
    (["scenario", "-o", "ROPE"], "`opbench scenario` does not use -o"),
    (["scenario", "-p", "zigzag"], "does not use -p without --matrix"),
    (["scenario", "--split", "ring", "--devices", "99"], "devices=99 must be <= 6"),
    (["test", "-o", ""], "no op given to -o"),
    (["test", "-p", ""], "-p '' is empty"),
    (["list", "--results", "x.jsonl"], "`opbench list` does not use --results"),
    (["list", "--output", "json"], "`opbench list` does not use --output"),
    (["list", "-j", "2"], "`opbench list` does not use -j"),
    (["list", "--seed", "3"], "does not use --seed without --quick"),
    (["support", "--results", "x.jsonl"], "`opbench support` does not use --results"),
    (["support", "-j", "2"], "`opbench support` does not use -j"),
    (["support", "--seed", "3"], "`opbench support` does not use --seed"),
    (["perf", "-o", "CPY", "--quantile", "2"], "--quantile is read by --ab only"),
    (["perf", "-o", "CPY", "--threshold", "10%"], "--threshold is read by --ab only"),
    (["perf", "-o", "CPY", "--epochs", "2"], "--epochs is read by --ab only"),
    (["perf", "-o", "CPY", "--settle-ms", "20"], "--settle-ms is read by --ab only"),
    (["perf", "-o", "CPY", "--ab", "cpu", "cpu", "-b", "ggml"], "--ab A B names the backends"),
])
def test_options_a_verb_would_ignore_are_refused(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("argv", [["test", "-o", "CPY", "--quick"], ["scenario"],
                                  ["perf", "-o", "CPY", "--sizes", "small"]])
def test_a_negative_seed_is_a_usage_error_before_anything_runs(capsys, argv):
    code, out, err = run(capsys, *argv, "--seed", "-1")
    assert code == 2 and "argument --seed: -1 must be >= 0" in err
    assert "Traceback" not in err and "passed" not in out


@pytest.mark.parametrize("verb, hidden", [
    ("list", ["-b BACKEND", "--devices", "-j JOBS", "--results", "--output"]),
    ("support", ["--devices", "--seed", "-j JOBS", "--results", "--output"]),
    ("scenario", ["-o OP"])])
def test_help_leaves_out_the_options_a_verb_refuses(capsys, verb, hidden):
    with pytest.raises(SystemExit):
        run(capsys, verb, "--help")
    text = capsys.readouterr().out
    assert "-p PATTERN" in text and not [flag for flag in hidden if flag in text]


def test_an_op_named_twice_runs_its_table_once(capsys):
    once = run(capsys, "test", "-o", "CPY", "--quick", "-q")[1]
    twice = run(capsys, "test", "-o", "CPY,cpy", "--quick", "-q")[1]
    cases = len(SPECS["CPY"].quick_cases(seed=0))
    assert once == twice and f"{cases}/{cases} tests passed" in once


def test_perf_offers_only_the_outputs_it_writes(capsys):
    with pytest.raises(SystemExit):
        run(capsys, "perf", "--help")
    assert "--output {console,csv,json}" in capsys.readouterr().out
    code, _, err = run(capsys, "perf", "--output", "junit", "-o", "CPY")
    assert code == 2 and "invalid choice: 'junit'" in err


def test_perf_quiet_prints_only_problems(capsys):
    argv = ["perf", "-o", "GET_ROWS", "--sizes", "small", "--budget-ms", "1", "--min-samples",
            "2", "--warmup", "1", "--no-calibrate"]
    code, loud, _ = run(capsys, *argv)
    assert code == 0 and "GET_ROWS(" in loud
    code, quiet, _ = run(capsys, *argv, "-q")
    assert code == 0 and quiet == ""  # not even the backend's header over nothing


# -- result files: every finished record counts once, a cut-off tail costs one warning -------
def _quick_cpy_into(capsys, path) -> None:
    assert run(capsys, "test", "-o", "CPY", "--quick", "-q", "--results", str(path))[0] == 0


def test_report_counts_a_case_rerun_into_the_same_file_once(tmp_path, capsys):
    results = tmp_path / "twice.jsonl"
    _quick_cpy_into(capsys, results)
    _quick_cpy_into(capsys, results)
    cases = len(results.read_text().splitlines()) // 2
    code, out, _ = run(capsys, "report", str(results), "--out", str(tmp_path / "rep"))
    assert code == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"{cases} records" in report and f"{2 * cases} records" not in report


def test_a_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    results = tmp_path / "cut.jsonl"
    _quick_cpy_into(capsys, results)
    whole = results.read_text()
    lines = len(whole.splitlines())
    results.write_text(whole[:-40])  # the writer was killed mid-line
    code, _, err = run(capsys, "report", str(results), "--out", str(tmp_path / "rep"))
    assert code == 0
    assert f"opbench: warning: {results}:{lines}: skipped a truncated last line" in err
    assert f"{lines - 1} records" in (tmp_path / "rep" / "report.md").read_text()
    code, out, err = run(capsys, "gate", str(results), str(results), "--summary", os.devnull)
    assert code == 0 and "skipped a truncated last line" in err


def test_a_corrupt_line_before_the_end_stays_an_error(tmp_path, capsys):
    results = tmp_path / "corrupt.jsonl"
    _quick_cpy_into(capsys, results)
    lines = results.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:50] + "\n"
    results.write_text("".join(lines))
    for argv in (["report", str(results), "--out", str(tmp_path / "rep")],
                 ["gate", str(results), str(results)]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"{results}:4: malformed JSON" in err and err.count("\n") == 1


def test_report_and_gate_refuse_a_record_without_an_id_in_one_line(tmp_path, capsys):
    results = tmp_path / "noid.jsonl"
    _quick_cpy_into(capsys, results)
    record = json.loads(results.read_text().splitlines()[0])
    results.write_text(json.dumps({**record, "case_id": None}) + "\n")
    for argv in (["report", str(results), "--out", str(tmp_path / "rep")],
                 ["gate", str(results), str(results)]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert "noid.jsonl:1: case_id=None must be a non-empty string" in err


def test_report_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    _quick_cpy_into(capsys, results)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "report", str(results), "--out", str(blocker / "sub"))
    assert code == 2 and err.count("\n") == 1 and "cannot write the report" in err


# -- pipes and signals: the process ends quietly -------------------------------------------
def _opbench(*argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "opbench", *argv], stderr=subprocess.PIPE,
                            text=True, **popen)


def _read_one_line_then_close(*argv) -> tuple[int, str]:
    proc = _opbench(*argv, stdout=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


def test_a_closed_pipe_ends_quietly():
    # far more than a pipe buffer holds: the writer is bound to hit the closed pipe
    code, err = _read_one_line_then_close("list", "-o", "ROPE,ATTN")
    assert code == 128 + signal.SIGPIPE and err == ""
    for argv in (["test", "-o", "CPY", "--quick", "--output", "csv"],
                 ["test", "-o", "CPY", "--quick"]):
        code, err = _read_one_line_then_close(*argv)
        assert "Traceback" not in err and "Error" not in err, argv


@pytest.fixture()
def ctrl_c_delivered():
    """Python's own Ctrl-C handler in this process for the test: pytest started from a script
    with ``&`` (or under nohup) inherits SIGINT ignored, and so would every child it starts --
    a Ctrl-C test would then test nothing and fail."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _run_until_records(results, *extra, sig, to_group: bool, env=None):
    """Start `test -j 2`, wait for records, send ``sig``; (exit code, stderr)."""
    proc = _opbench("test", "-o", "ATTN", "-j", "2", "-q", "--results", str(results),
                    *extra, stdout=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
            not results.exists() or results.read_text().count("\n") < 4):
        time.sleep(0.1)
    (os.killpg if to_group else os.kill)(proc.pid, sig)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    return proc, err


def test_ctrl_c_under_jobs_ends_quietly_with_130_and_keeps_records(tmp_path, ctrl_c_delivered):
    results = tmp_path / "r.jsonl"
    proc, err = _run_until_records(results, sig=signal.SIGINT, to_group=True)
    assert proc.returncode == 130
    assert err == "opbench: interrupted; records written so far are kept\n"
    records = _records(results)
    assert len(records) >= 4 and all(r["status"] == "OK" for r in records)


def test_killing_the_parent_leaves_no_worker_no_log_and_no_traceback(tmp_path):
    results, temp = tmp_path / "r.jsonl", tmp_path / "tmp"
    temp.mkdir()
    proc, err = _run_until_records(results, sig=signal.SIGKILL, to_group=False,
                                   env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == -signal.SIGKILL and err == ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.2)
    assert not _group_alive(proc.pid)  # the workers saw the pipe close and ended
    assert all(r["status"] == "OK" for r in _records(results))
    assert list(temp.iterdir()) == []  # no worker's stderr log outlives the run


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class _PythonReportingItsSigint:
    """A process (as ``_start_ignoring_sigint`` starts one) that prints whether SIGINT is
    ignored at its first line: the disposition a spawned worker has while it imports."""

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"],
            stdout=subprocess.PIPE, text=True)


def test_workers_start_with_ctrl_c_ignored_so_an_early_one_prints_no_traceback(ctrl_c_delivered):
    # the worker ignores SIGINT from exec on, not only once its imports are done
    from opbench.harness.pool import _start_ignoring_sigint
    process = _PythonReportingItsSigint()
    _start_ignoring_sigint(process)
    out, _ = process.popen.communicate(timeout=60)
    assert out.strip() == str(signal.SIG_IGN)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # parent restored


class _ProcessInterruptedWhileStarting:
    def start(self) -> None:
        # aimed at the main thread, as a terminal's Ctrl-C usually lands
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def test_a_ctrl_c_while_a_worker_starts_still_reaches_the_parent(ctrl_c_delivered):
    from opbench.harness.pool import _start_ignoring_sigint
    with pytest.raises(KeyboardInterrupt):
        _start_ignoring_sigint(_ProcessInterruptedWhileStarting())
        time.sleep(1)  # the pending signal is delivered on unblock, before this ends
