"""The regression gate: classification of BASE vs NEW, its markdown/JUnit output, and the CLI."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness import store
from opbench.harness.records import make_record
from opbench.perf.gate import CaseKey, gate, parse_threshold
from opbench.reports.gate_summary import gate_junit, gate_markdown


def _samples(rng, median_ns: float, n: int = 80) -> list[int]:
    noisy = median_ns * rng.lognormal(0, 0.05, n)
    noisy[rng.random(n) < 0.03] *= 3  # a few preempted samples
    return [int(x) for x in noisy]


def _rec(case_id: str, status: str = "OK", kind: str = "test", samples=None, **kw) -> dict:
    perf = None
    if samples is not None:
        perf = {"samples_ns": samples, "median_ns": float(np.median(samples)), "n": len(samples)}
    return make_record(kind=kind, backend="cpu", op=case_id.split("(")[0], case_id=case_id,
                             status=status, run_id="r", device="cpu:0", perf=perf, env={}, **kw)


def base_and_new(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """One case of every category the gate knows."""
    rng = np.random.default_rng(seed)
    base = [
        _rec("ROPE(a)"), _rec("ROPE(breaks)"), _rec("ATTN(dropped)"), _rec("CPY(fixed)", "FAIL"),
        _rec("CPY(gone)"), _rec("CPY(xfail)", "XFAIL"),
        _rec("CPY(slow)", kind="perf", samples=_samples(rng, 1e5)),
        _rec("CPY(fast)", kind="perf", samples=_samples(rng, 1e5)),
        _rec("CPY(same)", kind="perf", samples=_samples(rng, 1e5)),
        _rec("CPY(few)", kind="perf", samples=_samples(rng, 1e5, n=3)),
    ]
    new = [
        _rec("ROPE(a)"), _rec("ROPE(breaks)", "FAIL", reason="nmse 0.3 > 1e-7"),
        _rec("ATTN(dropped)", "UNSUPPORTED", reason="no paged KV"), _rec("CPY(fixed)"),
        _rec("CPY(xfail)", "FAIL"), _rec("CPY(brand_new)"),
        _rec("CPY(slow)", kind="perf", samples=_samples(rng, 1.15e5)),
        _rec("CPY(fast)", kind="perf", samples=_samples(rng, 0.8e5)),
        _rec("CPY(same)", kind="perf", samples=_samples(rng, 1e5)),
        _rec("CPY(few)", kind="perf", samples=_samples(rng, 1e5, n=3)),
    ]
    return base, new


def ids(changes) -> list[str]:
    return [c.key.case_id if hasattr(c, "key") else c.case_id for c in changes]


def test_every_category_is_classified():
    result = gate(*base_and_new())
    assert ids(result.newly_failing) == ["ROPE(breaks)"]
    assert ids(result.newly_unsupported) == ["ATTN(dropped)"]
    assert ids(result.regressions) == ["CPY(slow)"]
    assert ids(result.improvements) == ["CPY(fast)"]
    assert ids(result.unchanged) == ["CPY(same)"]
    assert ids(result.not_significant) == ["CPY(few)"]
    assert ids(result.fixed) == ["CPY(fixed)"]
    assert ids(result.other_status_changes) == ["CPY(xfail)"]  # known failure -> FAIL: not new
    assert ids(result.missing) == ["CPY(gone)"] and ids(result.new_cases) == ["CPY(brand_new)"]
    assert result.compared == 9 and result.failed and result.exit_code == 1


def test_identical_runs_pass():
    base, _ = base_and_new()
    result = gate(base, base)
    assert not result.failed and result.exit_code == 0
    assert not result.regressions and not result.improvements


@pytest.mark.parametrize("slowdown, regressed", [(1.0, False), (1.03, False), (1.15, True)])
def test_perf_regression_needs_the_threshold_cleared(slowdown, regressed):
    rng = np.random.default_rng(5)
    base = [_rec("CPY(x)", kind="perf", samples=_samples(rng, 1e5, n=200))]
    new = [_rec("CPY(x)", kind="perf", samples=_samples(rng, 1e5 * slowdown, n=200))]
    assert gate(base, new, threshold=0.05).failed is regressed


def test_a_failed_run_has_no_perf_verdict():
    rng = np.random.default_rng(0)
    base = [_rec("CPY(x)", kind="perf", samples=_samples(rng, 1e5))]
    new = [_rec("CPY(x)", "ERROR", kind="perf", samples=_samples(rng, 9e5))]
    result = gate(base, new)
    assert ids(result.newly_failing) == ["CPY(x)"] and not result.regressions


def test_the_last_record_of_a_case_wins():
    base = [_rec("ROPE(a)", "FAIL"), _rec("ROPE(a)", "OK")]
    new = [_rec("ROPE(a)", "OK"), _rec("ROPE(a)", "FAIL")]
    assert ids(gate(base, new).newly_failing) == ["ROPE(a)"]


def test_cases_are_matched_per_backend_device_and_kind():
    one = _rec("ROPE(a)")
    other_device = {**one, "device": "cpu:1"}
    result = gate([one], [other_device])
    assert result.missing == [CaseKey("test", "cpu", "cpu:0", "ROPE(a)")]
    assert result.new_cases == [CaseKey("test", "cpu", "cpu:1", "ROPE(a)")]


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("12.5%", 0.125),
                                         ("0", 0.0)])
def test_parse_threshold(text, value):
    assert parse_threshold(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "abc", "-5%", "%", "nan%"])
def test_parse_threshold_rejects(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


def test_markdown_summary_lists_each_category_and_escapes():
    base, new = base_and_new()
    base.append(_rec("ROPE(<script>x</script>)"))
    new.append(_rec("ROPE(<script>x</script>)", "FAIL", reason="a|b"))
    text = gate_markdown(gate(base, new), "base.jsonl", "new.jsonl")
    assert text.startswith("## ❌ opbench gate FAILED: 2 newly failing, 1 newly unsupported, "
                           "1 perf regressions")
    for title in ("Newly failing (2)", "Newly unsupported (1)", "Perf regressions (1)",
                  "Improvements (1)", "Unchanged (1)", "Not significant (1)", "Fixed (1)",
                  "Missing from new (1)", "New cases (1)"):
        assert f"### {title}" in text
    assert "<script>" not in text and "&lt;script&gt;" in text and "a\\|b" in text


def test_junit_has_a_failure_per_fatal_finding():
    suite = ET.fromstring(gate_junit(gate(*base_and_new())))
    failed = {case.get("name") for case in suite if case.find("failure") is not None}
    assert failed == {"ROPE(breaks)", "ATTN(dropped)", "CPY(slow)", "CPY(gone)"}
    assert suite.get("failures") == "4" and suite.get("skipped") == "0"
    assert int(suite.get("tests")) == len(suite) == 9


def test_junit_with_allow_missing_skips_the_missing_case():
    suite = ET.fromstring(gate_junit(gate(*base_and_new(), allow_missing=True)))
    skipped = [case.get("name") for case in suite if case.find("skipped") is not None]
    assert skipped == ["CPY(gone)"] and suite.get("failures") == "3"


# -- completeness: the gate fails what it cannot see -----------------------------------------
def test_an_empty_new_fails():
    base, _ = base_and_new()
    result = gate(base, [])
    assert result.new_empty and result.failed
    assert gate(base, [], allow_missing=True).failed  # nothing to judge is never a pass


def test_missing_cases_fail_unless_allowed():
    base = [_rec("ROPE(a)"), _rec("ROPE(b)")]
    new = [_rec("ROPE(a)")]
    result = gate(base, new)
    assert ids(result.missing_cases) == ["ROPE(b)"] and result.failed
    assert not gate(base, new, allow_missing=True).failed


def test_a_missing_backend_or_device_fails_even_with_allow_missing():
    base = [_rec("ROPE(a)"), {**_rec("ROPE(a)"), "backend": "torch"},
            {**_rec("ROPE(a)"), "device": "cpu:1"}]
    new = [_rec("ROPE(a)")]
    result = gate(base, new, allow_missing=True)
    assert result.missing_backends == [("test", "torch")]
    assert result.missing_devices == [("test", "cpu", "cpu:1")]
    assert result.missing_cases == [] and result.failed


@pytest.mark.parametrize("status", ["CRASH", "TIMEOUT", "ERROR"])
def test_a_broken_record_in_new_fails_even_when_base_lacks_the_case(status):
    base = [_rec("ROPE(a)")]
    new = [_rec("ROPE(a)"), _rec("ROPE(new)", status, reason="worker died")]
    result = gate(base, new)
    assert ids(result.broken) == ["ROPE(new)"] and result.failed


def test_a_failing_case_new_in_new_fails():
    result = gate([_rec("ROPE(a)")], [_rec("ROPE(a)"), _rec("CPY(new)", "FAIL")])
    assert ids(result.newly_failing) == ["CPY(new)"] and result.failed
    assert not gate([_rec("ROPE(a)")], [_rec("ROPE(a)"), _rec("CPY(new)")]).failed


def test_a_failure_without_a_reason_is_explained_by_its_errors():
    """A FAIL's why is in its errors (a scenario's first divergence, a case's first bad values);
    the gate's table showed an empty reason for it."""
    divergence = "first divergence at step 0, layer 1, device 0: nmse=inf > 1e-09"
    result = gate([_rec("SCENARIO(a)"), _rec("ROPE(a)")],
                  [_rec("SCENARIO(a)", "FAIL", errors=[divergence]),
                   _rec("ROPE(a)", "ERROR", reason="ValueError: bad")])
    assert {c.key.case_id: c.reason for c in result.newly_failing} == {
        "SCENARIO(a)": divergence, "ROPE(a)": "ValueError: bad"}
    assert [c.reason for c in result.broken] == ["ValueError: bad"]


# -- the CLI ---------------------------------------------------------------------------------
def _write(path, records) -> str:
    with store.ResultWriter(path) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def test_cli_gate_exit_codes_and_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    base, new = base_and_new()
    b, n = _write(tmp_path / "base.jsonl", base), _write(tmp_path / "new.jsonl", new)
    summary, junit = tmp_path / "out" / "summary.md", tmp_path / "out" / "junit.xml"
    code = main(["gate", b, n, "--threshold", "5%", "--summary", str(summary),
                 "--junit", str(junit)])
    assert code == 1
    assert "Perf regressions" in summary.read_text()
    assert ET.parse(junit).getroot().get("failures") == "4"
    assert "opbench gate FAILED" in capsys.readouterr().out
    assert main(["gate", b, b, "--summary", str(summary)]) == 0


def _gate_lines(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["gate", *argv, "--summary", os.devnull])
    return code, capsys.readouterr().out.splitlines()


def test_cli_gate_prints_a_line_per_kind_of_gap(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)  # on Actions: not the job's summary
    base = [_rec("ROPE(a)"), _rec("ROPE(b)"), {**_rec("ROPE(a)"), "backend": "torch"}]
    new = [_rec("ROPE(a)"), _rec("CPY(x)", "CRASH", reason="SIGSEGV")]
    b, n = _write(tmp_path / "b.jsonl", base), _write(tmp_path / "n.jsonl", new)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, lines = _gate_lines(capsys, b, n)
    assert code == 1
    assert any(line.startswith("FAIL: NEW lacks 1 backend(s)") and "torch" in line
               and "instead" not in line for line in lines)  # NEW has no other backend
    assert any(line.startswith("FAIL: NEW lacks 1 case(s)") and "ROPE(b)" in line
               for line in lines)
    assert any(line.startswith("FAIL: NEW holds 1 CRASH/TIMEOUT/ERROR") for line in lines)
    code, lines = _gate_lines(capsys, b, str(empty))
    assert code == 1 and lines[0].startswith("FAIL: NEW holds no records")
    only_cases = _write(tmp_path / "b2.jsonl", [_rec("ROPE(a)"), _rec("ROPE(b)")])
    subset = _write(tmp_path / "n2.jsonl", [_rec("ROPE(a)")])
    code, lines = _gate_lines(capsys, only_cases, subset, "--allow-missing")
    assert code == 0 and lines[0].startswith("warning: NEW lacks 1 case(s)")


def test_cli_gate_appends_to_github_step_summary(tmp_path, monkeypatch):
    base, _ = base_and_new()
    b = _write(tmp_path / "base.jsonl", base)
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert main(["gate", b, b]) == 0
    text = step.read_text()
    assert text.startswith("earlier step\n") and "opbench gate passed" in text


def test_cli_gate_writes_the_summary_file_and_the_step_summary(tmp_path, monkeypatch, capsys):
    """The shipped workflow passes --summary (an artifact); the run's page shows only
    $GITHUB_STEP_SUMMARY, so the gate writes both, and prints the table only when neither."""
    base, new = base_and_new()
    b, n = _write(tmp_path / "base.jsonl", base), _write(tmp_path / "new.jsonl", new)
    step, summary = tmp_path / "step_summary.md", tmp_path / "summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    assert main(["gate", b, n, "--summary", str(summary)]) == 1
    table = summary.read_text()
    assert "### Perf regressions (1)" in table
    assert step.read_text() == "earlier step\n" + table
    assert "### Perf regressions" not in capsys.readouterr().out  # written, not printed
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    assert main(["gate", b, n]) == 1
    assert "### Perf regressions (1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda b, bad: ["gate", b, bad], "bad.jsonl:2: malformed JSON"),
        (lambda b, bad: ["gate", b, b, "--threshold", "5"], "--threshold: threshold '5'"),
        (lambda b, bad: ["gate", b, b + ".missing"], "cannot read results file"),
    ],
)
def test_cli_gate_bad_input_is_one_line_exit_2(tmp_path, capsys, make_args, message):
    b = _write(tmp_path / "base.jsonl", [_rec("ROPE(a)")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(b).read() + "{oops\n")
    assert main(make_args(b, str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith("opbench: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_gate_pairs_two_backends_of_one_ab_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    rng = np.random.default_rng(2)
    fast = _rec("ROPE(x)", kind="perf", samples=_samples(rng, 1e5))
    slow = {**_rec("ROPE(x)", kind="perf", samples=_samples(rng, 1.2e5)), "backend": "slowcpu"}
    ab = _write(tmp_path / "ab.jsonl", [fast, slow])
    assert main(["gate", ab, ab, "--base-backend", "cpu", "--new-backend", "slowcpu"]) == 1
    assert "[perf] cpu vs slowcpu/cpu:0 ROPE(x)" in capsys.readouterr().out
    assert main(["gate", ab, ab, "--base-backend", "slowcpu", "--new-backend", "cpu"]) == 0
    assert main(["gate", ab, ab, "--base-backend", "cpu", "--new-backend", "gpu"]) == 2
    assert "NEW has no records of backend 'gpu'" in capsys.readouterr().err
    assert main(["gate", ab, ab, "--base-backend", "cpu"]) == 2


def test_cli_gate_names_the_backend_new_has_instead(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    b = _write(tmp_path / "b.jsonl", [_rec("ROPE(a)")])
    n = _write(tmp_path / "n.jsonl", [{**_rec("ROPE(a)"), "backend": "rv/slow.py:Slow"}])
    code, lines = _gate_lines(capsys, b, n)
    assert code == 1
    assert ("FAIL: NEW lacks 1 backend(s) present in BASE: cpu (test); NEW has "
            "rv/slow.py:Slow (test) instead; to compare them with each other, give "
            "--base-backend cpu --new-backend rv/slow.py:Slow") in lines


def test_junit_reports_a_broken_run_as_an_error_and_a_wrong_result_as_a_failure():
    base = [_rec(f"ROPE({name})") for name in ("fail", "error", "crash", "timeout")]
    new = [_rec("ROPE(fail)", "FAIL", reason="nmse 0.3 > 1e-7"),
           _rec("ROPE(error)", "ERROR", reason="ValueError: bad"),
           _rec("ROPE(crash)", "CRASH", reason="SIGSEGV"),
           _rec("ROPE(timeout)", "TIMEOUT", reason="no answer in 3 s")]
    suite = ET.fromstring(gate_junit(gate(base, new)))
    tags = {case.get("name"): [child.tag for child in case] for case in suite}
    assert tags == {"ROPE(fail)": ["failure"], "ROPE(error)": ["error"],
                    "ROPE(crash)": ["error"], "ROPE(timeout)": ["error"]}
    [error] = suite.find("testcase[@name='ROPE(crash)']")
    assert error.get("type") == "CRASH" and "SIGSEGV" in error.get("message")
    assert (suite.get("failures"), suite.get("errors")) == ("1", "3")
