"""Host-side argument checks of the protocol's ops, shared by the backends: shapes and dtypes
only (index *values* are the kernels' business).

Duck-typed over anything with ``shape``, ``ndim`` and a NumPy-compatible ``dtype`` (NumPy
arrays, the cpu backend's DeviceArray, the cupy backend's GpuArray), so every backend gives
the same message for the same mistake.  Backends differ only in which index dtypes their
kernels read (``ArgChecks.index_dtypes``) and add their own limits on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Sequence

import numpy as np

from opbench.protocol import ROTATE_LAYOUTS, AttnParams, PagedKV, RopeParams

FLOAT_NAMES = ("float32", "float16", "bfloat16")


def need(ok: bool, message: str | Callable[[], str]) -> None:
    """ValueError(message) unless ``ok``.  A message that formats shapes is passed as a
    function, called only on failure: formatting it on every call cost more than the checks
    (the checks of a RoPE call 5.2-6.0 -> 2.1-2.3 us, of an ATTN 6.1-7.9 -> 3.2-4.4)."""
    if not ok:
        raise ValueError(message() if callable(message) else message)


#: dtype -> its name: NumPy computes ``dtype.name`` in Python (several microseconds), and the
#: checks ask for it several times per op
_NAMES: dict[Any, str] = {}


def dtype_of(arr: Any) -> str | None:
    """NumPy name of ``arr``'s dtype ("bfloat16" included), None when it has none."""
    dtype = getattr(arr, "dtype", None)
    if dtype is None:
        return None
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like
        pass
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    try:
        _NAMES[dtype] = name
    except TypeError:
        pass
    return name


def _dtype_text(arr: Any) -> str:
    return str(getattr(arr, "dtype", type(arr).__name__))


class ArgChecks:
    """The checks, for kernels that read indices of ``index_dtypes`` (NumPy names)."""

    def __init__(self, index_dtypes: tuple[str, ...] = ("int32",)) -> None:
        self.index_dtypes = index_dtypes

    # -- single arrays --------------------------------------------------------------------------
    # (the messages are built only on failure: formatting them costs more than the checks)
    @staticmethod
    def float_(name: str, arr: Any) -> None:
        if dtype_of(arr) not in FLOAT_NAMES:
            raise ValueError(f"{name} dtype {_dtype_text(arr)} must be f32, f16 or bf16")

    def index(self, name: str, arr: Any, shape: tuple | None = None) -> None:
        if dtype_of(arr) not in self.index_dtypes:
            raise ValueError(f"{name} dtype {_dtype_text(arr)} must be int32")
        if shape is not None:
            need(tuple(arr.shape) == shape,
                 lambda: f"{name} shape {tuple(arr.shape)} must be {shape}")

    @staticmethod
    def f32(name: str, arr: Any, shape: tuple) -> None:
        need(dtype_of(arr) == "float32", lambda: f"{name} must be float32")
        need(tuple(arr.shape) == shape, lambda: f"{name} shape {tuple(arr.shape)} must be {shape}")

    # -- ops ------------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors) -> None:
        self.float_("x", x)
        need(x.ndim == 3, lambda: f"x shape {tuple(x.shape)} must be [n_tokens, n_heads, head_dim]")
        need(tuple(out.shape) == tuple(x.shape) and dtype_of(out) == dtype_of(x),
             lambda: f"out {tuple(out.shape)} {dtype_of(out)} must match x {tuple(x.shape)} "
                     f"{dtype_of(x)}")
        need(p.n_dims <= x.shape[2],
             lambda: f"n_dims={p.n_dims} must be even and <= head_dim={x.shape[2]}")
        self.index("pos", pos, (4, x.shape[0]) if p.mode == "mrope" else (x.shape[0],))
        if freq_factors is not None:
            self.f32("freq_factors", freq_factors, (p.n_dims // 2,))
        need(p.ext_factor == 0.0 or p.n_ctx_orig > 0,
             lambda: f"n_ctx_orig={p.n_ctx_orig} must be > 0 when ext_factor={p.ext_factor} != 0")
        need(p.freq_scale > 0.0, lambda: f"freq_scale={p.freq_scale} must be > 0")
        need(p.freq_base > 0.0, lambda: f"freq_base={p.freq_base} must be > 0")
        if p.mode == "mrope":
            need(all(s >= 0 for s in p.sections) and sum(p.sections) > 0,
                 lambda: f"sections={p.sections} must be 4 ints >= 0 with sum > 0")

    def attention(self, q, k, v, out, p: AttnParams, mask, sinks, lse, paged) -> None:
        for name, arr in (("q", q), ("k", k), ("v", v), ("out", out)):
            self.float_(name, arr)
        rank = 3 if paged is None else 4
        need(q.ndim == 3 and k.ndim == rank and v.ndim == rank,
             lambda: f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: q must be "
                     f"3-d and k, v {rank}-d")
        n_q, n_heads, d_k = q.shape
        n_kv_heads, d_v = k.shape[-2], v.shape[-1]
        need(tuple(k.shape[:-1]) == tuple(v.shape[:-1]),
             lambda: f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree but for D")
        need(k.shape[-1] == d_k, lambda: f"k head size {k.shape[-1]} must equal q's {d_k}")
        need(n_heads % n_kv_heads == 0,
             lambda: f"H={n_heads} must be a multiple of Hkv={n_kv_heads}")
        need(tuple(out.shape) == (n_q, n_heads, d_v),
             lambda: f"out shape {tuple(out.shape)} must be {(n_q, n_heads, d_v)}")
        need(p.window >= 0 and p.softcap >= 0 and p.max_bias >= 0,
             lambda: f"window={p.window}, softcap={p.softcap}, max_bias={p.max_bias} must be >= 0")
        if sinks is not None:
            self.f32("sinks", sinks, (n_heads,))
        if lse is not None:
            self.f32("lse", lse, (n_q, n_heads))
        if paged is None:
            if mask is not None:
                self.f32("mask", mask, (n_q, k.shape[0]))
            return
        need(mask is None, "mask is not supported with paged KV")
        need(isinstance(paged, PagedKV),
             lambda: f"paged must be a PagedKV, got {type(paged).__name__}")
        self.index("paged.block_table", paged.block_table)
        need(paged.block_table.ndim == 2, "paged.block_table must be [n_seqs, max_blocks]")
        n_seqs = paged.block_table.shape[0]
        self.index("paged.seq_lens", paged.seq_lens, (n_seqs,))
        self.index("paged.q_start", paged.q_start, (n_seqs + 1,))

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout: str) -> None:
        self.float_("key_cache", key_cache)
        need(key_cache.ndim == 4,
             lambda: f"key_cache shape {tuple(key_cache.shape)} must be [blocks, B, Hkv, D]")
        need(layout in ROTATE_LAYOUTS, lambda: f"layout={layout!r} must be one of {ROTATE_LAYOUTS}")
        block_size, d = key_cache.shape[1], key_cache.shape[3]
        need(d % 2 == 0, lambda: f"head_dim={d} must be even")
        self.index("block_indices", block_indices)
        need(block_indices.ndim == 1, "block_indices must be [R]")
        n_rot = block_indices.shape[0]
        self.index("deltas", deltas)
        need(tuple(deltas.shape) in ((n_rot, 1), (n_rot, block_size)),
             lambda: f"deltas shape {tuple(deltas.shape)} must be [R={n_rot}, 1] or "
                     f"[R, block_size={block_size}]")
        need(dtype_of(lut) == "float32" and lut.ndim == 2 and lut.shape[1] == d,
             lambda: f"lut {tuple(lut.shape)} {_dtype_text(lut)} must be float32 [rows, D={d}]")

    def rows(self, op: str, table, rows, index, index_name: str, names: tuple[str, str]) -> None:
        """``table`` is indexed by ``index``; ``rows`` holds one row per index entry."""
        self.float_(names[0], table)
        self.float_(names[1], rows)
        self.index(index_name, index)
        need(tuple(index.shape) == tuple(rows.shape[:1]),
             lambda: f"{op}: {index_name} shape {tuple(index.shape)} must be [{names[1]} "
                     f"rows={rows.shape[0]}]")
        need(tuple(table.shape[1:]) == tuple(rows.shape[1:]),
             lambda: f"{op}: row shapes {names[0]} {tuple(table.shape[1:])} and {names[1]} "
                     f"{tuple(rows.shape[1:])} must match")

    def cpy(self, src, out, perm: Sequence[int], step: int) -> tuple[int, ...]:
        """The permutation as a tuple of ints, once src, out, perm and step agree."""
        self.float_("src", src)
        self.float_("out", out)
        perm = tuple(int(i) for i in perm)
        need(sorted(perm) == list(range(src.ndim)),
             lambda: f"perm={perm} must be a permutation of range({src.ndim})")
        need(isinstance(step, (int, np.integer)) and step >= 1,
             lambda: f"step={step!r} must be an int >= 1")
        permuted = [src.shape[i] for i in perm]
        want = tuple([-(-permuted[0] // step)] + permuted[1:]) if permuted else ()
        need(tuple(out.shape) == want, lambda: f"out shape {tuple(out.shape)} must be {want}")
        return perm
