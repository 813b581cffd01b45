"""The CLI never lets a run go green by what it skipped, never loses a run to one broken
backend, and never answers with a traceback."""

from __future__ import annotations

import textwrap

import pytest

from opbench.cli.main import main

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
