"""Cross-commit A/B: ``opbench perf --ab cpu@TREE cpu``, each side from its own source tree in its
own worker process.  The trees are copies of this checkout's package made in tmp (one a git
checkout), some with the cpu ROPE kernel patched: garbage, stale or crashing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.harness.store import read_records

ROOT = Path(__file__).resolve().parents[1]
#: the NumPy kernels: numba would compile afresh in every copied tree (its cache is per path)
CPU = "cpu:jit=0"
#: two small f32 ROPE cases, a few samples each: seconds, not minutes
FAST = ["--sizes", "small", "-o", "ROPE", "--budget-ms", "1", "--min-samples", "2",
        "--warmup", "1", "--epochs", "2", "--no-calibrate", "-q"]

#: appended to a tree's opbench/backends/cpu/kernels.py: from the second call on, ROPE's output
#: is 1.5x what it should be (the first, untimed call passes the NaN check)
GARBAGE = """
_rope_calls = [0]
_true_rope = rope


def rope(x, pos, out, *rest):
    _true_rope(x, pos, out, *rest)
    _rope_calls[0] += 1
    if _rope_calls[0] > 1:
        out *= 1.5
"""

#: ROPE computes once per output buffer and parameters, then keeps the old result whatever the
#: inputs
STALE = """
_rope_done = set()
_true_rope = rope


def rope(x, pos, out, params, *rest):
    address = (out.__array_interface__["data"][0], repr(params))
    if address not in _rope_done:
        _true_rope(x, pos, out, params, *rest)
        _rope_done.add(address)
"""

#: from the second call on (the timed ones) ROPE raises
RAISES = """
_rope_calls = [0]
_true_rope = rope


def rope(*args):
    _rope_calls[0] += 1
    if _rope_calls[0] > 1:
        raise RuntimeError("the kernel gave up")
    _true_rope(*args)
"""

#: the worker process dies in ROPE's first call
CRASH = """
def rope(*args):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
"""


def copy_tree(where: Path, kernel_patch: str = "") -> Path:
    shutil.copytree(ROOT / "opbench", where / "opbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    kernels = where / "opbench" / "backends" / "cpu" / "kernels.py"
    kernels.write_text(kernels.read_text() + kernel_patch)
    return where


def git(tree: Path, *argv: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                          cwd=tree, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def base_checkout(tmp_path_factory) -> Path:
    """A git checkout of this package tree (one commit)."""
    tree = copy_tree(tmp_path_factory.mktemp("base"))
    git(tree, "init", "-q")
    git(tree, "add", "opbench")
    git(tree, "commit", "-q", "-m", "base")
    return tree


def run_ab(tmp_path, side_a: str, side_b: str, *extra: str) -> tuple[int, list[dict]]:
    results = tmp_path / f"ab{len(list(tmp_path.glob('ab*.jsonl')))}.jsonl"
    code = main(["perf", "--ab", side_a, side_b, *FAST, "--results", str(results), *extra])
    return code, read_records(results) if results.exists() else []


def by_backend(records: list[dict]) -> dict[str, list[dict]]:
    sides: dict[str, list[dict]] = {}
    for record in records:
        sides.setdefault(record["backend"], []).append(record)
    return sides


def test_aa_across_trees_times_both_sides_with_their_sources(base_checkout, tmp_path):
    code, records = run_ab(tmp_path, f"{CPU}@{base_checkout}", CPU)
    assert code == 0
    sides = by_backend(records)
    assert set(sides) == {f"{CPU}@{base_checkout}", CPU}
    base, head = sides[f"{CPU}@{base_checkout}"], sides[CPU]
    assert [r["case_id"] for r in base] == [r["case_id"] for r in head]
    assert len(base) == 2 and all(r["op"] == "ROPE" for r in base)
    assert all(r["status"] == "OK" for r in records)
    assert {r["run_id"] for r in records} == {records[0]["run_id"]}  # one job: the gate pairs
    commit = git(base_checkout, "rev-parse", "HEAD")
    assert base[0]["env"]["source"] == {"path": str(base_checkout.resolve()), "commit": commit,
                                        "dirty": False}
    assert base[0]["env"]["git_commit"] == commit
    assert head[0]["env"]["source"]["path"] == str(ROOT)
    for record in records:
        perf = record["perf"]
        assert perf["output_judged"] is True and perf["threads"] == 1
        assert len(perf["cpu_set"]) == 1 and perf["n"] >= 2


def test_a_changed_tracked_file_marks_the_side_dirty(base_checkout, tmp_path):
    readme = base_checkout / "opbench" / "__init__.py"
    original = readme.read_text()
    readme.write_text(original + "# local change\n")
    try:
        code, records = run_ab(tmp_path, f"{CPU}@{base_checkout}", f"{CPU}@{base_checkout}")
    finally:
        readme.write_text(original)
    assert code == 0
    assert {r["backend"] for r in records} == {f"{CPU}@{base_checkout}#A",
                                              f"{CPU}@{base_checkout}#B"}
    assert all(r["env"]["source"]["dirty"] is True for r in records)


def test_each_side_imports_its_own_tree(tmp_path):
    """The garbage tree's kernel runs only on its side: that side is ERROR, this one OK."""
    bad = copy_tree(tmp_path / "garbage", GARBAGE)
    code, records = run_ab(tmp_path, f"{CPU}@{bad}", CPU)
    assert code == 1
    sides = by_backend(records)
    assert [r["status"] for r in sides[f"{CPU}@{bad}"]] == ["ERROR", "ERROR"]
    assert all("output of the timed calls is wrong" in r["reason"]
               for r in sides[f"{CPU}@{bad}"])
    assert [r["status"] for r in sides[CPU]] == ["OK", "OK"]
    assert sides[f"{CPU}@{bad}"][0]["env"]["source"]["commit"] is None  # not a git checkout


def test_fresh_inputs_catch_a_stale_kernel_across_trees(tmp_path):
    stale = copy_tree(tmp_path / "stale", STALE)
    code, records = run_ab(tmp_path, CPU, f"{CPU}@{stale}")
    assert code == 0  # same inputs every call: the stale answer is right
    code, records = run_ab(tmp_path, CPU, f"{CPU}@{stale}", "--fresh-inputs")
    assert code == 1
    sides = by_backend(records)
    assert {r["status"] for r in sides[f"{CPU}@{stale}"]} == {"ERROR"}
    assert {r["status"] for r in sides[CPU]} == {"OK"}
    assert all(r["perf"]["fresh_inputs"] for r in sides[CPU])


def test_a_kernel_that_raises_while_timed_gives_an_error_record(tmp_path):
    raising = copy_tree(tmp_path / "raises", RAISES)
    code, records = run_ab(tmp_path, f"{CPU}@{raising}", CPU)
    assert code == 1
    sides = by_backend(records)
    first = sides[f"{CPU}@{raising}"][0]
    assert first["status"] == "ERROR" and "the kernel gave up" in first["reason"]
    assert len(records) == 4  # the run went on to the second case


def test_a_worker_that_dies_gives_a_crash_record_with_the_signal(tmp_path, capsys):
    crashing = copy_tree(tmp_path / "crash", CRASH)
    code, records = run_ab(tmp_path, f"{CPU}@{crashing}", CPU)
    assert code == 1
    first = by_backend(records)[f"{CPU}@{crashing}"][0]
    assert first["status"] == "CRASH" and "SIGSEGV" in first["reason"]
    assert len(records) == 4  # the second case is recorded as not timed, not lost
    assert "SIGSEGV" in capsys.readouterr().out


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "nowhere", "is not a directory"),
    (lambda tmp: tmp, "holds no opbench source tree"),
])
def test_a_bad_path_is_one_line_and_exit_2(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main(["perf", "--ab", f"{CPU}@{path}", "cpu", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and str(path.name) in err


def test_an_opbench_too_old_for_the_worker_is_refused(tmp_path, capsys):
    old = tmp_path / "old"
    (old / "opbench").mkdir(parents=True)
    (old / "opbench" / "__init__.py").write_text('__version__ = "0.0.1"\n')
    assert main(["perf", "--ab", f"{CPU}@{old}", "cpu", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "too old" in err and "opbench.perf.run.prepare" in err


def test_the_worker_protocol_is_json_lines_and_versioned(base_checkout):
    """What an outside driver sees: the hello, then one answer per request."""
    from opbench.perf import ab_worker

    process = subprocess.run(
        [sys.executable, ab_worker.__file__, str(base_checkout)], input='{"cmd": "close"}\n',
        capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(base_checkout), "PATH": "/usr/bin:/bin"})
    hello, answer = (json.loads(line) for line in process.stdout.splitlines())
    assert hello["protocol"] == ab_worker.PROTOCOL and hello["missing"] == []
    assert Path(hello["file"]).resolve() == (base_checkout / "opbench" / "__init__.py").resolve()
    assert answer == {"ok": True}


def test_pinning_reaches_every_thread_of_a_worker():
    """The CPU set is the workers' -- the backend's own threads included -- not only this
    process's."""
    from opbench.perf.cross_ab import WorkerSide, source_tree

    side = WorkerSide("A", CPU, source_tree(None, "A"), "small")
    try:
        side.start()
        cpu = max(os.sched_getaffinity(0))
        side.pin([cpu])
        threads = [int(tid) for tid in os.listdir(f"/proc/{side.process.pid}/task")]
        assert len(threads) >= 2  # the worker's main thread and the cpu device's stream
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in threads)
    finally:
        side.close()
    assert side.process.returncode == 0


def test_a_side_on_another_device_is_judged_against_that_devices_ceilings(tmp_path):
    """The worker hands back the device's own ceilings with the case's facts."""
    tree = copy_tree(tmp_path / "gpu")
    backend = tree / "opbench" / "backends" / "cpu" / "backend.py"
    backend.write_text(backend.read_text() + "\n\nCpuBackend.device_ceilings = "
                       "lambda self, device=None: {'copy_gbps': 1e6, 'llc_bytes': 1024}\n")
    code, records = run_ab(tmp_path, f"{CPU}@{tree}", CPU)
    assert code == 0
    sides = by_backend(records)
    for record in sides[f"{CPU}@{tree}"]:
        assert record["perf"]["device_ceilings"] == {"copy_gbps": 1e6, "llc_bytes": 1024}
        assert record["perf"]["ceiling"] == 1e6
    for record in sides[CPU]:
        assert "device_ceilings" not in record["perf"]


def test_the_ceiling_follows_the_cpus_a_side_computes_with():
    from types import SimpleNamespace

    from opbench.perf.cross_ab import _ceiling_threads
    follower = SimpleNamespace(follows_cpus=True, threads=1)  # the cpu backend: all its CPUs
    fixed = SimpleNamespace(follows_cpus=False, threads=3)
    assert _ceiling_threads(follower, {"cpu_set": [0, 1]}) == 2
    assert _ceiling_threads(fixed, {"cpu_set": [0, 1]}) == 3
    # unpinned (--pin-cpu none) it splits over every CPU the worker inherited: their ceiling
    # (1 once: a two-thread copy judged against one core's bandwidth)
    assert _ceiling_threads(follower, {}) == len(os.sched_getaffinity(0))
    assert _ceiling_threads(fixed, {}) == 3
