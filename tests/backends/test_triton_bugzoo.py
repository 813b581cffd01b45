"""The Triton bug zoo (tests/bugzoo/triton_bugs.py): each broken variant fails a case of the
default tables in interpreter mode, and the real backend, with the same options, passes it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.harness.triton_testing import require_triton

ZOO_FILE = Path(__file__).parents[1] / "bugzoo" / "triton_bugs.py"


def _zoo():
    require_triton()
    if "triton_bugs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("triton_bugs", ZOO_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["triton_bugs"] = module
        spec.loader.exec_module(module)
    return sys.modules["triton_bugs"]


# bug class name -> (case id prefix, backend options that expose it, why these)
CATCHES = {
    # n_kv = 37 in one 128-key tile: the padded keys of the partial tile, non-causal
    "TritonAttnTailUnmasked": (
        "ATTN(type=f32,hs=[128,128],nh=4,nkvh=1,nq=5,nkv=37,causal=0,win=0,mask=0,sc=0,mb=0,"
        "sinks=0,lse=0,paged=0)", {}),
    # three sequences: the second and third read the first one's blocks
    "TritonBlockTableStride": (
        "ATTN(type=f32,hs=[64,64],nh=6,nkvh=2,nq=3,nkv=113,causal=1,win=1,mask=0,sc=1,mb=8,"
        "sinks=1,lse=1,paged=3)", {}),
    # a query tile taller than the key tile leaves fully masked causal tiles after visible ones
    "TritonSoftmaxForgetsMax": (
        "ATTN(type=f32,hs=[128,128],nh=5,nkvh=1,nq=3,nkv=113,causal=1,win=1,mask=1,sc=0,mb=0,"
        "sinks=1,lse=1,paged=0)", {"block_m": 16, "block_n": 4}),
    # 113 keys in splits of 32: four partials, the sink counted four times
    "TritonSplitSinksPerSplit": (
        "ATTN(type=f32,hs=[96,96],nh=8,nkvh=1,nq=1,nkv=113,causal=1,win=0,mask=1,sc=0,mb=0,"
        "sinks=1,lse=0,paged=0)", {"block_n": 16, "split_len": 32}),
    "TritonBf16Truncates": ("CPY(type_src=f32,type=bf16,ne=[17,4,128],perm=[1,0,2],step=2)", {}),
}


def _case(op: str, prefix: str):
    for case in SPECS[op].cases():
        if case.id.startswith(prefix):
            return case
    raise AssertionError(f"the {op} table has no case {prefix!r}; update CATCHES")


def _status(backend_class, case, options) -> tuple[str, str]:
    backend = backend_class(mode="interpreter", **options)
    backend.devices(1)
    try:
        record = run_case(backend, case)
    finally:
        backend.close()
    return record["status"], record["reason"]


def test_every_bug_has_a_catching_case():
    assert set(CATCHES) == {cls.__name__ for cls in _zoo().TRITON_BUGS}


@pytest.mark.parametrize("name", list(CATCHES))
def test_case_catches_bug_and_real_backend_passes(name):
    zoo = _zoo()
    bug = getattr(zoo, name)
    prefix, options = CATCHES[name]
    case = _case(zoo.TRITON_BUGS[bug], prefix)
    status, reason = _status(bug, case, options)
    assert status == "FAIL", f"{name} not caught by {case.id}: {status} {reason}"
    status, reason = _status(zoo.TritonBackend, case, options)
    assert status == "OK", f"real backend on {case.id}: {reason}"


def test_mutant_refuses_a_line_the_kernel_does_not_have():
    zoo = _zoo()
    from opbench.backends.triton import kernels_attention

    with pytest.raises(AssertionError, match="exactly once"):
        zoo.mutant(kernels_attention.flash_attention_kernel, "no such line", "x")
