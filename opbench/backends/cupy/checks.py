"""Host-side argument checks of the cupy backend's ops: shapes and dtypes only (index values
are checked by the kernels, through the device error word).

Pure Python over anything with ``shape``, ``ndim`` and ``dtype``, so the messages are tested on
the CPU (tests/backends/test_cupy_plan.py).  The messages follow the cpu backend's.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from opbench.harness.protocol import ROTATE_LAYOUTS, AttnParams, PagedKV, RopeParams

FLOAT_NAMES = ("float32", "float16", "bfloat16")


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _dtype_name(arr: Any) -> str:
    return np.dtype(arr.dtype).name


def check_float(name: str, arr: Any) -> None:
    need(_dtype_name(arr) in FLOAT_NAMES, f"{name} dtype {arr.dtype} must be f32, f16 or bf16")


def check_index(name: str, arr: Any, shape: tuple | None = None) -> None:
    need(_dtype_name(arr) == "int32", f"{name} dtype {arr.dtype} must be int32")
    if shape is not None:
        need(tuple(arr.shape) == shape, f"{name} shape {tuple(arr.shape)} must be {shape}")


def check_f32(name: str, arr: Any, shape: tuple) -> None:
    need(_dtype_name(arr) == "float32", f"{name} must be float32")
    need(tuple(arr.shape) == shape, f"{name} shape {tuple(arr.shape)} must be {shape}")


def check_rope(x, pos, out, p: RopeParams, freq_factors) -> None:
    check_float("x", x)
    need(x.ndim == 3, f"x shape {x.shape} must be [n_tokens, n_heads, head_dim]")
    need(tuple(out.shape) == tuple(x.shape) and _dtype_name(out) == _dtype_name(x),
         f"out {out.shape} {out.dtype} must match x {x.shape} {x.dtype}")
    need(p.n_dims <= x.shape[2], f"n_dims={p.n_dims} must be even and <= head_dim={x.shape[2]}")
    check_index("pos", pos, (4, x.shape[0]) if p.mode == "mrope" else (x.shape[0],))
    if freq_factors is not None:
        check_f32("freq_factors", freq_factors, (p.n_dims // 2,))
    need(p.ext_factor == 0.0 or p.n_ctx_orig > 0,
         f"n_ctx_orig={p.n_ctx_orig} must be > 0 when ext_factor={p.ext_factor} != 0")
    need(p.freq_scale > 0.0, f"freq_scale={p.freq_scale} must be > 0")
    need(p.freq_base > 0.0, f"freq_base={p.freq_base} must be > 0")


def check_attention(q, k, v, out, p: AttnParams, mask, sinks, lse, paged) -> None:
    for name, arr in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_float(name, arr)
    need(_dtype_name(k) == _dtype_name(q) and _dtype_name(v) == _dtype_name(q)
         and _dtype_name(out) == _dtype_name(q), "q, k, v and out must share one dtype")
    rank = 3 if paged is None else 4
    need(q.ndim == 3 and k.ndim == rank and v.ndim == rank,
         f"q {q.shape}, k {k.shape}, v {v.shape}: q must be 3-d and k, v {rank}-d")
    n_q, n_heads, d_k = q.shape
    n_kv_heads, d_v = k.shape[-2], v.shape[-1]
    need(tuple(k.shape[:-1]) == tuple(v.shape[:-1]),
         f"k {k.shape} and v {v.shape} must agree but for D")
    need(k.shape[-1] == d_k, f"k head size {k.shape[-1]} must equal q's {d_k}")
    need(n_heads % n_kv_heads == 0, f"H={n_heads} must be a multiple of Hkv={n_kv_heads}")
    need(tuple(out.shape) == (n_q, n_heads, d_v),
         f"out shape {out.shape} must be {(n_q, n_heads, d_v)}")
    need(p.window >= 0 and p.softcap >= 0 and p.max_bias >= 0,
         f"window={p.window}, softcap={p.softcap}, max_bias={p.max_bias} must be >= 0")
    if sinks is not None:
        check_f32("sinks", sinks, (n_heads,))
    if lse is not None:
        check_f32("lse", lse, (n_q, n_heads))
    if paged is None:
        if mask is not None:
            check_f32("mask", mask, (n_q, k.shape[0]))
        return
    need(mask is None, "mask is not supported with paged KV")
    need(isinstance(paged, PagedKV), f"paged must be a PagedKV, got {type(paged).__name__}")
    check_index("paged.block_table", paged.block_table)
    need(paged.block_table.ndim == 2, "paged.block_table must be [n_seqs, max_blocks]")
    n_seqs = paged.block_table.shape[0]
    check_index("paged.seq_lens", paged.seq_lens, (n_seqs,))
    check_index("paged.q_start", paged.q_start, (n_seqs + 1,))


def check_kv_rotate(key_cache, block_indices, deltas, lut, layout: str) -> None:
    check_float("key_cache", key_cache)
    need(key_cache.ndim == 4, f"key_cache shape {key_cache.shape} must be [blocks, B, Hkv, D]")
    need(layout in ROTATE_LAYOUTS, f"layout={layout!r} must be one of {ROTATE_LAYOUTS}")
    block_size, d = key_cache.shape[1], key_cache.shape[3]
    need(d % 2 == 0, f"head_dim={d} must be even")
    check_index("block_indices", block_indices)
    need(block_indices.ndim == 1, "block_indices must be [R]")
    n_rot = block_indices.shape[0]
    check_index("deltas", deltas)
    need(tuple(deltas.shape) in ((n_rot, 1), (n_rot, block_size)),
         f"deltas shape {deltas.shape} must be [R={n_rot}, 1] or [R, block_size={block_size}]")
    need(_dtype_name(lut) == "float32" and lut.ndim == 2 and lut.shape[1] == d,
         f"lut {lut.shape} {lut.dtype} must be float32 [rows, D={d}]")


def check_rows(op: str, table, rows, index, index_name: str, names: tuple[str, str]) -> None:
    """``table`` is indexed by ``index``; ``rows`` holds one row per index entry."""
    check_float(names[0], table)
    check_float(names[1], rows)
    check_index(index_name, index)
    need(tuple(index.shape) == tuple(rows.shape[:1]),
         f"{op}: {index_name} shape {index.shape} must be [{names[1]} rows={rows.shape[0]}]")
    need(tuple(table.shape[1:]) == tuple(rows.shape[1:]),
         f"{op}: row shapes {names[0]} {table.shape[1:]} and {names[1]} {rows.shape[1:]} "
         f"must match")


def check_cpy(src, out, perm: Sequence[int], step: int) -> tuple[int, ...]:
    check_float("src", src)
    check_float("out", out)
    perm = tuple(int(i) for i in perm)
    need(sorted(perm) == list(range(src.ndim)),
         f"perm={perm} must be a permutation of range({src.ndim})")
    need(isinstance(step, (int, np.integer)) and step >= 1, f"step={step!r} must be an int >= 1")
    need(src.ndim <= 4, f"src has {src.ndim} dims; cpy supports up to 4")
    want = np.broadcast_to(np.int8(0), tuple(src.shape)).transpose(perm)[::step].shape
    need(tuple(out.shape) == want, f"out shape {out.shape} must be {want}")
    return perm


def lead_stride(name: str, shape: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Elements between consecutive leading indices of an array whose rows (dims 1..) are each
    C-contiguous -- what the row kernels accept, so views like ``cache[:, 0]`` need no copy."""
    expected = itemsize
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        need(size == 1 or stride == expected,
             f"{name}: each row must be contiguous (shape {tuple(shape)}, strides "
             f"{tuple(strides)})")
        expected *= size
    if not shape or shape[0] <= 1:
        return expected // itemsize
    need(strides[0] >= 0 and strides[0] % itemsize == 0,
         f"{name}: leading stride {strides[0]} must be a non-negative multiple of {itemsize}")
    return strides[0] // itemsize
