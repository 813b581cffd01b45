"""The cuda mode's default attention tiles compile for sm_90 without register spills, at every
head size of the ATTN table (Triton compiles ahead of time without a GPU; the cuobjdump in its
wheel reads the registers and stack of the binary: ``triton_sm90_usage.py``).  The tiles used
before spilled a 9 KB stack at head size 128, and the first H200 run's f32 prefill took 9.2x
torch's SDPA."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_sm90_usage.py")
SM90_SHARED_LIMIT = 232_448  # bytes a block may opt into on an H100/H200


def _tools_missing() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "triton is not installed: pip install 'opbench[triton]'"
    cuobjdump = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return f"this triton wheel has no {cuobjdump}"
    return None


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


def _usage(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         env=env, timeout=900, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_tiles_usage() -> list[dict]:
    return _usage()


def test_default_tiles_spill_no_register_and_fit_shared_memory(default_tiles_usage):
    from opbench.harness.ops.attn import HEAD_SIZES

    assert {(r["kernel"], tuple(r["hs"])) for r in default_tiles_usage} == {
        (kernel, hs) for hs in HEAD_SIZES for kernel in ("flash", "decode")}
    spilling = [r for r in default_tiles_usage if r["stack"] > 0]
    too_big = [r for r in default_tiles_usage if r["shared"] > SM90_SHARED_LIMIT]
    assert not spilling and not too_big, spilling + too_big


def test_the_check_sees_the_old_tiles_spill():
    """64x64 tiles at head size 128 with four warps (the GPU default before): a stack."""
    (old,) = _usage("--old-tiles")
    assert old["stack"] > 0, old


def test_cpy_divides_in_64_bits_only_where_indices_need_it():
    """A 64-bit division is a long instruction sequence on a GPU (cupy's 16 MiB copy on the
    H200: 102 us through its 64-bit-index kernel, 28 as a memcpy): a dense copy divides
    nothing, the 32-bit mode only in 32 bits (kernels_copy.cpy_index_plan picks the mode)."""
    modes = {(r["contiguous"], r["wide"]): (r["div64"], r["div32"]) for r in _usage("--cpy")}
    assert modes[True, False] == (0, 0) and modes[True, True] == (0, 0)
    assert modes[False, False][0] == 0 and modes[False, False][1] > 0
    assert modes[False, True][0] > 0  # the check sees 64-bit divisions where they are
