"""Devices as torch.distributed ranks (gloo on 127.0.0.1): every split passes against the oracle
with ranks, bit-identical to the in-process run at every step; the message pattern is asserted;
communication bugs are caught; faults end the run with one record naming rank, step and cause,
and leave no process behind.

Starting a process group costs seconds, so each device count runs once (a module fixture) with
every scenario and bug of this file in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed", reason="--ranks needs torch (pip install opbench[torch])")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bugzoo"))
from scenario_bugs import RANK_BUGS, RankRuntime, SendBeforeSourceDoneHostBehind  # noqa: E402

from opbench.cli.main import main  # noqa: E402
from opbench.harness.ranks.driver import Fault, RankJob, in_process_steps  # noqa: E402
from opbench.harness.ranks.launch import run_ranks  # noqa: E402
from opbench.harness.scenario.config import ScenarioSpec as S  # noqa: E402
from opbench.harness.scenario.splits import SPLITS  # noqa: E402

STEPS, LAYERS = 2, 4
TOGGLES = [dict(), dict(graph_reuse=True, evict=True), dict(rope_cache=False, delay=True),
           dict(graph_reuse=True, delay=True, evict=True, model="gemma3-1b")]


def _specs(devices: int) -> list[S]:
    splits = list(SPLITS) if devices == 1 else [s for s in SPLITS if s != "none"]
    return [S(split=split, devices=devices, steps=STEPS, layers=LAYERS, **toggles)
            for split in splits for toggles in TOGGLES]


def _bug_jobs(devices: int) -> list[RankJob]:
    jobs = []
    for bug, (split, _) in RANK_BUGS.items():
        spec = S(split=split, devices=devices, steps=STEPS, layers=LAYERS)
        if issubclass(bug, RankRuntime):
            jobs.append(RankJob(spec, runtime_cls=bug, label=bug.__name__))
        else:
            jobs.append(RankJob(spec, engine_cls=bug, label=bug.__name__))
    return jobs


@pytest.fixture(scope="module")
def rank_records():
    """Every record of the module's rank runs: devices 1..4, the bugs at 3 devices, and a
    delay on one rank only."""
    jobs = [RankJob(spec) for n in (1, 2, 3, 4) for spec in _specs(n)]
    jobs += _bug_jobs(3)
    jobs.append(RankJob(S(split="ring", devices=3, steps=STEPS, layers=LAYERS, delay=True),
                        delay_ranks=frozenset({1}), label="delay-rank-1"))
    jobs.append(RankJob(S(split="ring", devices=3, steps=STEPS, layers=LAYERS),
                        runtime_cls=SendBeforeSourceDoneHostBehind, label="host-behind"))
    records = list(run_ranks(jobs, "test", timeout=120))
    assert len(records) == len(jobs)
    return records


def _plain(records):
    return [r for r in records if not r["scenario"].get("label")]


def _labelled(records, label: str) -> dict:
    return next(r for r in records if r["scenario"].get("label") == label)


def test_every_split_and_device_count_passes_with_ranks(rank_records):
    plain = _plain(rank_records)
    failed = [(r["case_id"], r["errors"]) for r in plain if r["status"] != "OK"]
    assert not failed
    assert {(r["params"]["split"], r["params"]["devices"]) for r in plain} == {
        ("none", 1)} | {(s, n) for s in SPLITS if s != "none" for n in (1, 2, 3, 4)}
    assert all(r["scenario"]["steps_run"] == STEPS + 1 for r in plain)


def test_ranks_are_bit_identical_to_in_process(rank_records):
    for record in _plain(rank_records):
        spec = S(**{k: v for k, v in record["params"].items() if k != "ranks"})
        want = [step["digest"] for step in in_process_steps(spec)]
        got = [step["digest"] for step in record["scenario"]["per_step"]]
        assert got == want, record["case_id"]


def test_message_counts_and_bytes_per_step_and_rank(rank_records):
    by_id = {r["case_id"]: r for r in _plain(rank_records)}
    ring = by_id[S(split="ring", devices=4, steps=STEPS, layers=LAYERS).id]
    chunk = 3 * (17 + STEPS) * 2 * 2 * 16 * 4  # kv rows x (K, V) x kv heads x head dim x f32
    for step in ring["scenario"]["per_step"]:
        for totals in step["messages"]:
            assert totals == {"sent": LAYERS * 3, "sent_bytes": LAYERS * 3 * chunk,
                              "received": LAYERS * 3, "received_bytes": LAYERS * 3 * chunk}
    layer = by_id[S(split="layer", devices=3, steps=STEPS, layers=LAYERS).id]
    sent = [[t["sent"] for t in step["messages"]] for step in layer["scenario"]["per_step"]]
    assert sent == [[1, 1, 0]] * (STEPS + 1)  # 0 -> 1 -> 2, once per step
    head = by_id[S(split="head", devices=2, steps=STEPS, layers=LAYERS).id]
    step0 = head["scenario"]["per_step"][0]["messages"]
    assert [t["sent"] for t in step0] == [LAYERS, LAYERS]  # x out to 1, the partial back to 0


def test_a_send_before_its_source_is_caught_when_the_host_is_behind(rank_records):
    """Left to timing, the device finished each source before the late host posted its send
    and the bug passed (3 of 3 runs, host 50 ms late); it must fail whatever the timing."""
    record = _labelled(rank_records, "host-behind")
    assert record["status"] == "FAIL" and record["scenario"]["divergence"] is not None


@pytest.mark.parametrize("bug", list(RANK_BUGS), ids=lambda bug: bug.__name__)
def test_communication_bugs_are_caught(rank_records, bug):
    record = _labelled(rank_records, bug.__name__)
    assert record["status"] == "FAIL", record["errors"]
    if RANK_BUGS[bug][1] == "pattern":
        problems = record["scenario"]["communication"]
        assert problems and all("communication at step 0, rank " in p for p in problems)
    else:
        assert record["scenario"]["divergence"] is not None


def test_pattern_check_names_step_rank_and_message(rank_records):
    record = _labelled(rank_records, "GatherToWrongRank")
    text = "\n".join(record["scenario"]["communication"])
    # 36 new tokens x d_model 64 x f32 per message, one per layer
    assert ("communication at step 0, rank 0: missing 4 x recv from rank 2 (9216 B); "
            "unexpected 4 x send to rank 1 (9216 B)") in text.splitlines()


def test_delay_on_one_rank_only_passes(rank_records):
    record = _labelled(rank_records, "delay-rank-1")
    assert record["status"] == "OK", record["errors"]


def _rank_children() -> set[int]:
    """Live (or unreaped) spawned child processes of this test process, from /proc: the rank
    processes, not multiprocessing's long-lived resource tracker."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == me and b"spawn_main" in command:
                found.add(int(entry.name))
    return found


@pytest.mark.parametrize("kind, status, words", [
    ("raise", "ERROR", "rank 1 raised at step 1: RuntimeError: injected fault"),
    ("exit", "CRASH", "rank 1 died (exit code 7) at step 1"),
    ("hang", "TIMEOUT", "hung: rank 1 at step 1 (no progress in 3 s"),
])
def test_a_faulty_rank_ends_the_run_with_one_record(kind, status, words):
    before = _rank_children()
    spec = S(split="layer", devices=2, steps=STEPS, layers=LAYERS)
    records = list(run_ranks([spec], "test", timeout=3, fault=Fault(kind, 1, 1)))
    assert [r["status"] for r in records] == [status]
    assert words in records[0]["reason"]
    assert _rank_children() <= before  # every rank process was ended and reaped


def test_cli_ranks_writes_records(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code = main(["scenario", "--split", "ring", "--devices", "2", "--steps", "1", "--layers",
                 "2", "--ranks", "--results", str(results)])
    record = json.loads(results.read_text())
    assert code == 0 and record["status"] == "OK" and record["params"]["ranks"] is True
    assert main(["scenario", "--ranks", "-b", "torch"]) == 2
    assert "use -b cpu" in capsys.readouterr().err


def test_torchrun_env_rendezvous(tmp_path):
    """The same command under torchrun: this machine as one node of two processes."""
    results = tmp_path / "r.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "opbench", "scenario", "--split", "layer",
         "--devices", "2", "--steps", "1", "--layers", "2", "--ranks", "-q",
         "--results", str(results)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["status"] for r in records] == ["OK"]  # rank 0 writes; rank 1 only computes
