"""Results over time: `opbench db import`, `opbench history`, `opbench report --db`."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness import store
from opbench.harness.records import make_record
from opbench.perf import timing
from opbench.reports import db, history

pytest.importorskip("ruptures", reason="step detection needs ruptures (opbench[history])")

REPO = Path(__file__).resolve().parents[1]
#: median time of case CPY(a) per commit: one step down by 40% at the fourth commit
LEVELS_NS = [100e3, 101e3, 99e3, 60e3, 61e3, 59.5e3]
CEILINGS = {"copy_gbps": 20.0, "matmul_gflops": 100.0}


def _perf_record(rng, run_id: str, case_id: str, median_ns: float, runs: int = 5) -> dict:
    """A record as `opbench perf --repeat 5` writes it: each run's samples kept apart, each run
    shifted a little (what separate processes do), so the gate can weigh a change against the
    run-to-run spread instead of calling it AMBIGUOUS."""
    runs_ns = [(median_ns * rng.lognormal(0, 0.01) * rng.lognormal(0, 0.03, 30)).astype(np.int64)
               for _ in range(runs)]
    ns = np.concatenate(runs_ns)
    perf = timing.perf_block(timing.Samples(ns, warmup=1, budget_ms=1), nbytes=1 << 20,
                             flops=None, ceilings=CEILINGS)
    perf.update(runs_ns=[run.tolist() for run in runs_ns], repeat=runs)
    return make_record(kind="perf", backend="cpu", op="CPY", case_id=case_id,
                             status="OK", run_id=run_id, perf=perf, env={"python": "3"})


def _test_record(run_id: str, nmse: float) -> dict:
    return make_record(kind="test", backend="cpu", op="ROPE", case_id="ROPE(x)",
                             status="OK", run_id=run_id, env={},
                             metrics={"out": {"metric": "nmse", "value": nmse,
                                              "threshold": 1e-6, "n_bad": 0}})


def _write(path: Path, records: list[dict]) -> Path:
    with store.ResultWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


@pytest.fixture()
def run_files(tmp_path) -> list[Path]:
    """Six runs of six commits: CPY(a) steps down at the 4th, CPY(b) stays flat."""
    rng = np.random.default_rng(0)
    files = []
    for i, level in enumerate(LEVELS_NS):
        run_id = f"run{i}"
        records = [_perf_record(rng, run_id, "CPY(a)", level),
                   _perf_record(rng, run_id, "CPY(b)", 200e3 * rng.lognormal(0, 0.01)),
                   _test_record(run_id, 1e-9 * (i + 1))]
        files.append(_write(tmp_path / f"r{i}.jsonl", records))
    return files


def _import_all(files, database) -> None:
    for i, path in enumerate(files):
        assert main(["db", "import", str(path), "--commit", f"c{i}" + "a" * 39,
                     "--branch", "main", "--db", str(database)]) == 0


def test_import_is_idempotent_by_run_id(run_files, tmp_path, capsys):
    database = tmp_path / "h.sqlite"
    _import_all(run_files, database)
    assert main(["db", "import", str(run_files[0]), "--db", str(database)]) == 0
    assert "imported 0 run(s), 0 records" in capsys.readouterr().out
    conn = db.connect(database)
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 6
    assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 18
    assert db.schema_version(conn) == db.SCHEMA_VERSION


def test_a_case_rerun_into_one_run_is_stored_once(tmp_path):
    rng = np.random.default_rng(1)
    path = _write(tmp_path / "twice.jsonl", [_perf_record(rng, "r", "CPY(a)", 100e3),
                                             _perf_record(rng, "r", "CPY(a)", 50e3)])
    result = db.import_file(tmp_path / "h.sqlite", path)
    assert result.records == 1
    conn = db.connect(tmp_path / "h.sqlite")
    (median,) = conn.execute("SELECT median_ns FROM records").fetchone()
    assert median == pytest.approx(50e3, rel=0.1)  # the later record wins


def test_a_failing_import_leaves_the_database_as_before(run_files, tmp_path, monkeypatch):
    database = tmp_path / "h.sqlite"
    db.import_file(database, run_files[0])
    both = _write(tmp_path / "both.jsonl",
                  store.read_records(run_files[1]) + store.read_records(run_files[2]))
    calls = []

    def exploding(run_id, record):
        calls.append(run_id)
        if len(calls) > 4:  # the second run, after the first was inserted
            raise RuntimeError("boom")
        return original(run_id, record)

    original = db._record_row
    monkeypatch.setattr(db, "_record_row", exploding)
    with pytest.raises(RuntimeError):
        db.import_file(database, both)
    conn = db.connect(database)
    assert [r for (r,) in conn.execute("SELECT run_id FROM runs")] == ["run0"]
    assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 3


KILL_MID_IMPORT = """
import os, sys
from opbench.reports import db
original, seen = db._record_row, []
def dying(run_id, record):
    seen.append(run_id)
    if len(seen) == 5:
        os._exit(9)  # killed with the transaction open
    return original(run_id, record)
db._record_row = dying
db.import_file(sys.argv[1], sys.argv[2])
"""


def test_a_killed_import_leaves_the_database_as_before(run_files, tmp_path):
    database = tmp_path / "h.sqlite"
    db.import_file(database, run_files[0])
    both = _write(tmp_path / "both.jsonl",
                  store.read_records(run_files[1]) + store.read_records(run_files[2]))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILL_MID_IMPORT, str(database), str(both)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    conn = db.connect(database)
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 3


def test_parallel_imports_into_one_database(run_files, tmp_path):
    database = tmp_path / "h.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    jobs = [subprocess.Popen([sys.executable, "-m", "opbench", "db", "import", str(path),
                              "--db", str(database)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for path in run_files[:4]]
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
    conn = db.connect(database)
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 4
    assert conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 12


def test_an_old_schema_is_migrated_keeping_its_data(tmp_path):
    database = tmp_path / "old.sqlite"
    conn = sqlite3.connect(database)
    conn.executescript(db.MIGRATIONS[0])
    conn.execute("INSERT INTO runs VALUES ('r', 'abc', 'main', NULL, NULL, '', 'now', '{}')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    conn = db.connect(database)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT run_id, commit_time FROM runs").fetchall() == [("r", None)]


@pytest.mark.parametrize("spoil", ["corrupt", "newer"])
def test_unusable_database_is_one_line_exit_2(run_files, tmp_path, capsys, spoil):
    database = tmp_path / "bad.sqlite"
    if spoil == "corrupt":
        database.write_bytes(b"this is not a database" * 100)
    else:
        sqlite3.connect(database).execute(f"PRAGMA user_version={db.SCHEMA_VERSION + 1}")
    for argv in (["db", "import", str(run_files[0])], ["history"], ["report"]):
        code = main([*argv, "--db", str(database)]
                    + (["--out", str(tmp_path / "o")] if argv == ["report"] else []))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert ("not a database" if spoil == "corrupt" else "newer than this opbench") in err


def test_step_indices_find_one_step_and_none_in_noise():
    rng = np.random.default_rng(3)
    flat = 100 * rng.lognormal(0, 0.02, 12)
    assert history.step_indices(flat) == []
    stepped = np.r_[flat[:5], 0.6 * flat[5:]]
    assert history.step_indices(stepped) == [5]
    assert history.step_indices(stepped, min_change=0.5) == []  # a 40% step is below 50%


def test_history_dataframes_and_steps(run_files, tmp_path):
    database = tmp_path / "h.sqlite"
    _import_all(run_files, database)
    conn = db.connect(database)
    table = history.series(conn, kind="perf")
    assert sorted(table["case_id"].unique()) == ["CPY(a)", "CPY(b)"]
    assert len(table) == 12 and table["median_ns"].notna().all()
    steps = history.change_points(table)
    assert list(steps["case_id"]) == ["CPY(a)"]
    step = steps.iloc[0]
    assert (step["commit"], step["previous"]) == ("c3aaaaa", "c2aaaaa")
    assert step["ratio"] == pytest.approx(0.6, abs=0.05)
    errors = history.series(conn, kind="test")
    assert errors["error"].tolist() == pytest.approx([1e-9 * (i + 1) for i in range(6)])


def test_history_cli_prints_the_step_and_plots(run_files, tmp_path, capsys):
    database = tmp_path / "h.sqlite"
    _import_all(run_files, database)
    capsys.readouterr()
    assert main(["history", "--db", str(database), "-o", "CPY", "--steps",
                 "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "1 case(s) over 6 commit(s)" in out and "steps at c3aaaaa: x0.6" in out
    assert "CPY(b)" not in out
    assert (tmp_path / "plots" / "history.png").read_bytes().startswith(b"\x89PNG")
    assert main(["history", "--db", str(database), "-p", "nomatch"]) == 2


def _timed_by(record: dict, method: str) -> dict:
    """The record as plain `perf` ("plain": no runs kept) or `perf --repeat` with the anchor
    ("anchored") writes it."""
    perf = dict(record["perf"])
    if method == "plain":
        del perf["runs_ns"], perf["repeat"]
    else:
        perf["runs_anchor_ns"] = [[50_000] * len(run) for run in perf["runs_ns"]]
    return {**record, "perf": perf}


def test_history_keeps_apart_the_series_of_each_timing_method(tmp_path, capsys):
    """Plain perf for three commits, then perf --repeat 3 (60% slower from the method alone,
    the anchor timed after each sample): not a step of the code, so none is reported; a real
    step inside one method's series still is."""
    rng = np.random.default_rng(3)
    database = tmp_path / "h.sqlite"
    levels = {"CPY(a)": [100e3] * 3 + [160e3] * 5,
              "CPY(b)": [100e3] * 3 + [160e3] * 2 + [100e3] * 3}  # b steps down at c5
    for i in range(8):
        method = "plain" if i < 3 else "anchored"
        records = [_timed_by(_perf_record(rng, f"run{i}", case, level[i],
                                          runs=1 if method == "plain" else 3), method)
                   for case, level in levels.items()]
        _import_all_one(_write(tmp_path / f"r{i}.jsonl", records), i, database)
    conn = db.connect(database)
    table = history.series(conn)
    assert sorted(set(table["timing"])) == ["--repeat, anchored", "one run"]
    steps = history.change_points(table)
    assert list(zip(steps["case_id"], steps["timing"], steps["commit"])) == [
        ("CPY(b)", "--repeat, anchored", "c5aaaaa")]
    capsys.readouterr()
    assert main(["history", "--db", str(database)]) == 0
    out = capsys.readouterr().out
    assert "2 case(s) over 8 commit(s)" in out
    time = r"(\d+(\.\d+)? µs)"
    assert re.search(rf"CPY\(a\) \[timed one run\]: ({time} ){{3}}- - - - -\n", out)
    assert re.search(rf"CPY\(a\) \[timed --repeat, anchored\]: - - - ({time} ?){{5}}\n", out)
    assert "steps at c3aaaaa" not in out and "steps at c5aaaaa: x0.6" in out
    assert "note: 2 case(s) were timed both with and without perf --repeat" in out


def _import_all_one(path, i: int, database) -> None:
    assert main(["db", "import", str(path), "--commit", f"c{i}" + "a" * 39,
                 "--db", str(database)]) == 0


def test_report_from_the_database(run_files, tmp_path, capsys):
    database = tmp_path / "h.sqlite"
    _import_all(run_files, database)
    out = tmp_path / "rep"
    assert main(["report", "--db", str(database), "--out", str(out), "--since", "c0"]) == 0
    text = (out / "report.md").read_text()
    assert "commit c5aaaaa against c0aaaaa" in text
    assert "0 perf regressions, 1 improvements" in text  # CPY(a): 100 us -> 59.5 us
    assert "## History" in text and "c3aaaaa: x0.6" in text
    assert (out / "plots" / "history.png").exists()


def _at(record: dict, when: str) -> dict:
    return {**record, "time": when}


def test_a_commit_keeps_one_place_when_its_runs_were_made_at_different_times(tmp_path, capsys):
    """perf runs of aaaaaaa1 (2 Jan) and bbbbbbb2 (3 Jan), then a test run of bbbbbbb2 made on
    1 Jan, imported last: bbbbbbb2 sits at its first run, before aaaaaaa1, in the header, the
    columns and report --db alike (the header once sorted by one run, the columns by another,
    and printed bbbbbbb's time under aaaaaaa)."""
    rng = np.random.default_rng(7)
    database = tmp_path / "h.sqlite"
    imports = [("aaaaaaa1", "pa", "2026-01-02T00:00:00.000+00:00", 100e3),
               ("bbbbbbb2", "pb", "2026-01-03T00:00:00.000+00:00", 400e3)]
    for sha, run_id, when, level in imports:
        path = _write(tmp_path / f"{run_id}.jsonl",
                      [_at(_perf_record(rng, run_id, "CPY(a)", level), when)])
        assert main(["db", "import", str(path), "--commit", sha, "--db", str(database)]) == 0
    earlier = _write(tmp_path / "tb.jsonl",
                     [_at(_test_record("tb", 1e-9), "2026-01-01T00:00:00.000+00:00")])
    assert main(["db", "import", str(earlier), "--commit", "bbbbbbb2", "--db",
                 str(database)]) == 0
    conn = db.connect(database)
    places = history.runs(conn).set_index("run_id")["position"]
    assert places["tb"] == places["pb"] < places["pa"]
    assert list(history.wide(history.series(conn)).columns) == ["bbbbbbb", "aaaaaaa"]
    capsys.readouterr()
    assert main(["history", "--db", str(database), "-o", "CPY"]) == 0
    out = capsys.readouterr().out
    assert "over 2 commit(s): bbbbbbb aaaaaaa" in out
    first, second = map(float, re.search(r"CPY\(a\): ([\d.]+) µs ([\d.]+) µs", out).groups())
    assert first > 300 and second < 150  # bbbbbbb's 400 µs under bbbbbbb
    assert main(["report", "--db", str(database), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "commit aaaaaaa against bbbbbbb" in text
    latest = history.summary(history.series(conn, kind="perf"), history.change_points(
        history.series(conn, kind="perf")))["latest_ns"].iloc[0]
    assert latest == pytest.approx(100e3, rel=0.1)


def _git(repo: Path, *args: str, date: str = "2026-01-01T00:00:00+00:00") -> str:
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture()
def tagged_history(tmp_path, monkeypatch):
    """A git repository of four commits (v0.9 on the first, v1.0 on the second), the last three
    imported from inside it with CPY(a) at 100, 200 and 400 µs; the current folder is it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    shas = []
    for day in range(1, 5):
        date = f"2026-01-0{day}T12:00:00+00:00"
        _git(repo, "commit", "-q", "--allow-empty", "-m", f"day {day}", date=date)
        shas.append(_git(repo, "rev-parse", "HEAD"))
    _git(repo, "tag", "v0.9", shas[0])
    _git(repo, "tag", "v1.0", shas[1])
    monkeypatch.chdir(repo)
    rng = np.random.default_rng(11)
    database = tmp_path / "h.sqlite"
    for i, (sha, level) in enumerate(zip(shas[1:], [100e3, 200e3, 400e3])):
        path = _write(tmp_path / f"r{i}.jsonl", [_perf_record(rng, f"run{i}", "CPY(a)", level)])
        assert main(["db", "import", str(path), "--commit", sha, "--db", str(database)]) == 0
    return database, [sha[:7] for sha in shas]


def test_report_since_a_git_tag_compares_with_its_commit(tagged_history, tmp_path, capsys):
    database, labels = tagged_history
    out = tmp_path / "rep"
    assert main(["report", "--db", str(database), "--out", str(out), "--since", "v1.0"]) == 0
    assert f"commit {labels[3]} against {labels[1]}" in (out / "report.md").read_text()
    assert main(["report", "--db", str(database), "--out", str(out), "--since",
                 "2026-01-03"]) == 0  # the first commit dated on or after it
    assert f"commit {labels[3]} against {labels[2]}" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["history", "--db", str(database), "--since", "v1.0"]) == 0
    assert f"over 3 commit(s): {' '.join(labels[1:])}" in capsys.readouterr().out


@pytest.mark.parametrize("since, message", [
    ("v0.9", "--since v0.9 is commit {0}, which has no run in the database"),
    ("nosuchref", "--since nosuchref: not a commit in the database, a git ref or an ISO date"),
])
def test_since_naming_nothing_usable_is_exit_2(tagged_history, tmp_path, capsys, since, message):
    database, labels = tagged_history
    for verb in (["report", "--out", str(tmp_path / "rep")], ["history"]):
        capsys.readouterr()
        assert main([*verb, "--db", str(database), "--since", since]) == 2
        err = capsys.readouterr().err
        assert message.format(labels[0]) in err and "Traceback" not in err


def test_report_since_the_latest_says_why_nothing_was_compared(tagged_history, tmp_path):
    database, labels = tagged_history
    out = tmp_path / "rep"
    assert main(["report", "--db", str(database), "--out", str(out), "--since", labels[3]]) == 0
    text = (out / "report.md").read_text()
    assert f"--since {labels[3]} names no commit before the latest ({labels[3]})" in text
    assert "give --against" not in text


def test_report_title_names_the_imported_and_the_recorded_commit(tmp_path):
    """Runs that recorded git commit 1234567... imported with --commit aaaaaaa1: the title said
    only "commit aaaaaaa" while the Environment section showed 1234567..."""
    rng = np.random.default_rng(5)
    database = tmp_path / "h.sqlite"
    recorded = "1234567" + "f" * 33
    record = _perf_record(rng, "run0", "CPY(a)", 100e3)
    record = {**record, "env": {**record["env"], "git_commit": recorded}}
    path = _write(tmp_path / "r.jsonl", [record])
    assert main(["db", "import", str(path), "--commit", "aaaaaaa1", "--db", str(database)]) == 0
    out = tmp_path / "rep"
    assert main(["report", "--db", str(database), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# opbench report: commit aaaaaaa (as imported; its runs recorded "
                           "git commit 1234567)")
    assert recorded in text  # the Environment section's commit
    assert main(["db", "import", str(path), "--db", str(tmp_path / "plain.sqlite")]) == 0
    assert main(["report", "--db", str(tmp_path / "plain.sqlite"), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# opbench report: commit 1234567\n")
