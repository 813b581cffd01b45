"""The ``ggml`` backend: ggml's own CPU kernels, driven through ggml-python (ctypes).

Each op call builds a small graph from the NumPy arrays (no copies: every ggml tensor's
``data`` points into a NumPy buffer), computes it on ggml's CPU backend with one thread per
core, and the result lands directly in the output array.  Layouts: ggml's ``ne0`` is the
fastest dimension, so our row-major ``[n_tokens, n_heads, head_dim]`` is ggml
``ne=[head_dim, n_heads, n_tokens]``.

A failed GGML_ASSERT aborts the whole process, so ``supports`` declares, with the reason taken
from ggml's source, every case ggml would assert on instead of letting it reach ggml.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Sequence

import numpy as np

from opbench.protocol import AttnParams, Backend, Option, RopeParams

from .common.host import flush_host_caches

try:  # optional: the module must import without ggml-python
    import ggml
except ImportError:  # pragma: no cover - exercised only where ggml-python is missing
    ggml = None

INSTALL_HINT = "pip install 'opbench[ggml]'"
ROPE_MODE = {"normal": 0, "neox": 2, "mrope": 8}  # GGML_ROPE_TYPE_{NORMAL,NEOX,MROPE}
GRAPH_SIZE = 16  # nodes per graph: every op here builds at most a handful


def _ggml_type(dtype: np.dtype) -> int:
    table = {"float32": ggml.GGML_TYPE_F32, "float16": ggml.GGML_TYPE_F16,
             "bfloat16": ggml.GGML_TYPE_BF16, "int32": ggml.GGML_TYPE_I32}
    return table[np.dtype(dtype).name]


class Graph:
    """One context + graph whose tensors all live in NumPy buffers (``no_alloc`` context).

    Tensors made here keep a reference to their buffer, so nothing is freed under ggml."""

    def __init__(self, n_tensors: int = 32) -> None:
        mem = n_tensors * ggml.ggml_tensor_overhead()
        mem += ggml.ggml_graph_overhead_custom(GRAPH_SIZE, False) + 4096
        params = ggml.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True)
        self.ctx = ggml.ggml_init(params)
        self._buffers: list[np.ndarray] = []

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc) -> None:
        ggml.ggml_free(self.ctx)

    def tensor(self, array: np.ndarray):
        """A ggml tensor over a C-contiguous array (ne reversed from the NumPy shape)."""
        if not array.flags.c_contiguous:
            raise ValueError("ggml tensors need C-contiguous arrays")
        ne = tuple(reversed(array.shape)) or (1,)
        t = ggml.ggml_new_tensor(self.ctx, _ggml_type(array.dtype), len(ne),
                                 (ctypes.c_int64 * len(ne))(*ne))
        return self.bind(t, array)

    def bind(self, t, array: np.ndarray):
        """Point tensor ``t`` (an input, or an op result before compute) at ``array``."""
        if array.nbytes != ggml.ggml_nbytes(t):
            raise ValueError(f"buffer of {array.nbytes} bytes for a {ggml.ggml_nbytes(t)}-byte"
                             " tensor")
        t.contents.data = array.ctypes.data
        self._buffers.append(array)
        return t

    def scratch(self, t):
        """Give an intermediate op result its own buffer."""
        return self.bind(t, np.empty(ggml.ggml_nbytes(t), dtype=np.uint8))

    def compute(self, result, n_threads: int) -> None:
        graph = ggml.ggml_new_graph_custom(self.ctx, GRAPH_SIZE, False)
        ggml.ggml_build_forward_expand(graph, result)
        plan = ggml.ggml_graph_plan(graph, n_threads, None)
        work = np.empty(max(1, plan.work_size), dtype=np.uint8)
        plan.work_data = ctypes.cast(work.ctypes.data, ctypes.POINTER(ctypes.c_uint8))
        status = ggml.ggml_graph_compute(graph, ctypes.pointer(plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute returned status {status}")


def _permute_axes(perm: Sequence[int]) -> list[int]:
    """NumPy ``transpose(perm)`` as ggml_permute's axes (source ggml dim i goes to axes[i])."""
    n = len(perm)
    axes = list(range(4))
    for j, src in enumerate(perm):
        axes[n - 1 - src] = n - 1 - j
    return axes


def attention_mask(rel: np.ndarray, p: AttnParams, user_mask=None, key_ok=None):
    """f16 mask ``[n_q, n_kv]`` as ggml_flash_attn_ext reads it, or None when nothing masks.

    ``rel`` is qpos - kpos per (query, key); ``key_ok`` marks keys a query may see at all
    (paged: the cells of its own sequence).  ggml multiplies the mask by the ALiBi slope, so
    with ALiBi the mask holds (kpos - qpos), as llama.cpp builds it."""
    visible = np.ones(rel.shape, dtype=bool) if key_ok is None else key_ok.copy()
    if p.causal:
        visible &= rel >= 0
    if p.window > 0:
        visible &= rel < p.window
    if p.max_bias > 0:
        mask = (-rel).astype(np.float32)
    elif user_mask is not None:
        mask = np.array(user_mask, dtype=np.float32)
    elif visible.all():
        return None
    else:
        mask = np.zeros(rel.shape, dtype=np.float32)
    mask[~visible] = -np.inf
    return mask.astype(np.float16)


class GgmlBackend(Backend):
    name = "ggml"
    OPTIONS = (Option("n_threads", int, None, "ggml compute threads (default: every CPU)"),)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        if ggml is None:
            return False, INSTALL_HINT
        return True, ""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.n_threads = self.options["n_threads"] or os.cpu_count() or 1
        if ggml is not None:
            ggml.ggml_cpu_init()  # fp16 tables; idempotent

    def info(self) -> dict:
        from importlib.metadata import version

        return {"ggml-python": version("ggml-python"), "threads": self.n_threads,
                "device_names": ["cpu"]}

    def flush_l2(self, device: Any = None) -> None:
        """ggml's CPU backend runs on the host: evict its caches (``perf --cold``)."""
        flush_host_caches()

    def known_failures(self) -> list[tuple]:
        from .ggml_known_failures import KNOWN_FAILURES

        return list(KNOWN_FAILURES)

    def supports(self, case: Any) -> bool | str:
        if case.op == "KV_ROTATE":
            return ("ggml has no LUT-driven key rotation; llama.cpp re-rotates its K cache with "
                    "ggml_rope_ext on position deltas (K-shift), a different contract")
        base = super().supports(case)
        if base is not True:
            return base
        return self._supports_attn(case) if case.op == "ATTN" else True

    @staticmethod
    def _supports_attn(case) -> bool | str:
        if case.get("lse"):
            return "ggml_flash_attn_ext has no log-sum-exp output"
        if case.get("mb") and case.get("mask"):
            return ("ggml multiplies the mask by the ALiBi slope (slope*mask); opbench adds the "
                    "user mask and slope*(kpos-qpos) separately, so mask+ALiBi is not "
                    "expressible")
        return True

    # -- memory: plain NumPy on the host, one CPU device ---------------------------------------
    def devices(self, n: int = 1) -> list[Any]:
        self._devices = ["cpu"] * n
        return self._devices

    def to_device(self, host: np.ndarray, device: Any = None) -> Any:
        return np.array(host, copy=True, order="C")

    def _compute(self, g: Graph, result) -> None:
        g.compute(result, self.n_threads)

    def _into(self, g: Graph, result, out: np.ndarray):
        """Make ``result`` land in ``out``: bind it if types match, else a ggml_cpy node."""
        if result.contents.type == _ggml_type(out.dtype):
            g.bind(result, out)
            return result
        g.scratch(result)
        return ggml.ggml_cpy(g.ctx, result, g.tensor(out))

    # -- ops --------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        with Graph() as g:
            a = g.tensor(x)
            if x.dtype.name == "bfloat16":
                # ggml-cpu rope is f32/f16 only; llama.cpp keeps activations in f32, so a bf16
                # tensor is cast to f32 (exact), roped, and rounded back once
                a = g.scratch(ggml.ggml_cast(g.ctx, a, ggml.GGML_TYPE_F32))
            b = g.tensor(np.ascontiguousarray(pos, dtype=np.int32).reshape(-1))
            c = g.tensor(np.ascontiguousarray(freq_factors)) if freq_factors is not None \
                else None
            common = (p.n_ctx_orig, p.freq_base, p.freq_scale, p.ext_factor, p.attn_factor,
                      p.beta_fast, p.beta_slow)
            if p.mode == "mrope":
                fn = ggml.ggml_rope_multi_back if p.inverse else ggml.ggml_rope_multi
                sections = (ctypes.c_int * 4)(*p.sections)
                result = fn(g.ctx, a, b, c, p.n_dims, sections, ROPE_MODE["mrope"], *common)
            else:
                # ROPE_BACK is the same kernel with sin negated: the inverse rotation
                fn = ggml.ggml_rope_ext_back if p.inverse else ggml.ggml_rope_ext
                result = fn(g.ctx, a, b, c, p.n_dims, ROPE_MODE[p.mode], *common)
            self._compute(g, self._into(g, result, out))

    def attention(self, q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None,
                  paged=None, stream=None) -> None:
        if lse is not None:
            raise NotImplementedError("ggml_flash_attn_ext has no log-sum-exp output")
        if paged is None:
            n_q, n_kv = q.shape[0], k.shape[0]
            rel = np.arange(n_kv - n_q, n_kv)[:, None] - np.arange(n_kv)[None, :]
            f16_mask = attention_mask(rel, p, mask)
        else:
            k, v, f16_mask = self._unified_cache(k, v, p, paged)
        self._flash_attn(q, k, v, out, p, f16_mask, sinks)

    @staticmethod
    def _unified_cache(k_cache, v_cache, p: AttnParams, paged):
        """llama.cpp's unified KV cache: attend over every cell, mask other sequences' cells.

        Returns k, v as ``[cells, Hkv, D]`` views and the f16 mask ``[n_q_total, cells]``."""
        num_blocks, block_size = k_cache.shape[:2]
        cells = num_blocks * block_size
        q_start, seq_lens = np.asarray(paged.q_start), np.asarray(paged.seq_lens)
        table = np.asarray(paged.block_table)
        rel = np.zeros((q_start[-1], cells), dtype=np.int64)
        key_ok = np.zeros((q_start[-1], cells), dtype=bool)
        for s, kv_len in enumerate(seq_lens):
            t = np.arange(kv_len)
            slot = table[s, t // block_size] * block_size + t % block_size
            n_q = q_start[s + 1] - q_start[s]
            q_pos = kv_len - n_q + np.arange(n_q)
            rel[q_start[s]:q_start[s + 1], slot] = q_pos[:, None] - t[None, :]
            key_ok[q_start[s]:q_start[s + 1], slot] = True
        mask = attention_mask(rel, p, key_ok=key_ok)
        return (k_cache.reshape((cells,) + k_cache.shape[2:]),
                v_cache.reshape((cells,) + v_cache.shape[2:]), mask)

    def _flash_attn(self, q, k, v, out, p: AttnParams, f16_mask, sinks) -> None:
        with Graph() as g:
            # ggml wants q [Dk, n_q, H] (f32, as llama.cpp feeds it), k/v [D, n_kv, Hkv]
            qt = ggml.ggml_permute(g.ctx, g.tensor(q.astype(np.float32)), 0, 2, 1, 3)
            kt = ggml.ggml_permute(g.ctx, g.tensor(k), 0, 2, 1, 3)
            vt = ggml.ggml_permute(g.ctx, g.tensor(v), 0, 2, 1, 3)
            mt = g.tensor(f16_mask) if f16_mask is not None else None
            result = ggml.ggml_flash_attn_ext(g.ctx, qt, kt, vt, mt, p.scale, p.max_bias,
                                              p.softcap)
            if sinks is not None:
                ggml.ggml_flash_attn_ext_add_sinks(result, g.tensor(sinks))
            # result is [Dv, H, n_q]: already our row-major [n_q, H, Dv]
            self._compute(g, self._into(g, result, out))

    def set_rows(self, dst, src, slots, stream=None) -> None:
        slots = np.asarray(slots, dtype=np.int32)
        keep = np.flatnonzero(slots >= 0).astype(np.int32)  # ggml asserts 0 <= slot: skip -1
        if keep.size == 0:
            return
        with Graph() as g:
            rows = src.reshape(src.shape[0], -1)
            a = g.tensor(dst.reshape(dst.shape[0], -1))
            # set_rows takes f32 rows; get_rows picks the kept rows and converts exactly to f32
            b = g.scratch(ggml.ggml_get_rows(g.ctx, g.tensor(rows), g.tensor(keep)))
            c = g.tensor(np.ascontiguousarray(slots[keep]))
            self._compute(g, ggml.ggml_set_rows(g.ctx, a, b, c))

    def get_rows(self, src, rows, out, stream=None) -> None:
        with Graph() as g:
            a = g.tensor(src.reshape(src.shape[0], -1))
            b = g.tensor(np.ascontiguousarray(rows, dtype=np.int32))
            result = ggml.ggml_get_rows(g.ctx, a, b)  # always f32 rows
            self._compute(g, self._into(g, result, out.reshape(out.shape[0], -1)))

    def cpy(self, src, out, perm: Sequence[int], step: int = 1, stream=None) -> None:
        if src.ndim > 4:
            raise ValueError(f"ggml tensors have at most 4 dims, got {src.ndim}")
        with Graph() as g:
            view = self._stepped_view(g, g.tensor(src), src.ndim, perm, step)
            self._compute(g, ggml.ggml_cpy(g.ctx, view, g.tensor(out)))

    @staticmethod
    def _stepped_view(g: Graph, t, ndim: int, perm: Sequence[int], step: int):
        """``src.transpose(perm)[::step]`` as ggml views.

        The step applies to source dim ``perm[0]``; a ggml view cannot stride ne0, so when that
        is the source's fastest dim the permuted tensor is made contiguous first (ggml_cont)."""
        axes = _permute_axes(perm)
        if step == 1:
            return ggml.ggml_permute(g.ctx, t, *axes)
        stepped_dim = ndim - 1 - perm[0]  # ggml index of the stepped source dim
        if stepped_dim == 0:
            t = g.scratch(ggml.ggml_cont(g.ctx, ggml.ggml_permute(g.ctx, t, *axes)))
            stepped_dim, axes = ndim - 1, list(range(4))
        ne = list(t.contents.ne)
        nb = list(t.contents.nb)
        ne[stepped_dim] = -(-ne[stepped_dim] // step)
        nb[stepped_dim] *= step
        view = ggml.ggml_view_4d(g.ctx, t, *ne, nb[1], nb[2], nb[3], 0)
        return ggml.ggml_permute(g.ctx, view, *axes)
