"""--executor ray: the case pool as Ray actors on a local Ray instance (two CPUs, as in CI).

One Ray instance serves the whole module (starting one costs seconds); the executor joins it
instead of starting its own."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from opbench.cli.main import main
from opbench.harness.executors import ExecutorChoice, parse_executor, run_cases
from opbench.harness.ops import SPECS
from opbench.harness.pool import run_inline
from opbench.harness.records import new_run_id
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.matrix import run_specs
from opbench.harness.scenario.splits import SPLITS

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'opbench[ray]')")

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
                time.sleep(60)       # a hang
            super().cpy(src, out, perm, step, stream)
""")
RAY = ExecutorChoice("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_executor_names():
    assert parse_executor("ray") == RAY
    assert parse_executor("ray://head:10001") == ExecutorChoice("ray", "ray://head:10001")
    assert parse_executor("ray:auto") == ExecutorChoice("ray", "auto")
    with pytest.raises(ValueError, match="must be local, ray"):
        parse_executor("dask")


def test_quick_tables_give_the_local_verdicts(local_ray):
    cases = [c for spec in SPECS.values() for c in spec.quick_cases(seed=0)]
    run_id = new_run_id()
    local = {r["case_id"]: r["status"] for r in run_inline("cpu", {}, cases, 0, run_id)}
    on_ray = {r["case_id"]: r["status"]
              for r in run_cases(RAY, "cpu", "cpu", {}, cases, 0, run_id, 2, 120)}
    assert len(on_ray) == len(cases) and on_ray == local


def test_dead_worker_is_a_crash_record_and_the_run_goes_on(local_ray, tmp_path, capsys):
    backend_file = tmp_path / "crashy.py"
    backend_file.write_text(CRASHING)
    results = tmp_path / "r.jsonl"
    code = main(["test", "-b", f"{backend_file}:Crashy", "-o", "CPY", "-p",
                 r"type_src=f32,type=f32,ne=\[5,3,64\].*step=1\)", "--executor", "ray", "-j", "2",
                 "--timeout", "5", "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    statuses = sorted(r["status"] for r in records)
    assert code == 1 and statuses == ["CRASH", "OK", "OK", "TIMEOUT"]
    crash = next(r for r in records if r["status"] == "CRASH")
    assert "perm=[1,0,2]" in crash["case_id"] and "Ray worker died" in crash["reason"]


def test_stopping_the_run_kills_outstanding_work(local_ray, tmp_path, monkeypatch):
    from opbench.harness.executors import ray as ray_executor

    pools = []
    original_init = ray_executor._ActorPool.__init__

    def keep(self, *args):
        original_init(self, *args)
        pools.append(self)

    monkeypatch.setattr(ray_executor._ActorPool, "__init__", keep)
    backend_file = tmp_path / "crashy.py"
    backend_file.write_text(CRASHING)
    cases = [c for c in SPECS["CPY"].cases()
             if c["type"] == "f32" and c["type_src"] == "f32" and tuple(c["ne"]) == (5, 3, 64)
             and c["step"] == 1 and tuple(c["perm"]) != (1, 0, 2)]
    cases.sort(key=lambda c: tuple(c["perm"]) == (2, 1, 0))  # the hanging case goes out first
    cases.reverse()
    records = run_cases(RAY, f"{backend_file}:Crashy", "crashy", {}, cases, 0, "r", 2, None)
    assert next(records)["status"] == "OK"  # the other worker is stuck in the hang
    actors = list(pools[0].actors)
    records.close()  # what Ctrl-C does to the generator: its finally cancels and kills
    for actor in actors:
        assert _dies_within(actor, 30.0)


def _dies_within(actor, seconds: float) -> bool:
    """True once a call on ``actor`` fails because it is dead.  ray.kill is asynchronous: an
    idle actor can still answer a call sent just after the kill, so ask again until it fails."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        time.sleep(0.2)
    return False


def test_missing_ray_is_a_usage_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["test", "-o", "CPY", "--quick", "--executor", "ray"])
    assert code == 2 and "pip install 'opbench[ray]'" in capsys.readouterr().err


# -- scenarios on Ray ---------------------------------------------------------------------------
ZOO = Path(__file__).resolve().parents[1] / "bugzoo" / "scenario_bugs.py"


@pytest.fixture
def ray_items(monkeypatch):
    """The items that went to Ray: proof that a run took the Ray executor, not the local pool."""
    from opbench.harness.executors import ray as ray_executor

    sent: list = []
    original = ray_executor.run_in_ray

    def counting(address, work, items, jobs, timeout):
        sent.extend(items)
        return original(address, work, items, jobs, timeout)

    monkeypatch.setattr(ray_executor, "run_in_ray", counting)
    return sent


def _quick_scenarios() -> list[ScenarioSpec]:
    """Every split at 2 devices (none at 1), one decode step through 2 layers."""
    return [ScenarioSpec(split=split, devices=1 if split == "none" else 2, layers=2, steps=1)
            for split in SPLITS]


@pytest.mark.parametrize("backend", ["cpu", f"{ZOO}:RingMergeIgnoresLse"],
                         ids=["cpu", "ring-merge-bug"])
def test_quick_scenarios_give_the_local_verdicts(local_ray, ray_items, backend):
    specs = _quick_scenarios()
    local = {r["case_id"]: r["status"] for r in run_specs(backend, specs, "r")}
    on_ray = {r["case_id"]: r["status"]
              for r in run_specs(backend, specs, "r", jobs=2, timeout=300, executor=RAY)}
    assert len(on_ray) == len(specs) and on_ray == local and ray_items == specs
    failing = {spec.split for spec in specs if local[spec.id] != "OK"}
    assert failing == (set() if backend == "cpu" else {"ring", "zigzag", "stripe"})


def test_scenario_verb_takes_the_ray_executor(local_ray, ray_items, tmp_path):
    results = tmp_path / "r.jsonl"
    assert main(["scenario", "--split", "zigzag", "--devices", "2", "--steps", "1",
                 "--layers", "2", "--executor", "ray", "-q", "--results", str(results)]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["params"]["split"], r["status"]) for r in records] == [("zigzag", "OK")]
    assert [spec.id for spec in ray_items] == [records[0]["case_id"]]


class _NoCluster:
    """A stand-in for the ray module whose init fails as Ray's does with nothing to join."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify ...")


def test_a_ray_that_cannot_start_or_be_joined_is_one_usage_line():
    from opbench.errors import UsageError
    from opbench.harness.executors.ray import connect

    with pytest.raises(UsageError) as caught:
        connect(_NoCluster, "auto", 2)
    assert str(caught.value) == ("--executor ray: cannot start or join Ray at auto: "
                                 "ConnectionError: Could not find any running Ray instance.")
