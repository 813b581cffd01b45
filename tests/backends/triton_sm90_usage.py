"""Registers and stack of the Triton attention kernels as compiled for sm_90 with the cuda
mode's default tiles, per head size of the ATTN table, printed as JSON (``--cpy``: the
integer divisions in the PTX of each CPY indexing mode instead).  Runs without a GPU:
Triton compiles ahead of time for a target, and the cuobjdump in its wheel reads the binary.
Run as a script, in a process where ``TRITON_INTERPRET`` is unset (the kernels must be
``triton.jit`` functions, not the interpreter's)."""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, set to silence it

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from opbench.backends.triton import kernels_attention as ka  # noqa: E402
from opbench.backends.triton import kernels_copy  # noqa: E402
from opbench.backends.triton.kernels_common import next_pow2  # noqa: E402
from opbench.harness.ops.attn import HEAD_SIZES  # noqa: E402

CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FLOAT_ARGS = {"scale", "softcap", "log2_m0", "log2_m1"}
DATA_ARGS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}


def signature(kernel, constexprs: dict, dtype: str) -> dict:
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in DATA_ARGS:
            types[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            types[name] = "*i32" if name in ("bt_ptr", "seq_lens_ptr", "q_start_ptr") else "*fp32"
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return types


def usage(decode: bool, dk: int, dv: int, dtype: str = "fp32",
          tiles: dict | None = None) -> dict:
    tiles = tiles or ka.default_tiles(False, dk, decode)
    kernel = ka.decode_split_kernel if decode else ka.flash_attention_kernel
    constexprs = dict(DK=dk, DV=dv, PAGED=False, CAUSAL=True, WINDOW=False, SOFTCAP=False,
                      HAS_MASK=False, ALIBI=False, BLOCK_DK=next_pow2(max(dk, 16)),
                      BLOCK_DV=next_pow2(max(dv, 16)), BLOCK_N=tiles["block_n"])
    if not decode:
        constexprs.update(HAS_SINKS=False, HAS_LSE=False, BLOCK_M=tiles["block_m"])
    options = {k: tiles[k] for k in ("num_warps", "num_stages") if k in tiles}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature(kernel, constexprs, dtype),
                                        constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True,
                                text=True, check=True).stdout
    registers, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", report).groups())
    return {"kernel": "decode" if decode else "flash", "hs": [dk, dv], "tiles": tiles,
            "registers": registers, "stack": stack, "shared": compiled.metadata.shared}


def cpy_divisions(contiguous: bool, wide: bool) -> dict:
    """64- and 32-bit integer divisions and remainders in cpy_kernel's PTX, f32 -> f16."""
    constexprs = dict(BLOCK=1024, CONTIGUOUS=contiguous, WIDE=wide)
    types = {}
    for name in inspect.signature(kernels_copy.cpy_kernel.fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name == "src_ptr" else "*fp16"
        else:
            types[name] = "i64" if wide else "i32"
    ptx = triton.compile(ASTSource(fn=kernels_copy.cpy_kernel, signature=types,
                                   constexprs=constexprs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    count = lambda bits: ptx.count(f"div.s{bits}") + ptx.count(f"rem.s{bits}")  # noqa: E731
    return {"contiguous": contiguous, "wide": wide, "div64": count(64), "div32": count(32)}


if __name__ == "__main__":
    if "--cpy" in sys.argv:
        rows = [cpy_divisions(c, w) for c in (True, False) for w in (True, False)]
    elif "--old-tiles" in sys.argv:  # the flash tiles used before GPU_TILES, at head size 128
        rows = [usage(False, 128, 128, tiles={"block_m": 64, "block_n": 64, "num_warps": 4})]
    else:
        rows = [usage(decode, dk, dv) for dk, dv in HEAD_SIZES for decode in (False, True)]
    print(json.dumps(rows))
