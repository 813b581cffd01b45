"""``CupyBackend``: CUDA kernels (kernels/*.cu through cupy.RawModule) behind the protocol.

Every op validates shapes and dtypes on the host (``checks``, with the cpu backend's
messages), resolves the logical device owning its arrays, plans its launch with
``plan`` (pure Python, tested without a GPU), checks the launch against the device limits and
queues the kernel on the device's non-blocking stream.  Index values (slots, rows, block
tables, deltas) are checked by the kernels, which OR bits into a per-device error word that
``synchronize`` decodes and raises.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from opbench.protocol import AttnParams, Option, RopeParams, RuntimeBackend, SizeThreshold

from . import checks, plan
from .launch import KernelLauncher
from .runtime import (
    CupyDevice,
    CupyRuntime,
    DeviceMismatchError,
    GpuArray,
    GpuStream,
    status,
)
from .scenario_ops import ScenarioOpsMixin

NULL = np.uint64(0)  # a null pointer kernel argument
MAX_ROPE_TABLES = 64  # per device, least recently used dropped first


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


DEFAULT_ROPE_CACHE_ROWS = 8192


class CupyBackend(ScenarioOpsMixin, RuntimeBackend):
    """CUDA kernels through cupy; options: ``OPTIONS``.  Devices, memory, streams, events,
    copies, graphs and timing are its ``CupyRuntime``; kernel loading and launches its
    ``KernelLauncher``; this class holds the ops."""

    name = "cupy"
    OPTIONS = (
        Option("rope_cache", bool, True, "sin/cos table per device and RoPE parameters"),
        Option("rope_cache_rows", int, DEFAULT_ROPE_CACHE_ROWS,
               "positions the table holds (later ones are computed directly)"),
        Option("delay", bool, False, "fault injection: a seeded random spin kernel before"
               " every op"),
        Option("delay_seed", int, 0, "seed of the delays"),
        Option("delay_max_ms", float, 2.0, "longest delay"),
        Option("sync_each_launch", bool, False, "debug: wait for and check every kernel right"
               " after its launch"),
    )
    THRESHOLDS = (
        SizeThreshold("ATTN", "nq", plan.ATTN_BQ, "a second query tile"),
        SizeThreshold("ATTN", "nkv", 64, "a second key tile (bk = 64 where the head fits)"),
        SizeThreshold("ATTN", "nkv", 4 * 64 - 1,
                      "decode splits the keys (split-KV + merge): two splits of two tiles"),
        SizeThreshold("ROPE", "pos", DEFAULT_ROPE_CACHE_ROWS - 1,
                      "positions past the cos/sin cache are computed directly"),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(CupyRuntime(self._cupy), **options)
        opts = self.options
        self.rope_cache = opts["rope_cache"]
        self.rope_cache_rows = plan.rope_cache_rows(opts["rope_cache_rows"])
        self.delay = opts["delay"]
        self.delay_max_ms = opts["delay_max_ms"]
        self.sync_each_launch = opts["sync_each_launch"]
        self.launcher = self.runtime.launcher = KernelLauncher(
            self.runtime, self._source, self.delay, opts["delay_seed"], self.delay_max_ms,
            self.sync_each_launch)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return status()

    @staticmethod
    def _cupy():
        """The cupy module every call goes through (the CPU emulator substitutes its own)."""
        import cupy

        return cupy

    def info(self) -> dict:
        facts: dict[str, Any] = {"available": self.available()[1], "rope_cache": self.rope_cache,
                                 "delay": self.delay}
        try:
            cupy = self._cupy()
            facts["cupy"] = cupy.__version__
            facts["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            facts["devices"] = [d.name for d in self.runtime.device_list()]
        except Exception as exc:  # info() must work where the backend cannot run
            facts["error"] = str(exc)
        return facts

    def known_failures(self) -> list[tuple[str, str]]:
        from .known_failures import KNOWN_FAILURES

        return list(KNOWN_FAILURES)

    def supports(self, case: Any) -> bool | str:
        base = super().supports(case)
        if base is not True:
            return base
        if case.op == "ATTN":
            _, dv = case.get("hs", (0, 0))
            try:
                plan.attn_acc_width(dv)
            except ValueError as exc:
                return str(exc)
        return True

    # -- devices and memory (the runtime's), plus what needs the ops ----------------------------
    def devices(self, n: int = 1) -> list[CupyDevice]:
        """n logical devices, round-robin over the GPUs; existing ones are kept."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} devices must be an int >= 1")
        ok, reason = self.available()
        if not ok:
            raise RuntimeError(f"cupy backend unavailable: {reason}")
        return self.runtime.devices(n)

    def to_host(self, arr: GpuArray) -> np.ndarray:
        device = self.runtime.owner("arr", arr)
        if not arr.data.flags.c_contiguous:  # gather with our cpy kernel, not cupy's
            dense = self.empty(arr.shape, arr.dtype, device)
            self.cpy(arr, dense, tuple(range(arr.ndim)), 1)
            arr = dense
        return self.runtime.to_host(arr)

    def view(self, arr: GpuArray, offset: int, shape: Sequence[int]) -> GpuArray:
        n = int(np.prod(shape))
        flat = arr.data.reshape(-1)
        return GpuArray(flat[offset: offset + n].reshape(tuple(shape)), arr.dtype, arr.device)


    def timer(self, device: Any = None) -> Callable[[Callable[[], None]], float]:
        """Times one call's GPU work with CUDA events on the device's stream (nanoseconds),
        the host's enqueue hidden behind a spin kernel (``common.event_timer``)."""
        return self.runtime.timer(device)

    def inject_delay(self, stream: GpuStream, ms: float) -> None:
        """Fault injection: the stream sleeps ~ms on the GPU (spin kernel with __nanosleep)."""
        self.launcher.inject_delay(stream, ms)

    # -- ops ------------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        checks.check_rope(x, pos, out, p, freq_factors)
        self._need_int32(pos=pos)
        self._need_contiguous(x=x, pos=pos, out=out, freq_factors=freq_factors)
        dev = self._same_device("rope", x=x, pos=pos, out=out, freq_factors=freq_factors)
        target = self._target(dev, stream)
        n_tokens, n_heads, head_dim = x.shape
        table, rows = self._rope_table(target, p, freq_factors)
        angles, use = plan.rope_angle_scalars(p), plan.rope_use_scalars(p)
        ff = NULL if freq_factors is None else freq_factors.data
        args = (x.data, out.data, pos.data, ff, table, _i32(rows), _i32(n_tokens),
                _i32(n_heads), _i32(head_dim), _i32(p.n_dims), _i32(use["mode"]),
                _i32(use["s0"]), _i32(use["s1"]), _i32(use["s2"]), _i32(use["s3"]),
                *self._angle_args(angles), np.float32(use["sin_sign"]))
        name = plan.kernel_name("rope_kernel", _dtype(x))
        self._run(target, "rope.cu", name, plan.rope_launch(n_tokens, n_heads, head_dim,
                                                            p.n_dims), args)
        out.fingerprint = None

    @staticmethod
    def _angle_args(a: dict) -> tuple:
        return tuple(np.float64(a[k]) for k in ("log2_base", "freq_scale", "ext_factor",
                                               "corr_low", "corr_high", "mscale"))

    def _rope_table(self, target: GpuStream, p: RopeParams, freq_factors) -> tuple[Any, int]:
        """(device table, rows) for these parameters, filled on ``target`` on a miss;
        (NULL, 0) when the cache is off or the key cannot be known without a device read."""
        if not self.rope_cache:
            return NULL, 0
        digest = None
        if freq_factors is not None:
            digest = freq_factors.fingerprint
            if digest is None:
                return NULL, 0  # contents unknown on the host: never risk a stale table
        dev, rows = target.device, self.rope_cache_rows
        key = plan.rope_cache_key(dev.index, p, digest, rows)
        tables = dev.rope_tables
        table = tables.get(key)
        if table is None:
            if target.cupy_stream.is_capturing():
                return NULL, 0  # no allocation inside a capture: compute directly
            table = self._fill_rope_table(target, p, freq_factors, rows)
            tables[key] = table
            if len(tables) > MAX_ROPE_TABLES:
                tables.popitem(last=False)
        tables.move_to_end(key)
        return table, rows

    def _fill_rope_table(self, target: GpuStream, p: RopeParams, freq_factors, rows: int):
        cupy = self._cupy()
        half = p.n_dims // 2
        with cupy.cuda.Device(target.device.gpu), target.cupy_stream:
            table = cupy.empty(rows * half * 2, np.float32)  # float2 [rows, half]
        ff = NULL if freq_factors is None else freq_factors.data
        args = (table, _i32(rows), ff, _i32(p.n_dims),
                *self._angle_args(plan.rope_angle_scalars(p)))
        self._run(target, "rope.cu", "rope_cache_fill", plan.grid_stride(rows * half), args,
                  delay=False)
        return table

    def attention(self, q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None,
                  paged=None, stream=None) -> None:
        checks.check_attention(q, k, v, out, p, mask, sinks, lse, paged)
        arrays = dict(q=q, k=k, v=v, out=out, mask=mask, sinks=sinks, lse=lse)
        if paged is not None:
            arrays.update(block_table=paged.block_table, seq_lens=paged.seq_lens,
                          q_start=paged.q_start)
            self._need_int32(block_table=paged.block_table, seq_lens=paged.seq_lens,
                             q_start=paged.q_start)
        self._need_contiguous(**{n: a for n, a in arrays.items() if n not in ("k", "v")})
        dev = self._same_device("attention", **arrays)
        target = self._target(dev, stream)
        shape = _attn_shape(q, k, v, paged)
        attn = plan.attn_plan(shape["n_q"], shape["H"], shape["Dk"], shape["Dv"],
                              shape["max_kv"], shape["n_seqs"], shape["decode"], dev.num_sms,
                              dev.shared_optin, kv_heads=shape["Hkv"])
        attn, (part_out, part_lse) = self._attn_workspace(target, attn, shape)
        log2_m0, log2_m1, n_head_log2 = plan.alibi_scalars(shape["H"], p.max_bias)
        split = attn.n_splits > 1
        tables = (NULL,) * 3 if paged is None else (
            paged.block_table.data, paged.seq_lens.data, paged.q_start.data)
        sizes = (shape[n] for n in ("n_q", "H", "Hkv", "Dk", "Dv", "n_kv", "max_blocks",
                                    "block_size", "num_blocks"))
        args = (q.data, k.data, v.data, out.data, _ptr(mask), _ptr(sinks),
                NULL if split else _ptr(lse), part_out, part_lse, *tables, dev.error_word,
                *(_i32(n) for n in sizes), np.float32(p.scale), np.float32(p.softcap),
                np.float32(log2_m0), np.float32(log2_m1), _i32(n_head_log2),
                _i32(int(p.causal)), _i32(p.window), _i32(attn.bk),
                _i32(attn.heads_per_block), _i32(int(attn.key_split)), _i32(attn.n_splits),
                _i32(attn.split_len), _i64(_lead_stride("k", k)), _i64(_lead_stride("v", v)))
        fwd = f"attn_fwd<{plan.CTYPES[_dtype(q)]}, {attn.acc}>"
        self._run(target, "attention.cu", fwd, attn.fwd, args)
        if split:
            merge_args = (part_out, part_lse, _ptr(sinks), out.data, _ptr(lse),
                          _i32(shape["n_q"]), _i32(shape["H"]), _i32(shape["Dv"]),
                          _i32(attn.n_splits))
            self._run(target, "attention.cu", plan.kernel_name("attn_merge", _dtype(q)),
                      attn.merge, merge_args, delay=False)
        out.fingerprint = None

    def _attn_workspace(self, target: GpuStream, attn: plan.AttnPlan, shape: dict):
        """(plan, (part_out, part_lse)) for the split-KV partials.  Outside a capture: one
        growing buffer per stream.  Inside one: a buffer of its own, from the capture's
        private memory pool, which lives as long as the graph."""
        if attn.n_splits == 1:
            return attn, (NULL, NULL)
        rows = attn.n_splits * shape["n_q"] * shape["H"]
        need = rows * (shape["Dv"] + 1)
        dev, cupy = target.device, self._cupy()
        buf = dev.workspaces.get(id(target))
        if target.cupy_stream.is_capturing() or buf is None or buf.size < need:
            with cupy.cuda.Device(dev.gpu), target.cupy_stream:
                buf = cupy.empty(need, np.float32)
            if not target.cupy_stream.is_capturing():
                dev.workspaces[id(target)] = buf
        return attn, (buf[: rows * shape["Dv"]], buf[rows * shape["Dv"]: need])

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout: str, stream=None) -> None:
        checks.check_kv_rotate(key_cache, block_indices, deltas, lut, layout)
        self._need_int32(block_indices=block_indices, deltas=deltas)
        self._need_contiguous(block_indices=block_indices, deltas=deltas, lut=lut)
        dev = self._same_device("kv_rotate", key_cache=key_cache, block_indices=block_indices,
                                deltas=deltas, lut=lut)
        target = self._target(dev, stream)
        num_blocks, block_size, n_kv_heads, head_dim = key_cache.shape
        n_rot = block_indices.shape[0]
        if n_rot == 0:
            return
        args = (key_cache.data, block_indices.data, deltas.data, lut.data, dev.error_word,
                _i32(num_blocks), _i32(block_size), _i32(n_kv_heads), _i32(head_dim),
                _i32(lut.shape[0]), _i32(int(deltas.shape[1] == block_size and block_size > 1)),
                _i32(int(layout == "interleaved")), _i64(_lead_stride("key_cache", key_cache)))
        launch = plan.kv_rotate_launch(n_rot, block_size, n_kv_heads, head_dim)
        self._run(target, "kv_rotate.cu", plan.kernel_name("kv_rotate_kernel",
                                                           _dtype(key_cache)), launch, args)
        key_cache.fingerprint = None

    def set_rows(self, dst, src, slots, stream=None) -> None:
        checks.check_rows("set_rows", dst, src, slots, "slots", ("dst", "src"))
        self._rows_op("set_rows", dst, src, slots, stream)

    def get_rows(self, src, rows, out, stream=None) -> None:
        checks.check_rows("get_rows", src, out, rows, "rows", ("src", "out"))
        self._rows_op("get_rows", out, src, rows, stream)

    def _rows_op(self, op: str, written, read, index, stream) -> None:
        self._need_int32(index=index)
        self._need_contiguous(index=index)
        dev = self._same_device(op, written=written, read=read, index=index)
        target = self._target(dev, stream)
        n_index = index.shape[0]
        row_len = int(np.prod(read.shape[1:]))
        if n_index == 0 or row_len == 0:
            return
        other_rows = (written if op == "set_rows" else read).shape[0]
        strides = (_i64(_lead_stride("dst", written)), _i64(_lead_stride("src", read)))
        args = (written.data, read.data, index.data, dev.error_word, _i32(n_index),
                _i32(other_rows), _i64(row_len), *strides)
        if op == "get_rows":  # same parameters, source first
            args = (read.data, written.data, *args[2:7], strides[1], strides[0])
        name = plan.kernel_name(f"{op}_kernel", _dtype(read), _dtype(written))
        self._run(target, "copies.cu", name, plan.rows_launch(n_index, row_len), args)
        written.fingerprint = None

    def cpy(self, src, out, perm: Sequence[int], step: int = 1, stream=None) -> None:
        perm = checks.check_cpy(src, out, perm, step)
        self._need_contiguous(out=out)
        dev = self._same_device("cpy", src=src, out=out)
        target = self._target(dev, stream)
        if out.size == 0:
            return
        strides = [s // src.data.itemsize for s in src.data.strides]
        launch = plan.grid_stride(out.size)
        if not plan.cpy_is_contiguous(src.shape, strides, perm, step):
            shape4, strides4 = plan.cpy_geometry(src.shape, strides, perm, step)
            args = (src.data, out.data, _i64(out.size), *(_i64(n) for n in shape4[1:]),
                    *(_i64(s) for s in strides4))
            kernel = "cpy_kernel_i32" if plan.cpy_fits_int32(shape4, strides4) else "cpy_kernel"
            self._run(target, "copies.cu", plan.kernel_name(kernel, _dtype(src), _dtype(out)),
                      launch, args)
        elif _dtype(src) == _dtype(out):  # the same bits in the same order: a memcpy
            self.launcher.maybe_delay(target)
            self.runtime.copy_bytes(out, src, target)
        else:
            self._run(target, "copies.cu",
                      plan.kernel_name("cpy_contiguous", _dtype(src), _dtype(out)), launch,
                      (src.data, out.data, _i64(out.size)))
        out.fingerprint = None

    # -- plumbing -------------------------------------------------------------------------------
    def _source(self, file_name: str) -> str:
        """The CUDA source of one kernels/*.cu file (the bug zoo compiles mutants instead)."""
        return plan.load_source(file_name)

    def _run(self, target: GpuStream, file_name: str, name: str, launch: plan.Launch,
             args: tuple, delay: bool = True) -> None:
        self.launcher.run(target, file_name, name, launch, args, delay)

    def _target(self, dev: CupyDevice, stream: GpuStream | None) -> GpuStream:
        target = dev.stream if stream is None else self._own_stream(stream)
        if target.device is not dev:
            raise DeviceMismatchError(f"stream of {target.device} cannot run an op on arrays "
                                      f"of {dev}")
        return target

    def _own_stream(self, stream: Any) -> GpuStream:
        return self.runtime._own_stream(stream)

    def _same_device(self, op: str, **arrays: Any) -> CupyDevice:
        return self.runtime.same_device(op, **arrays)

    @staticmethod
    def _need_int32(**arrays: Any) -> None:
        for name, arr in arrays.items():
            if arr is not None and np.dtype(arr.dtype) != np.int32:
                raise ValueError(f"{name} dtype {arr.dtype} must be int32")

    @staticmethod
    def _need_contiguous(**arrays: Any) -> None:
        for name, arr in arrays.items():
            if arr is not None and not arr.data.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous")




def _dtype(arr: GpuArray) -> str:
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[np.dtype(arr.dtype).name]


def _lead_stride(name: str, arr: GpuArray) -> int:
    return checks.lead_stride(name, arr.shape, arr.data.strides, arr.data.itemsize)


def _ptr(arr: GpuArray | None):
    return NULL if arr is None else arr.data


def _attn_shape(q, k, v, paged) -> dict:
    """Sizes the plan and the kernel need; for paged KV, max_kv bounds every sequence."""
    n_q, n_heads, d_k = q.shape
    shape = {"n_q": n_q, "H": n_heads, "Dk": d_k, "Dv": v.shape[-1], "Hkv": k.shape[-2]}
    if paged is None:
        shape.update(n_kv=k.shape[0], max_kv=k.shape[0], n_seqs=1, decode=n_q == 1,
                     max_blocks=0, block_size=1, num_blocks=0)
        return shape
    n_seqs, max_blocks = paged.block_table.shape
    num_blocks, block_size = k.shape[:2]
    shape.update(n_kv=0, max_kv=max_blocks * block_size, n_seqs=n_seqs, decode=n_q == n_seqs,
                 max_blocks=max_blocks, block_size=block_size, num_blocks=num_blocks)
    return shape
