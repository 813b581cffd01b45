"""COPY_ASYNC's contract cases with every logical device its own torch.distributed rank (gloo on
127.0.0.1): the cases pass, the bug zoo's communication bugs fail them naming the rank, a rank
that hangs becomes one TIMEOUT record and leaves no process behind, and --ranks refuses what it
cannot run."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed", reason="--ranks needs torch (pip install opbench[torch])")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bugzoo"))
from scenario_bugs import ReceiveIntoWrongBuffer, SendBeforeSourceDone  # noqa: E402

from opbench.cli.main import main  # noqa: E402
from opbench.harness.cases import Case  # noqa: E402
from opbench.harness.ops import SPECS  # noqa: E402
from opbench.harness.ranks.copy_cases import CopyCaseJob  # noqa: E402
from opbench.harness.ranks.driver import Fault  # noqa: E402
from opbench.harness.ranks.launch import run_ranks  # noqa: E402


def _case(check: str, ndev: int = 2, n: int = 7, dtype: str = "f32") -> Case:
    return Case.make("COPY_ASYNC", check=check, type=dtype, n=n, ndev=ndev)


#: every clause once, a chain over 3 ranks and the seeded race over 3 ranks with delays
PASSING = [_case("source"), _case("dest_read", dtype="bf16"), _case("host", n=4099),
           _case("sync", dtype="f16"), _case("many", n=4099), _case("chain", ndev=3),
           _case("race", ndev=3)]
#: bug -> the clause that catches it
BUGS = {SendBeforeSourceDone: "source", ReceiveIntoWrongBuffer: "dest_read"}


@pytest.fixture(scope="module")
def records():
    jobs = [CopyCaseJob(case) for case in PASSING]
    jobs += [CopyCaseJob(_case(check), runtime_cls=bug) for bug, check in BUGS.items()]
    found = list(run_ranks(jobs, "test", timeout=60))
    assert not multiprocessing.active_children()
    return found


def test_every_clause_passes_across_ranks(records):
    passing = [r for r in records if r["case_id"] in {c.id for c in PASSING}
               and r["status"] == "OK"]
    assert len(records) == len(PASSING) + len(BUGS)
    assert len(passing) == len(PASSING), [r["reason"] for r in records if r["status"] != "OK"]
    assert {r["device"] for r in passing} == {"2 rank(s)", "3 rank(s)"}


@pytest.mark.parametrize("bug", list(BUGS), ids=lambda bug: bug.__name__)
def test_communication_bug_fails_its_clause_naming_the_rank(records, bug):
    case_id = _case(BUGS[bug]).id
    record = [r for r in records if r["case_id"] == case_id and r["status"] != "OK"]
    assert len(record) == 1, f"{bug.__name__} was not caught by {case_id}"
    assert record[0]["status"] == "FAIL"
    assert record[0]["reason"].startswith("rank ")
    assert "NaN (read before the data landed)" in record[0]["reason"]


def test_a_hung_rank_is_one_timeout_record_and_the_run_goes_on():
    jobs = [CopyCaseJob(_case("source")), CopyCaseJob(_case("host"))]
    found = list(run_ranks(jobs, "test", timeout=3, fault=Fault("hang", 1, 0)))
    assert not multiprocessing.active_children()
    assert [r["status"] for r in found] == ["TIMEOUT", "TIMEOUT"]
    assert all("rank 1" in r["reason"] for r in found)
    assert [r["case_id"] for r in found] == [job.case.id for job in jobs]


@pytest.mark.parametrize("argv, says", [
    (["-o", "ROPE"], "use -o COPY_ASYNC"),
    (["-o", "COPY_ASYNC", "-b", "torch"], "use -b cpu"),
    (["-o", "COPY_ASYNC", "-j", "2"], "drop -j"),
])
def test_ranks_refuses_other_ops_and_backends(capsys, argv, says):
    assert main(["test", "--ranks", *argv]) == 2
    assert says in capsys.readouterr().err


def test_torchrun_env_rendezvous(tmp_path):
    """The same command under torchrun: two processes of one job are the two ranks of every
    case on 2 devices; the cases on 3 or 4 devices are left out, said on stderr."""
    results = tmp_path / "r.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "opbench", "test", "-o", "COPY_ASYNC", "--ranks", "-p", "check=chain|source",
         "-q", "--results", str(results)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    chain_and_source = [c for c in SPECS["COPY_ASYNC"].cases() if c["check"] in ("chain",
                                                                                 "source")]
    on_two = sorted(c.id for c in chain_and_source if c["ndev"] == 2)
    assert sorted(r["case_id"] for r in records) == on_two  # rank 0 writes; rank 1 computes
    assert {(r["status"], r["device"]) for r in records} == {("OK", "2 rank(s)")}
    left_out = len(chain_and_source) - len(on_two)
    assert left_out and f"{left_out} of {len(chain_and_source)} cases need another" in done.stderr
