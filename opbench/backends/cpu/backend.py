"""``CpuBackend``: the embedded default backend.

Every op validates its arguments on the calling thread (shapes, dtypes, which device owns
each array), then queues the kernel on the owning device's stream and returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from opbench.protocol import (
    AttnParams,
    Backend,
    Option,
    RopeParams,
    SizeThreshold,
    numpy_dtype,
)

from ..arg_checks import ArgChecks, same_owner
from . import jit, kernels
from .rope_cache import RopeCache
from .runtime import (
    Device,
    DeviceArray,
    DeviceMismatchError,
    Event,
    Gate,
    Stream,
    StreamDelay,
    device_array,
    plain,
)
from .scenario_ops import ScenarioOpsMixin

FLOAT_DTYPES = tuple(numpy_dtype(n) for n in ("f32", "f16", "bf16"))
#: the host-side argument checks; the NumPy kernels read int32 and int64 indices alike
CHECKS = ArgChecks(index_dtypes=("int32", "int64"))


class CpuBackend(ScenarioOpsMixin, Backend):
    """NumPy kernels on logical devices with worker-thread streams; options: ``OPTIONS``."""

    name = "cpu"
    OPTIONS = (
        Option("rope_cache", bool, True, "sin/cos table per device and RoPE parameters"),
        Option("jit", bool, True, "numba loops where NumPy needs several passes (if numba is"
               " installed)"),
        Option("delay", bool, False, "fault injection: a seeded random sleep before every"
               " queued item"),
        Option("delay_seed", int, 0, "seed of the delays"),
        Option("delay_max_ms", float, 2.0, "longest delay"),
    )
    THRESHOLDS = (
        SizeThreshold("ATTN", "nq", kernels.ATTN_Q_BLOCK,
                      "causal/window attention goes in query blocks"),
        SizeThreshold("ATTN", "nkv", kernels.ATTN_TILE, "a second online-softmax key tile"),
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

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = self.options
        self.rope_cache, self.jit, self.delay = opts["rope_cache"], opts["jit"], opts["delay"]
        self.delay_seed, self.delay_max_ms = opts["delay_seed"], opts["delay_max_ms"]
        if self.delay_max_ms < 0:
            raise ValueError(f"delay_max_ms={self.delay_max_ms} must be >= 0")
        self._devices: list[Device] = []
        self._streams: list[Stream] = []
        self._caches: list[RopeCache] = []
        self._gates: list[Gate] = []
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {
            "numpy": np.__version__,
            "rope_cache": self.rope_cache,
            "jit": self.jit and jit.installed(),
            "delay": self.delay,
            "devices": [d.name for d in self._devices],
        }

    # -- devices and memory -----------------------------------------------------------------
    def devices(self, n: int = 1) -> list[Device]:
        """n logical devices; existing ones (and their arrays) are kept, missing ones started."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} devices must be an int >= 1")
        with self._lock:
            while len(self._devices) < n:
                self._start_device(len(self._devices))
        return self._devices[:n]

    def _start_device(self, index: int) -> None:
        device = Device(index)
        delay = StreamDelay((self.delay_seed, index), self.delay_max_ms) if self.delay else None
        self._devices.append(device)
        self._streams.append(Stream(device, delay))
        self._caches.append(RopeCache())

    def device(self, device: Any = None) -> Device:
        """Resolve None (device 0), an index or a Device of this backend."""
        if device is None:
            device = 0
        index = device.index if isinstance(device, Device) else device
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"device={device!r} must be a Device or an index >= 0")
        if index == 0 and not self._devices:
            self.devices(1)  # ops before devices(n): the default device
        if index >= len(self._devices):
            raise ValueError(
                f"device={device!r} does not exist; devices(n) made {len(self._devices)}"
            )
        return self._devices[int(index)]

    def to_device(self, host: np.ndarray, device: Any = None) -> DeviceArray:
        if isinstance(host, DeviceArray):  # another device's array: wait for its queued work
            host = self.to_host(host)
        return device_array(np.asarray(host), self.device(device))

    def empty(self, shape: Sequence[int], dtype: Any, device: Any = None) -> DeviceArray:
        """An uninitialized-looking array: floats poisoned with NaN, ints with -1."""
        dt = np.dtype(dtype)
        fill = np.nan if dt.kind == "f" or dt in FLOAT_DTYPES else -1
        return device_array(np.full(tuple(shape), fill, dt), self.device(device))

    def to_host(self, arr: DeviceArray) -> np.ndarray:
        device = self._owner("arr", arr)
        self.synchronize(device)
        return np.array(plain(arr), copy=True)

    def synchronize(self, device: Any = None) -> None:
        streams = self._streams if device is None else [self.stream(device)]
        for stream in streams:
            stream.record().synchronize()
        for stream in streams:
            stream.raise_pending()

    def close(self) -> None:
        for gate in self._gates:
            gate.release()  # a held stream would never drain
        for stream in self._streams:
            stream.close()

    def __enter__(self) -> CpuBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def timer(self):
        """Device time of one call in nanoseconds, as CUDA events measure it: every stream is
        held while ``call`` queues its work between two timestamps taken on the workers, then
        released, so the kernels run back to back and host-side latency (validation, thread
        wake-ups) is not counted.  Meaningless with ``delay`` on (the sleeps are counted)."""

        def time_call(call) -> float:
            self.synchronize()
            streams = list(self._streams)
            gates = [stream.hold() for stream in streams]
            stamps: list[int] = []
            for stream in streams:
                stream.submit(lambda: stamps.append(time.perf_counter_ns()))
            call()
            for stream in streams:
                stream.submit(lambda: stamps.append(time.perf_counter_ns()))
            for gate in gates:
                gate.release()
            self.synchronize()
            return float(max(stamps) - min(stamps))

        return time_call

    # -- streams, events, async copies ------------------------------------------------------
    def stream(self, device: Any = None) -> Stream:
        return self._streams[self.device(device).index]

    def record_event(self, stream: Stream) -> Event:
        return self._own_stream(stream).record()

    def wait_event(self, stream: Stream, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"event must come from record_event, got {type(event).__name__}")
        self._own_stream(stream).wait(event)

    def hold(self, stream: Stream) -> Gate:
        """Block ``stream`` at this point until ``gate.release()``: deterministic slow work."""
        gate = self._own_stream(stream).hold()
        self._gates = [g for g in self._gates if not g.released] + [gate]  # close() frees these
        return gate

    def copy_async(self, src: DeviceArray, dst_device: Any, stream: Stream | None = None):
        """ggml's contract.  The copy runs on the source stream (after the work queued there),
        then the destination stream waits for it; with ``stream`` = the destination's stream the
        copy runs there, after waiting for the source, and the source waits for the copy
        before anyone may overwrite src."""
        src_device = self._owner("src", src)
        dst = self.empty(src.shape, src.dtype, dst_device)
        src_stream, dst_stream = self.stream(src_device), self.stream(dst.device)
        copy_stream = src_stream if stream is None else self._own_stream(stream)
        if copy_stream not in (src_stream, dst_stream):
            raise DeviceMismatchError(
                f"copy_async: stream of {copy_stream.device} is neither the source's "
                f"({src_device}) nor the destination's ({dst.device})"
            )
        source, target = plain(src), plain(dst)
        if copy_stream is src_stream:
            src_stream.submit(lambda: np.copyto(target, source))
            dst_stream.wait(src_stream.record())
        else:
            dst_stream.wait(src_stream.record())
            dst_stream.submit(lambda: np.copyto(target, source))
            src_stream.wait(dst_stream.record())
        return dst

    # -- ops ----------------------------------------------------------------------------------
    def rope(self, x, pos, out, p: RopeParams, freq_factors=None, stream=None) -> None:
        CHECKS.rope(x, pos, out, p, freq_factors)
        device = self._same_device("rope", x=x, pos=pos, out=out, freq_factors=freq_factors)
        cache = self._caches[device.index] if self.rope_cache else None
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
        if paged is None:
            work = lambda: kernels.attention(  # noqa: E731
                a["q"], a["k"], a["v"], a["out"], p, a["mask"], a["sinks"], a["lse"])
        else:
            work = lambda: kernels.paged_attention(  # noqa: E731
                a["q"], a["k"], a["v"], a["out"], p, a["block_table"], a["seq_lens"],
                a["q_start"], a["sinks"], a["lse"])
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
    def _submit(self, device: Device, stream: Stream | None, work) -> None:
        target = self.stream(device) if stream is None else self._own_stream(stream)
        if target.device != device:
            raise DeviceMismatchError(
                f"stream of {target.device} cannot run an op on arrays of {device}"
            )
        target.submit(work)

    def _own_stream(self, stream: Any) -> Stream:
        if not isinstance(stream, Stream) or stream not in self._streams:
            raise TypeError(f"stream={stream!r} is not a stream of this cpu backend")
        return stream

    def _owner(self, name: str, arr: Any) -> Device:
        device = getattr(arr, "device", None)
        if not isinstance(arr, DeviceArray) or device not in self._devices:
            raise TypeError(
                f"{name} must be an array made by this backend's to_device, got "
                f"{type(arr).__name__}"
            )
        return device

    def _same_device(self, op: str, **arrays: Any) -> Device:
        """The device owning every given array; DeviceMismatchError naming both otherwise."""
        return same_owner(op, self._owner, arrays, DeviceMismatchError)

