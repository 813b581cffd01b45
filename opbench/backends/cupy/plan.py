"""Everything the cupy backend decides on the host, as pure Python (no cupy import).

Launch geometry, attention tiling and split-KV plans, RoPE kernel scalars and cache keys, CPY
stride folding, the logical-device -> GPU map, copy_async's stream orchestration and the
kernel source/instantiation table all live here, so they are unit-tested on any machine
(tests/backends/test_cupy_plan.py) even though the kernels themselves need a GPU to run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from opbench.protocol import RopeParams

from ..common.strides import is_dense, last_offset
from ..common.yarn import rope_corr_dims

KERNEL_DIR = Path(__file__).parent / "kernels"
COMMON_HEADER = "common.cuh"

#: storage dtype name -> C++ type in common.cuh
CTYPES = {"f32": "float", "f16": "f16_t", "bf16": "bf16_t"}
#: NVRTC options shared by the runtime (RawModule) and the CI compile test
COMPILE_OPTIONS = ("-std=c++17",)
#: architectures the CI test compiles for
CI_ARCHS = ("sm_80", "sm_90")

# CUDA limits every launch is checked against before it is issued.
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
DEFAULT_SHARED_LIMIT = 48 * 1024  # without the opt-in attribute

#: error bits of common.cuh's per-device error word -> what they mean
ERROR_BITS = {
    1: "a position was out of range",
    2: "a set_rows slot was out of range (not -1 and not in [0, rows of dst))",
    4: "a get_rows row index was out of range",
    8: "a kv_rotate delta was outside the LUT",
    16: "a block index (block table or kv_rotate block) was outside the cache",
    32: "paged attention: q_start / seq_lens inconsistent with q or the block table",
}


def decode_errors(word: int) -> list[str]:
    """Messages for every bit set in a device error word (unknown bits are named)."""
    messages = [text for bit, text in ERROR_BITS.items() if word & bit]
    unknown = word & ~sum(ERROR_BITS)
    if unknown:
        messages.append(f"unknown error bits {unknown:#x}")
    return messages


# -- kernel sources and template instantiations ------------------------------------------------
def _pairs(template: str) -> list[str]:
    return [f"{template}<{s}, {d}>" for s in CTYPES.values() for d in CTYPES.values()]


#: accumulator widths of attn_fwd<T, ACC>: Dv <= ACC * ATTN_GROUP
ATTN_ACC_WIDTHS = (8, 16, 32, 64)
#: the widest ACC whose decode shares a head's keys among its row groups (attention.cu: the
#: merge's registers would make ACC 64 spill)
KEY_SPLIT_MAX_ACC = 32
ATTN_THREADS, ATTN_BQ, ATTN_GROUP = 128, 16, 8  # mirror attention.cu's #defines
# split-KV decode (attn_splits): keys per split, the grid's bound, the most splits
DECODE_SPLIT_KEYS, DECODE_BLOCKS_PER_SM, MAX_DECODE_SPLITS = 256, 16, 128


def module_kernels() -> dict[str, list[str]]:
    """.cu file -> every kernel name expression the backend may launch from it."""
    types = list(CTYPES.values())
    return {
        "rope.cu": ["rope_cache_fill"] + [f"rope_kernel<{t}>" for t in types],
        "attention.cu": [f"attn_fwd<{t}, {acc}>" for t in types for acc in ATTN_ACC_WIDTHS]
        + [f"attn_merge<{t}>" for t in types],
        "kv_rotate.cu": [f"kv_rotate_kernel<{t}>" for t in types],
        "copies.cu": _pairs("set_rows_kernel") + _pairs("get_rows_kernel") + _pairs("cpy_kernel")
        + _pairs("cpy_kernel_i32") + _pairs("cpy_contiguous"),
        "runtime.cu": ["spin_kernel", "hold_kernel"],
        "model.cu": ["add_f32", "rms_norm_f32", "matmul_f32", "merge_partial_f32"],
    }


def load_source(file_name: str) -> str:
    """A .cu file with common.cuh pasted in place of its #include: no include path needed."""
    header = (KERNEL_DIR / COMMON_HEADER).read_text().replace("#pragma once\n", "")
    source = (KERNEL_DIR / file_name).read_text()
    include = f'#include "{COMMON_HEADER}"'
    if include not in source:
        raise ValueError(f"{file_name} must include {COMMON_HEADER}")
    return source.replace(include, header, 1)


def kernel_name(template: str, *dtypes: str) -> str:
    """kernel_name("cpy_kernel", "f32", "f16") -> "cpy_kernel<float, f16_t>"."""
    return f"{template}<{', '.join(CTYPES[d] for d in dtypes)}>"


# -- launch configurations ----------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0


def check_launch(kernel: str, launch: Launch, shared_limit: int = DEFAULT_SHARED_LIMIT) -> None:
    """ValueError naming the kernel when a launch would be rejected (or silently do nothing)."""
    gx, gy, gz = launch.grid
    threads = math.prod(launch.block)
    problems = []
    if min(launch.grid) < 1 or min(launch.block) < 1:
        problems.append("empty grid or block")
    if gx > MAX_GRID_X or gy > MAX_GRID_YZ or gz > MAX_GRID_YZ:
        problems.append(f"grid {launch.grid} beyond ({MAX_GRID_X}, {MAX_GRID_YZ}, {MAX_GRID_YZ})")
    if threads > MAX_THREADS_PER_BLOCK:
        problems.append(f"{threads} threads per block > {MAX_THREADS_PER_BLOCK}")
    if launch.shared_mem > shared_limit:
        problems.append(f"{launch.shared_mem} bytes of shared memory > {shared_limit}")
    if problems:
        raise ValueError(f"launch of {kernel} {launch}: " + "; ".join(problems))


def threads_for(work_per_block: int, lo: int = 32, hi: int = 256) -> int:
    """A warp multiple covering work_per_block, clamped to [lo, hi]."""
    return max(lo, min(hi, 32 * math.ceil(max(work_per_block, 1) / 32)))


MATMUL_TILE = 16  # mirrors model.cu


def matmul_launch(m: int, n: int) -> Launch:
    return Launch((max(1, math.ceil(n / MATMUL_TILE)), max(1, math.ceil(m / MATMUL_TILE)), 1),
                  (MATMUL_TILE, MATMUL_TILE, 1))


def row_launch(n_rows: int, row_len: int, hi: int = 256) -> Launch:
    """One block per row, threads along it (rms_norm, merge_partial)."""
    return Launch((max(1, n_rows), 1, 1), (threads_for(row_len, hi=hi), 1, 1))


def grid_stride(total: int, threads: int = 256, max_blocks: int = 65535 * 8) -> Launch:
    """1-D grid-stride launch: enough blocks to fill the GPU, never more than needed."""
    blocks = max(1, min(max_blocks, math.ceil(total / threads)))
    return Launch((blocks, 1, 1), (threads, 1, 1))


def rope_launch(n_tokens: int, n_heads: int, head_dim: int, n_dims: int) -> Launch:
    """One block per (token, head); threads over pairs (and pass-through dims)."""
    work = max(n_dims // 2, head_dim - n_dims)
    return Launch((max(1, n_tokens * n_heads), 1, 1), (threads_for(work, hi=128), 1, 1))


def kv_rotate_launch(n_rotated: int, block_size: int, n_kv_heads: int, head_dim: int) -> Launch:
    """One block per (rotated block, token); threads over (kv head, pair)."""
    work = n_kv_heads * head_dim // 2
    return Launch((max(1, n_rotated * block_size), 1, 1), (threads_for(work), 1, 1))


def rows_launch(n_rows: int, row_len: int) -> Launch:
    """set_rows / get_rows: grid.x over rows, grid.y (and threads) along a row."""
    threads = threads_for(row_len)
    chunks = min(MAX_GRID_YZ, max(1, math.ceil(row_len / (threads * 4))))
    return Launch((max(1, n_rows), chunks, 1), (threads, 1, 1))


# -- ROPE -----------------------------------------------------------------------------------------
ROPE_MODE_CODES = {"normal": 0, "neox": 1, "mrope": 2}


def rope_angle_scalars(p: RopeParams) -> dict[str, float]:
    """The angle parameters the kernels take (rope_kernel and rope_cache_fill), in their order.

    YaRN's corr dims and mscale are computed once here in float64, like the oracle."""
    corr_low, corr_high = rope_corr_dims(p) if p.ext_factor != 0.0 else (0.0, 0.0)
    mscale = p.attn_factor
    if p.ext_factor != 0.0:
        mscale *= 1.0 + 0.1 * math.log(1.0 / p.freq_scale)
    return {"n_dims": p.n_dims, "log2_base": math.log2(p.freq_base),
            "freq_scale": p.freq_scale, "ext_factor": p.ext_factor,
            "corr_low": float(corr_low), "corr_high": float(corr_high), "mscale": mscale}


def rope_use_scalars(p: RopeParams) -> dict[str, float]:
    """What rope_kernel applies at use (not part of the cached angles)."""
    sections = p.sections if p.mode == "mrope" else (0, 0, 0, 0)
    if p.mode == "mrope" and sum(sections) <= 0:
        raise ValueError(f"sections={p.sections} must sum to > 0 for mode='mrope'")
    s0, s1, s2, s3 = sections
    return {"mode": ROPE_MODE_CODES[p.mode], "s0": s0, "s1": s1, "s2": s2, "s3": s3,
            "sin_sign": -1.0 if p.inverse else 1.0}


def fingerprint(data: bytes) -> str:
    """Content digest of a small host array (freq_factors) for cache keys."""
    return hashlib.sha1(data).hexdigest()


def rope_cache_key(device_index: int, p: RopeParams, freq_factors_digest: str | None,
                   rows: int) -> tuple:
    """Key of a device's sin/cos table: every RopeParams field, the freq_factors contents and
    the row count.  No layer index: layers that share parameters share a table, layers that
    differ in anything (Gemma-3's local/global freq_base) cannot collide."""
    return (device_index, p.key(), freq_factors_digest, rows)


def rope_cache_rows(max_rows: int, wanted: int | None = None) -> int:
    """Rows to allocate: the configured capacity (positions beyond it are computed directly)."""
    if max_rows < 1:
        raise ValueError(f"rope_cache_rows={max_rows} must be >= 1")
    return max_rows if wanted is None else max(1, min(max_rows, wanted))


# -- ATTN -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnPlan:
    """How one attention call is launched.  Depends on shapes only (never on device values),
    so a CUDA graph captured with it stays valid when lengths change within the bounds."""

    bk: int  # keys per shared-memory tile
    acc: int  # attn_fwd's ACC template argument
    heads_per_block: int  # query heads of one KV head's group that one block takes
    key_split: bool  # a head with one query row shares its keys among its row groups
    n_splits: int  # > 1: split-KV path (partials + attn_merge)
    split_len: int  # keys per split, a multiple of bk
    fwd: Launch
    merge: Launch | None

    def split_ranges(self, n_keys: int) -> list[tuple[int, int]]:
        """[lo, hi) key range of each split for a sequence of n_keys (empty ranges kept)."""
        return [(min(n_keys, s * self.split_len), min(n_keys, (s + 1) * self.split_len))
                for s in range(self.n_splits)]


def attn_shared_bytes(dk: int, dv: int, bk: int) -> int:
    """attention.cu's layout: Q [BQ][Dk+1], K [bk][Dk+1], V [bk][Dv+1], P [BQ][bk] floats,
    then each key's slot (lead, sub) as [bk] ints twice."""
    return 4 * (ATTN_BQ * (dk + 1) + bk * (dk + 1) + bk * (dv + 1) + ATTN_BQ * bk + 2 * bk)


def attn_key_split_fits(dk: int, dv: int, bk: int) -> bool:
    """Whether merge_key_groups' ATTN_BQ * (Dv + 2) floats fit in the tiles' shared memory,
    which they reuse."""
    return 4 * ATTN_BQ * (dv + 2) <= attn_shared_bytes(dk, dv, bk)


def attn_acc_width(dv: int) -> int:
    for acc in ATTN_ACC_WIDTHS:
        if dv <= acc * ATTN_GROUP:
            return acc
    raise ValueError(f"Dv={dv} must be <= {ATTN_ACC_WIDTHS[-1] * ATTN_GROUP}")


def attn_tile(dk: int, dv: int, shared_limit: int) -> int:
    """Largest key tile whose shared memory fits, preferring the 48 KiB default."""
    for limit in (DEFAULT_SHARED_LIMIT, shared_limit):
        for bk in (64, 32, 16, 8):
            if attn_shared_bytes(dk, dv, bk) <= limit:
                return bk
    raise ValueError(f"Dk={dk}, Dv={dv}: no key tile fits {shared_limit} bytes of shared memory")


def attn_splits(base_blocks: int, decode: bool, max_kv: int, bk: int, num_sms: int) -> int:
    """Split the key range only for decode (one query row per sequence): into splits of about
    DECODE_SPLIT_KEYS keys while the grid stays under DECODE_BLOCKS_PER_SM blocks per SM, each
    split at least two tiles.  On an H200 these splits (64 at 32k keys and 32 heads) took as
    long as splitting to fill the GPU twice (9): 3.3 ms against Triton's 0.4 with its
    256-key splits, so the split length was not what bounded decode (docs/gpu.md)."""
    if not decode or max_kv <= 0:
        return 1
    by_length = math.ceil(max_kv / DECODE_SPLIT_KEYS)
    fill = math.ceil(DECODE_BLOCKS_PER_SM * num_sms / max(base_blocks, 1))
    most = max(1, max_kv // (2 * bk))
    return max(1, min(by_length, fill, most, MAX_DECODE_SPLITS))


def attn_heads_per_block(n_heads: int, kv_heads: int, decode: bool) -> int:
    """Query heads one attn_fwd block takes: in decode, the most of one KV head's group (a
    divisor of it, at most ATTN_BQ), so that the block stages each K/V tile once for all of
    them; otherwise one.  The fourth H200 run timed decode at 32k keys, one head a block (a
    K/V tile staged for each of a group's four heads): 1.2 ms, torch's SDPA 0.52."""
    group = n_heads // max(kv_heads, 1)
    if not decode or group <= 1:
        return 1
    return max(d for d in range(1, min(group, ATTN_BQ) + 1) if group % d == 0)


def attn_plan(n_q_total: int, n_heads: int, dk: int, dv: int, max_kv: int, n_seqs: int = 1,
              decode: bool = False, num_sms: int = 132,
              shared_limit: int = DEFAULT_SHARED_LIMIT, kv_heads: int | None = None) -> AttnPlan:
    """Launch plan.  max_kv bounds every sequence's length (n_kv, or max_blocks*block_size);
    decode says the shape is as many query rows as sequences (the rows' packing lives on the
    device: the plan must hold for any); kv_heads (default n_heads) lets a decode block take
    several query heads of one KV head."""
    bk = attn_tile(dk, dv, shared_limit)
    acc = attn_acc_width(dv)
    hpb = attn_heads_per_block(n_heads, kv_heads or n_heads, decode)
    rows_per_head = ATTN_BQ // hpb
    q_tiles = max(1, math.ceil(n_q_total / rows_per_head))  # per sequence: an upper bound
    head_blocks = n_heads // hpb
    n_splits = attn_splits(q_tiles * head_blocks * n_seqs, decode, max_kv, bk, num_sms)
    split_len = bk * math.ceil(max(max_kv, 1) / (n_splits * bk))
    n_splits = max(1, math.ceil(max(max_kv, 1) / split_len))  # no split left empty everywhere
    fwd = Launch((q_tiles * n_splits, head_blocks, n_seqs), (ATTN_THREADS, 1, 1),
                 attn_shared_bytes(dk, dv, bk))
    merge = None
    if n_splits > 1:
        merge = Launch((n_q_total * n_heads, 1, 1), (threads_for(dv, hi=128), 1, 1))
    key_split = decode and acc <= KEY_SPLIT_MAX_ACC and attn_key_split_fits(dk, dv, bk)
    return AttnPlan(bk, acc, hpb, key_split, n_splits, split_len, fwd, merge)


def alibi_scalars(n_heads: int, max_bias: float) -> tuple[float, float, int]:
    """(log2 m0, log2 m1, n_head_log2) for attn_fwd; (0, 0, 0) turns ALiBi off.  Scalars, not
    a device array of slopes: an upload inside a CUDA graph capture would be illegal."""
    if max_bias <= 0.0:
        return 0.0, 0.0, 0
    n_head_log2 = 2 ** int(math.floor(math.log2(n_heads)))
    return -max_bias / n_head_log2, -(max_bias / 2.0) / n_head_log2, n_head_log2


def alibi_slopes(n_heads: int, max_bias: float) -> list[float]:
    """The slope per head attn_fwd derives from alibi_scalars (ggml: m0^(h+1) for
    h < n_head_log2, else m1^(2(h - n_head_log2) + 1))."""
    log2_m0, log2_m1, n_head_log2 = alibi_scalars(n_heads, max_bias)
    if n_head_log2 == 0:
        return [0.0] * n_heads
    return [2.0 ** (log2_m0 * (h + 1)) if h < n_head_log2
            else 2.0 ** (log2_m1 * (2 * (h - n_head_log2) + 1)) for h in range(n_heads)]


# -- CPY ------------------------------------------------------------------------------------------
def cpy_geometry(shape: Sequence[int], strides: Sequence[int], perm: Sequence[int],
                 step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out shape, source element strides) of src.transpose(perm)[::step], padded to 4 dims
    at the front, so cpy_kernel needs no other indexing.  strides are in elements."""
    if sorted(perm) != list(range(len(shape))):
        raise ValueError(f"perm={tuple(perm)} must be a permutation of range({len(shape)})")
    if len(shape) > 4:
        raise ValueError(f"cpy supports up to 4 dims, got shape {tuple(shape)}")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    out_shape = [shape[i] for i in perm]
    out_strides = [strides[i] for i in perm]
    out_shape[0] = math.ceil(out_shape[0] / step)
    out_strides[0] *= step
    pad = 4 - len(shape)
    return (1,) * pad + tuple(out_shape), (0,) * pad + tuple(out_strides)


INT32_MAX = 2**31 - 1
#: most elements cpy_kernel_i32 takes: its grid-stride index steps past the last element by up
#: to a whole grid (grid_stride: 65535 * 8 blocks of 256 threads, 2**27) and must not overflow
CPY_I32_MAX_ELEMENTS = 2**30


def cpy_fits_int32(shape4: Sequence[int], strides4: Sequence[int]) -> bool:
    """Whether cpy_kernel_i32's 32-bit index math holds every output index (with the grid's
    step past the last) and every source offset of cpy_geometry's (shape, strides); strides
    are never negative here."""
    total = math.prod(shape4)
    largest = last_offset(shape4, strides4)
    return (total <= CPY_I32_MAX_ELEMENTS and 0 <= largest <= INT32_MAX
            and min(strides4) >= 0)


def cpy_is_contiguous(shape: Sequence[int], strides: Sequence[int], perm: Sequence[int],
                      step: int) -> bool:
    """Whether CPY reads the source in the order it writes the output: no permutation, no
    step, a C-contiguous source (dims of extent 1 may have any stride)."""
    if step != 1 or tuple(perm) != tuple(range(len(shape))):
        return False
    return is_dense(shape, strides)


# -- devices, streams, copies ----------------------------------------------------------------------
def device_map(n_logical: int, n_gpus: int) -> list[int]:
    """Logical device i runs on GPU i mod n_gpus (several may share one GPU)."""
    if n_gpus < 1:
        raise ValueError("no GPU to map logical devices onto")
    return [i % n_gpus for i in range(n_logical)]


def copy_async_steps(src_device: int, dst_device: int, on: str = "src") -> list[tuple[str, ...]]:
    """The ordered stream operations of copy_async (ggml's contract), executed by the backend.

    The copy runs on the source stream by default, after all work queued there; it first waits
    for the destination stream, whose memory pool may hand it a buffer still in use there; the
    destination then waits for the copy.  on="dst": the copy runs on the destination stream,
    and the source waits for it before anyone may overwrite src."""
    if on not in ("src", "dst"):
        raise ValueError(f"on={on!r} must be 'src' or 'dst'")
    runner, other = ("src", "dst") if on == "src" else ("dst", "src")
    steps = [("record", other, "ready"), ("wait", runner, "ready"),
             ("copy", runner, "peer" if src_device != dst_device else "device"),
             ("record", runner, "copied"), ("wait", other, "copied")]
    return steps


def l2_flush_bytes(l2_cache_bytes: int) -> int:
    """Size of the buffer written before a cold timing sample: twice L2, at least 8 MiB."""
    return max(2 * l2_cache_bytes, 8 << 20)
