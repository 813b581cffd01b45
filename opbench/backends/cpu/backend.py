"""``CpuBackend``: the embedded default backend.

Every op validates its arguments on the calling thread (shapes, dtypes, which device owns
each array), then queues the kernel on the owning device's stream and returns.  Devices,
memory, streams, events, copies, graphs and the timer are the runtime it holds (by default
``backends/runtimes/threads.py``: worker-thread streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from opbench.protocol import (
    AttnParams,
    Option,
    RopeParams,
    Runtime,
    RuntimeBackend,
    SizeThreshold,
)

from ..common.arg_checks import ArgChecks
from ..common.arrays import plain
from ..common.numpy_model import NumpyModelOps
from ..runtimes.threads import ThreadRuntime
from . import jit, kernels, parallel
from .rope_cache import RopeCache

#: the host-side argument checks; the NumPy kernels read int32 and int64 indices alike
CHECKS = ArgChecks(index_dtypes=("int32", "int64"))


class CpuBackend(NumpyModelOps, RuntimeBackend):
    """NumPy kernels on logical devices with worker-thread streams; options: ``OPTIONS``.

    ``runtime``: where arrays live and work runs (default: a ``ThreadRuntime`` made from the
    delay options); any runtime whose ``kernel_view`` is a host ndarray serves."""

    name = "cpu"
    OPTIONS = (
        Option("rope_cache", bool, True, "sin/cos table per device and RoPE parameters"),
        Option("jit", bool, True, "numba loops where NumPy needs several passes (if numba is"
               " installed)"),
    ) + ThreadRuntime.OPTIONS
    THRESHOLDS = (
        SizeThreshold("ATTN", "nq", kernels.ATTN_Q_BLOCK,
                      "causal/window attention goes in query blocks"),
        SizeThreshold("ATTN", "nkv", kernels.ATTN_TILE, "a second online-softmax key tile"),
        SizeThreshold("ATTN", "nkv", kernels.ATTN_JIT_KEY_CHUNK,
                      "the numba loop merges a second key chunk"),
        SizeThreshold("ROPE", "elems", kernels.ROPE_CHUNK_BYTES // 4,
                      "the NumPy rotation runs in several token chunks"),
        SizeThreshold("ROPE", "row", kernels.ROPE_CHUNK_BYTES // 4,
                      "one token per chunk (the chunk step bottoms out at 1)"),
        SizeThreshold("ROPE", "elems", kernels.JIT_CONVERT_ELEMS - 1,
                      "f16 inputs and outputs convert with the numba loops"),
        SizeThreshold("ROPE", "pos", RopeCache().max_rows - 1,
                      "positions past the cos/sin cache are computed directly"),
        SizeThreshold("CPY", "out_bytes", kernels.PARALLEL_COPY_BYTES - 1,
                      "the copy is split across threads"),
    )

    def __init__(self, runtime: Runtime | None = None, **options: Any) -> None:
        super().__init__(runtime, **options)
        opts = self.options
        self.rope_cache, self.jit, self.delay = opts["rope_cache"], opts["jit"], opts["delay"]
        self.delay_seed, self.delay_max_ms = opts["delay_seed"], opts["delay_max_ms"]
        if runtime is None:
            self.runtime = ThreadRuntime.from_options(opts)
        self._caches: list[RopeCache] = []

    def info(self) -> dict:
        jit_error = jit.load_error() if self.jit else None
        return {
            "numpy": np.__version__,
            "rope_cache": self.rope_cache,
            "jit": self.jit and jit.installed() and jit_error is None,
            **({"jit_error": jit_error} if jit_error else {}),
            "delay": self.delay,
            # its kernels split over the CPUs it may run on (perf's FOLLOWS_CPUS) unless told
            "threads": parallel.configured_threads() or "cpus",
            **self.runtime.info(),
        }

    def warm_up(self) -> None:
        if self.jit:
            jit.available()  # imports numba and loads (or compiles) the kernels

    def devices(self, n: int = 1) -> list[Any]:
        """n logical devices; existing ones (and their arrays) are kept, missing ones started."""
        devices = self.runtime.devices(n)
        while len(self._caches) < len(self.runtime.device_list()):
            self._start_device(len(self._caches))
        return devices

    def _start_device(self, index: int) -> None:
        """Per-device state of the backend itself: the RoPE cache."""
        self._caches.append(RopeCache())

    def _cache(self, device: Any) -> RopeCache:
        index = self.runtime.device_list().index(device)
        while len(self._caches) <= index:  # a device made by the runtime on first use
            self._start_device(len(self._caches))
        return self._caches[index]

    def to_host(self, arr: Any) -> np.ndarray:
        # waits through self.synchronize, so a subclass's synchronize governs every read; the
        # copy is the runtime's (the rank runtime's is a broadcast from the owning rank)
        self.synchronize(self.runtime.owner("arr", arr))
        return self.runtime.to_host(arr)

    # -- ops ----------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        CHECKS.rope(x, pos, out, p, freq_factors)
        device = self._same_device("rope", x=x, pos=pos, out=out, freq_factors=freq_factors)
        cache = self._cache(device) if self.rope_cache else None
        ff = None if freq_factors is None else plain(freq_factors)
        args = (plain(x), plain(pos), plain(out))
        use_jit = self.jit
        self._submit(device, stream, lambda: kernels.rope(*args, p, ff, cache, use_jit))

    def attention(self, q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None,
                  paged=None, stream=None) -> None:
        CHECKS.attention(q, k, v, out, p, mask, sinks, lse, paged)
        arrays = dict(q=q, k=k, v=v, out=out, mask=mask, sinks=sinks, lse=lse)
        if paged is not None:
            arrays.update(block_table=paged.block_table, seq_lens=paged.seq_lens,
                          q_start=paged.q_start)
        device = self._same_device("attention", **arrays)
        a = {name: None if arr is None else plain(arr) for name, arr in arrays.items()}
        use_jit = self.jit
        if paged is None:
            work = lambda: kernels.attention(  # noqa: E731
                a["q"], a["k"], a["v"], a["out"], p, a["mask"], a["sinks"], a["lse"], use_jit)
        else:
            work = lambda: kernels.paged_attention(  # noqa: E731
                a["q"], a["k"], a["v"], a["out"], p, a["block_table"], a["seq_lens"],
                a["q_start"], a["sinks"], a["lse"], use_jit)
        self._submit(device, stream, work)

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout: str, stream=None) -> None:
        CHECKS.kv_rotate(key_cache, block_indices, deltas, lut, layout)
        device = self._same_device("kv_rotate", key_cache=key_cache,
                                   block_indices=block_indices, deltas=deltas, lut=lut)
        args = tuple(plain(a) for a in (key_cache, block_indices, deltas, lut))
        self._submit(device, stream, lambda: kernels.kv_rotate(*args, layout))

    def set_rows(self, dst, src, slots, stream=None) -> None:
        CHECKS.rows("set_rows", dst, src, slots, "slots", ("dst", "src"))
        device = self._same_device("set_rows", dst=dst, src=src, slots=slots)
        args = (plain(dst), plain(src), plain(slots))
        self._submit(device, stream, lambda: kernels.set_rows(*args))

    def get_rows(self, src, rows, out, stream=None) -> None:
        CHECKS.rows("get_rows", src, out, rows, "rows", ("src", "out"))
        device = self._same_device("get_rows", src=src, rows=rows, out=out)
        args = (plain(src), plain(rows), plain(out))
        self._submit(device, stream, lambda: kernels.get_rows(*args))

    def cpy(self, src, out, perm: Sequence[int], step: int = 1, stream=None) -> None:
        perm = CHECKS.cpy(src, out, perm, step)
        device = self._same_device("cpy", src=src, out=out)
        args = (plain(src), plain(out))
        use_jit = self.jit
        self._submit(device, stream, lambda: kernels.cpy(*args, perm, step, use_jit))

    # -- plumbing -------------------------------------------------------------------------------
    def _submit(self, device: Any, stream: Any, work) -> None:
        """Every op's work goes through here (the bug zoo patches kernels around it)."""
        self.runtime.submit(device, stream, work)

    def _same_device(self, op: str, **arrays: Any) -> Any:
        """The device owning every given array; DeviceMismatchError naming both otherwise."""
        return self.runtime.same_device(op, **arrays)
