"""The CLI end to end: verdicts, exit codes, usage errors without tracebacks, records, formats,
user backends loaded from a file, and crash/hang isolation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.harness.ops import SPECS

BROKEN_CPY = textwrap.dedent("""
    from opbench.backends.cpu import CpuBackend

    class Truncating(CpuBackend):
        name = "truncating"

        def cpy(self, src, out, perm, step=1, stream=None):
            super().cpy(src, out, perm, step, stream)
            self.synchronize()
            out[...] = 0  # overwrites the converted values: every case must fail
""")

CRASHING = textwrap.dedent("""
    import os
    import time
    from opbench.backends.cpu import CpuBackend

    class Crashy(CpuBackend):
        name = "crashy"

        def cpy(self, src, out, perm, step=1, stream=None):
            if tuple(perm) == (1, 0, 2):
                os._exit(3)          # a segfault, as far as the harness can tell
            if tuple(perm) == (2, 1, 0):
                time.sleep(30)       # a hang
            super().cpy(src, out, perm, step, stream)
""")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quick_cpy_passes_and_prints_summary(capsys):
    code, out, _ = run(capsys, "test", "-o", "CPY", "--quick")
    assert code == 0
    assert "tests passed" in out and "Backend cpu: OK" in out
    assert "CPY(type_src=" in out and ": OK" in out


@pytest.mark.parametrize("argv, message", [
    (["test", "-o", "NOPE"], "unknown op NOPE"),
    (["test", "-b", "nope"], "unknown backend 'nope'"),
    (["test", "-p", "("], "bad regular expression"),
    (["test", "-b", "/no/such/file.py:X"], "does not exist"),
    (["test", "-p", "matches-nothing-at-all"], "no case matches"),
    (["test", "-j", "0"], "at least 1 worker"),
    (["test", "--output", "yaml"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert err.count("\n") == 1


def test_user_backend_from_file_fails_and_results_are_recorded(tmp_path, capsys):
    backend_file = tmp_path / "mine.py"
    backend_file.write_text(BROKEN_CPY)
    results = tmp_path / "out" / "results.jsonl"
    code, out, _ = run(capsys, "test", "-b", f"{backend_file}:Truncating", "-o", "CPY",
                       "-p", "ne=\\[5,3,64\\],perm=\\[0,1,2\\],step=1\\)", "--results",
                       str(results))
    assert code == 1 and "Backend truncating: FAIL" in out and "bit-exact" in out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 9 and {r["status"] for r in records} == {"FAIL"}
    assert all(r["backend"] == "truncating" and r["schema"] == 1 for r in records)


def test_junit_and_csv_outputs_are_machine_readable(capsys):
    code, out, _ = run(capsys, "test", "-o", "GET_ROWS", "--quick", "--output", "junit")
    suite = ET.fromstring(out)
    assert code == 0 and suite.tag == "testsuite" and int(suite.get("tests")) > 0
    code, out, _ = run(capsys, "test", "-o", "GET_ROWS", "--quick", "--output", "csv")
    assert out.splitlines()[0].startswith("backend,device,op,case_id")


ABORTING = textwrap.dedent("""
    import os
    from opbench.backends.cpu import CpuBackend

    class Aborts(CpuBackend):
        name = "aborts"

        def cpy(self, src, out, perm, step=1, stream=None):
            os.abort()
""")


def test_a_crash_without_isolate_names_the_backends_line_that_crashed(tmp_path):
    backend_file = tmp_path / "aborts.py"
    backend_file.write_text(ABORTING)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "opbench", "test", "-b",
                           f"{backend_file}:Aborts", "-o", "CPY", "--quick", "-q"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in done.stderr
    assert f'File "{backend_file}", line 9 in cpy' in done.stderr


def test_junit_output_has_an_error_for_a_broken_run_and_a_failure_for_a_wrong_result():
    import io

    from opbench.cli.output import write_junit
    from opbench.harness.records import make_record

    records = [make_record(kind="test", backend="cpu", op="ROPE", case_id=f"ROPE({status})",
                           status=status, run_id="r", reason=f"why {status}", env={})
               for status in ("OK", "FAIL", "ERROR", "CRASH", "TIMEOUT", "UNSUPPORTED")]
    stream = io.StringIO()
    write_junit(records, stream)
    suite = ET.fromstring(stream.getvalue())
    tags = {case.get("name"): [child.tag for child in case] for case in suite}
    assert tags == {"ROPE(OK)": [], "ROPE(FAIL)": ["failure"], "ROPE(ERROR)": ["error"],
                    "ROPE(CRASH)": ["error"], "ROPE(TIMEOUT)": ["error"],
                    "ROPE(UNSUPPORTED)": ["skipped"]}
    [error] = suite.find("testcase[@name='ROPE(CRASH)']")
    assert error.get("type") == "CRASH" and error.get("message") == "why CRASH"
    assert [suite.get(k) for k in ("tests", "failures", "errors", "skipped")] == [
        "6", "1", "3", "1"]


def test_isolate_records_crash_and_timeout_and_goes_on(tmp_path, capsys):
    backend_file = tmp_path / "crashy.py"
    backend_file.write_text(CRASHING)
    results = tmp_path / "r.jsonl"
    code, out, _ = run(capsys, "test", "-b", f"{backend_file}:Crashy", "-o", "CPY", "-p",
                       r"type_src=f32,type=f32,ne=\[5,3,64\].*step=1\)", "--isolate",
                       "--timeout", "3", "--results", str(results))
    statuses = {json.loads(x)["case_id"]: json.loads(x)["status"]
                for x in results.read_text().splitlines()}
    assert code == 1
    assert sorted(statuses.values()) == ["CRASH", "OK", "OK", "TIMEOUT"]
    assert "CRASH" in out and "TIMEOUT" in out


def test_list_coverage_prints_axes_pairs_and_reasons(capsys):
    code, out, _ = run(capsys, "list", "--coverage", "-o", "SET_ROWS")
    assert code == 0 and "  axis type (3): {f32, f16, bf16}\n" in out
    assert "  axis nslots (3): {-, 40000, 70000}\n" in out  # "-": the axis left out
    assert "covered: full 100.0%" in out and "--quick 100.0%" in out
    assert "impossible: nslots {40000, 70000} with row" in out


SLOW_TO_START = textwrap.dedent("""
    import time
    from opbench.backends.cpu import CpuBackend

    class SlowStart(CpuBackend):
        name = "slowstart"

        def __init__(self, **options):
            time.sleep(4)            # a backend that takes a while to set up (a GPU context)
            super().__init__(**options)
""")


def test_timeout_counts_from_the_case_not_the_worker_start_up(tmp_path, capsys):
    backend_file = tmp_path / "slow.py"
    backend_file.write_text(SLOW_TO_START)
    code, out, _ = run(capsys, "test", "-b", f"{backend_file}:SlowStart", "-o", "CPY", "-p",
                       r"type_src=f32,type=f32,ne=\[5,3,64\],perm=\[0,1,2\],step=1\)",
                       "--isolate", "--timeout", "2")
    assert code == 0 and "TIMEOUT" not in out and "1/1 tests passed" in out


LOADS_ON_FIRST_USE = textwrap.dedent("""
    import time
    from opbench.backends.cpu import CpuBackend

    class LoadsOnFirstUse(CpuBackend):
        name = "loadsonfirstuse"
        loaded = False

        def warm_up(self):
            time.sleep(3)            # compiling its kernels on a busy machine
            self.loaded = True

        def cpy(self, *args, **kwargs):
            if not self.loaded:
                self.warm_up()
            super().cpy(*args, **kwargs)
""")


def test_a_workers_warm_up_is_start_up_not_the_first_cases_time(tmp_path, capsys):
    backend_file = tmp_path / "lazy.py"
    backend_file.write_text(LOADS_ON_FIRST_USE)
    code, out, _ = run(capsys, "test", "-b", f"{backend_file}:LoadsOnFirstUse", "-o", "CPY",
                       "-p", r"type_src=f32,type=f32,ne=\[5,3,64\],perm=\[0,1,2\],step=1\)",
                       "--isolate", "--timeout", "2")
    assert code == 0 and "TIMEOUT" not in out and "1/1 tests passed" in out


def test_list_and_support(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "ROPE" in out and "total" in out
    code, out, _ = run(capsys, "support", "-b", "cpu", "-o", "ROPE,CPY")
    n_rope = len(SPECS["ROPE"].cases())
    assert code == 0 and f"{n_rope}/{n_rope}" in out


def test_the_pytest_suites_refuse_an_unknown_backend_once(tmp_path):
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(root / "suites"), "--backend", "nosuch"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert done.stderr.count("unknown backend 'nosuch'") == 1
    assert "passed" not in done.stdout and "error" not in done.stdout.lower()
