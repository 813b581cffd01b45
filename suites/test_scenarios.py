"""The scenario matrix as pytest tests: ``pytest suites/test_scenarios.py --backend cpu [--full]``.

Without ``--full`` a small subset runs (every split and device count at least once, every
toggle on and off at least once, each KV cache dtype, seconds on the cpu backend); ``--full``
runs the whole matrix of ``opbench scenario --matrix``.  Each backend instance is made per
scenario, because the scenario's toggles are backend options (rope_cache, delay).
"""

from __future__ import annotations

import pytest

from opbench.harness.records import new_run_id
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.matrix import matrix, scenario_record

#: the CI subset: each split at its most interesting device count, toggles spread so each is
#: on somewhere and off somewhere, delays included
QUICK = [
    ScenarioSpec(split="none", evict=True, graph_reuse=True),
    ScenarioSpec(split="none", model="gemma3-1b"),
    ScenarioSpec(split="layer", devices=2, graph_reuse=True, delay=True),
    ScenarioSpec(split="layer", devices=4, rope_cache=False, evict=True),
    ScenarioSpec(split="head", devices=3, evict=True, delay=True),
    ScenarioSpec(split="head", devices=4, graph_reuse=True),
    ScenarioSpec(split="ring", devices=2, evict=True, graph_reuse=True),
    ScenarioSpec(split="zigzag", devices=3, delay=True, rope_cache=False),
    ScenarioSpec(split="stripe", devices=4, evict=True, graph_reuse=True, delay=True),
    ScenarioSpec(split="ring", devices=1),
    ScenarioSpec(split="layer", devices=3, evict=True, kv_dtype="f16"),
    ScenarioSpec(split="zigzag", devices=2, evict=True, graph_reuse=True, kv_dtype="bf16"),
]

RUN_ID = new_run_id()


def pytest_generate_tests(metafunc):
    if "scenario" in metafunc.fixturenames:
        specs = matrix() if metafunc.config.getoption("--full") else QUICK
        metafunc.parametrize("scenario", specs, ids=[s.id for s in specs])


def test_scenario(available_backend, scenario):
    record = scenario_record(available_backend, scenario, RUN_ID)
    if record["status"] == "UNSUPPORTED":
        pytest.skip(record["reason"])
    assert record["status"] == "OK", "\n".join(record["errors"] or [str(record["reason"])])
