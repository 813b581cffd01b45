"""The CUDA bug zoo (tests/bugzoo/cuda_bugs.py): every broken kernel fails at least one of its
op's quick cases on the CPU emulator, and the real kernels pass those same cases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from opbench.backends.cupy.emulator import CupyEmulatorBackend
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case

ZOO_FILE = Path(__file__).parents[1] / "bugzoo" / "cuda_bugs.py"

pytestmark = pytest.mark.skipif(not CupyEmulatorBackend.available()[0],
                                reason=CupyEmulatorBackend.available()[1])


def _zoo():
    if "cuda_bugs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cuda_bugs", ZOO_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["cuda_bugs"] = module
        spec.loader.exec_module(module)
    return sys.modules["cuda_bugs"]


def _statuses(backend_class, cases, stop_at_fail: bool) -> dict[str, str]:
    backend = backend_class()
    backend.devices(1)
    statuses = {}
    try:
        for case in cases:
            statuses[case.id] = run_case(backend, case)["status"]
            if stop_at_fail and statuses[case.id] == "FAIL":
                break
    finally:
        backend.close()
    return statuses


@pytest.mark.parametrize("name", ["CudaAttnTailUnmasked", "CudaAttnRescaleForgotten",
                                  "CudaAttnMissingBarrier", "CudaAttnGroupSharesOneHead",
                                  "CudaAttnKeyGroupsUnscaled", "CudaKvRotatePerBlockDelta"])
def test_quick_cases_catch_the_bug(name):
    zoo = _zoo()
    bug = getattr(zoo, name)
    cases = SPECS[zoo.CUDA_BUGS[bug]].quick_cases()
    mutant = _statuses(bug, cases, stop_at_fail=True)
    assert "FAIL" in mutant.values(), f"{name} passed every quick case: {mutant}"
    caught = [case for case in cases if mutant.get(case.id) == "FAIL"]
    real = _statuses(CupyEmulatorBackend, caught, stop_at_fail=False)
    assert set(real.values()) == {"OK"}, f"the real kernels fail {real}"


def test_every_bug_is_tested():
    names = {cls.__name__ for cls in _zoo().CUDA_BUGS}
    assert names == {"CudaAttnTailUnmasked", "CudaAttnRescaleForgotten",
                     "CudaAttnMissingBarrier", "CudaAttnGroupSharesOneHead",
                     "CudaAttnKeyGroupsUnscaled", "CudaKvRotatePerBlockDelta"}


def test_mutation_must_match_one_line():
    class Broken(_zoo()._CudaMutant):
        MUTATION = ("attention.cu", "no such line", "x")

    with pytest.raises(AssertionError, match="exactly once"):
        Broken()._source("attention.cu")
