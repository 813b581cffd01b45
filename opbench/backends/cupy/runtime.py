"""The cupy backend's runtime: logical devices on GPUs, their streams, events and arrays
(``CupyRuntime``, an ``opbench.protocol.Runtime``).

Imports cupy only inside functions, so ``import opbench.backends.cupy`` works (and
``available()`` can explain itself) on a machine without cupy, a driver or a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from opbench.protocol import DeviceMismatchError as ProtocolMismatch
from opbench.protocol import Runtime

from ..common import device_ceilings
from ..common.event_timer import EventTimer
from . import plan


#: host dtype -> the dtype cupy stores it as (cupy has no bfloat16: keep its 16-bit pattern)
def storage_dtype(dtype: np.dtype) -> np.dtype:
    dt = np.dtype(dtype)
    return np.dtype(np.uint16) if dt.name == "bfloat16" else dt


FINGERPRINT_MAX_BYTES = 1 << 16  # content digests are kept for small inputs only


class DeviceMismatchError(ProtocolMismatch):
    """An array of one logical device was used by an op running on another."""


class DeviceError(RuntimeError):
    """A kernel reported bad indices (the device error word), raised by synchronize()."""


def driver_missing() -> str | None:
    """Why the CUDA driver library cannot be loaded, or None when it can."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver: libcuda.so.1 cannot be loaded ({exc})"
    return None


def status() -> tuple[bool, str]:
    """(True, "N GPU(s): names") or (False, the precise reason the backend cannot run)."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"cupy is not installed ({exc}); pip install 'opbench[cupy]'"
    missing = driver_missing()
    if missing:
        return False, missing
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # e.g. a driver older than the CUDA runtime cupy was built for
        return False, f"the CUDA driver is unusable: {exc}"
    if count == 0:
        return False, "no CUDA device: the driver sees no GPU"
    names = []
    for gpu in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(gpu)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        if props["major"] < 8:
            return False, (f"GPU {gpu} ({name}) is sm_{props['major']}{props['minor']}; the "
                           "kernels need sm_80 or newer (bf16 conversions)")
        names.append(name)
    return True, f"{count} GPU(s): {', '.join(names)}"


@dataclass(eq=False)
class GpuStream:
    """A logical device's non-blocking stream (the object the protocol hands around)."""

    device: CupyDevice
    cupy_stream: Any

    def __repr__(self) -> str:
        return f"GpuStream({self.device.name})"


@dataclass(eq=False)
class GpuEvent:
    cupy_event: Any
    stream: GpuStream


@dataclass(eq=False)
class CupyDevice:
    """Logical device ``index`` on GPU ``gpu``; owns one stream, an error word and caches."""

    index: int
    gpu: int
    num_sms: int
    shared_optin: int  # most dynamic shared memory one block may opt into
    l2_bytes: int
    stream: GpuStream | None = None
    error_word: Any = None  # cupy int32[1], OR-ed by kernels that meet bad indices
    rope_tables: OrderedDict = field(default_factory=OrderedDict)  # LRU, plan.rope_cache_key
    constants: dict = field(default_factory=dict)  # small read-only device arrays (slopes)
    workspaces: dict = field(default_factory=dict)
    staging: list = field(default_factory=list)  # pinned host buffers of queued uploads

    @property
    def name(self) -> str:
        return f"cupy:{self.index}(gpu{self.gpu})"

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class GpuArray:
    """A cupy array owned by one logical device, with its logical dtype (bf16 included).

    ``fingerprint`` is a digest of the contents when uploaded by to_device (small arrays only),
    cleared when an op writes the array; the RoPE cache keys freq_factors on it without a
    device-to-host copy (which would also be illegal inside a CUDA graph capture)."""

    data: Any
    dtype: np.dtype
    device: CupyDevice
    fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape) -> GpuArray:
        """A view with another shape, like ndarray.reshape (the scenario model uses it);
        refuses to copy, since ops write through views."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        view = self.data.reshape(tuple(shape))
        if view.size and view.data.ptr != self.data.data.ptr:
            raise ValueError(f"reshape of {self} to {tuple(shape)} would copy")
        return GpuArray(view, self.dtype, self.device)

    def __getitem__(self, index) -> GpuArray:
        """A view (basic slicing only), owned by the same device."""
        return GpuArray(self.data[index], self.dtype, self.device)

    def __repr__(self) -> str:
        return f"GpuArray({self.shape}, {self.dtype}, {self.device.name})"


from .graphs import GraphMixin  # noqa: E402 - graphs needs this module's types


class CupyRuntime(GraphMixin, Runtime):
    """The cupy backend's ``opbench.protocol.Runtime``: logical devices round-robin over the
    GPUs, one non-blocking stream each, arrays with their logical dtype, pinned uploads, events,
    peer or staged copies, CUDA graphs, CUDA-event timing and the L2 flush.  Every cupy call
    goes through ``cupy()`` (the module the backend hands it: real cupy, or the emulator's).
    Kernels it needs itself (hold, delays) come from the backend's ``launcher``."""

    name = "cupy"
    mismatch_error = DeviceMismatchError

    def __init__(self, cupy: Callable[[], Any]) -> None:
        self._cupy = cupy
        self.launcher: Any = None  # the backend's KernelLauncher, set by the backend
        self._devices: list[CupyDevice] = []
        self._flush_buffers: dict[int, Any] = {}
        self._ceilings: dict[int, dict] = {}  # per logical device, measured at first use
        self._gates: list = []  # hold() gates, released by close()
        self._capture = None

    def info(self) -> dict:
        return {"devices": [d.name for d in self._devices]}

    # -- devices and memory -------------------------------------------------------------------
    def devices(self, n: int = 1) -> list[CupyDevice]:
        """n logical devices, round-robin over the GPUs; existing ones are kept."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} devices must be an int >= 1")
        gpus = plan.device_map(n, self._cupy().cuda.runtime.getDeviceCount())
        while len(self._devices) < n:
            self._devices.append(self._start_device(len(self._devices), gpus[len(self._devices)]))
        return self._devices[:n]

    def device_list(self) -> list[CupyDevice]:
        return list(self._devices)

    def _start_device(self, index: int, gpu: int) -> CupyDevice:
        cupy = self._cupy()
        props = cupy.cuda.runtime.getDeviceProperties(gpu)
        device = CupyDevice(index, gpu, props["multiProcessorCount"],
                            props["sharedMemPerBlockOptin"], props["l2CacheSize"])
        with cupy.cuda.Device(gpu):
            device.stream = GpuStream(device, cupy.cuda.Stream(non_blocking=True))
            with device.stream.cupy_stream:
                device.error_word = cupy.zeros(1, dtype=np.int32)
            self._enable_peers(gpu)
        device.stream.cupy_stream.synchronize()
        return device

    def _enable_peers(self, gpu: int) -> None:
        """Direct peer copies from this GPU wherever the hardware allows (else staged)."""
        runtime = self._cupy().cuda.runtime
        for other in range(runtime.getDeviceCount()):
            if other != gpu and runtime.deviceCanAccessPeer(gpu, other):
                try:
                    runtime.deviceEnablePeerAccess(other)
                except runtime.CUDARuntimeError:
                    pass  # already enabled

    def device(self, device: Any = None) -> CupyDevice:
        if device is None:
            device = 0
        index = device.index if isinstance(device, CupyDevice) else device
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"device={device!r} must be a CupyDevice or an index >= 0")
        if not self._devices and index == 0:
            self.devices(1)
        if index >= len(self._devices):
            raise ValueError(f"device={device!r} does not exist; devices(n) made "
                             f"{len(self._devices)}")
        return self._devices[int(index)]

    def to_device(self, host: np.ndarray, device: Any = None) -> GpuArray:
        host = np.ascontiguousarray(host)
        dev = self.device(device)
        data = self._allocate(host.shape, storage_dtype(host.dtype), dev)
        self.upload(data, host, dev.stream)
        digest = plan.fingerprint(host.tobytes()) if host.nbytes <= FINGERPRINT_MAX_BYTES else None
        return GpuArray(data, host.dtype, dev, digest)

    def upload(self, data, host: np.ndarray, stream: GpuStream) -> None:
        """Queue host -> device on ``stream`` from a pinned copy of ``host``: the host is never
        blocked (not even behind a held stream) and may reuse its array at once.  The pinned
        buffer lives until the device's next synchronize()."""
        cupy = self._cupy()
        stored = np.ascontiguousarray(host).view(storage_dtype(host.dtype))
        pinned = cupy.cuda.alloc_pinned_memory(max(stored.nbytes, 1))
        staged = np.frombuffer(pinned, stored.dtype, stored.size).reshape(stored.shape)
        staged[...] = stored
        stream.device.staging.append(pinned)
        with cupy.cuda.Device(stream.device.gpu):
            data.set(staged, stream=stream.cupy_stream)

    def empty(self, shape: Sequence[int], dtype: Any, device: Any = None) -> GpuArray:
        """An array poisoned like the cpu backend's: floats NaN, ints -1 -- all bits set, by a
        memset on the device's stream (a NaN at every float width, -1 at every int width).
        No host upload, so a graph capture may make one (CuPy refuses a host-to-device copy
        on a capturing stream), and its replays poison it again."""
        dt = np.dtype(dtype)
        dev = self.device(device)
        data = self._allocate(tuple(shape), storage_dtype(dt), dev)
        self._memset(data, 0xFF, dev.stream)
        return GpuArray(data, dt, dev, None)

    def _allocate(self, shape, dtype, dev: CupyDevice):
        """Device memory from ``dev``'s pool, ordered on its stream (a capture's pool while
        that stream captures)."""
        cupy = self._cupy()
        with cupy.cuda.Device(dev.gpu), dev.stream.cupy_stream:
            return cupy.empty(shape, dtype)

    def synchronize(self, device: Any = None) -> None:
        devices = self._devices if device is None else [self.device(device)]
        for dev in devices:
            dev.stream.cupy_stream.synchronize()
            dev.staging.clear()  # every queued upload has completed
        for dev in devices:
            self._raise_device_errors(dev)

    def _raise_device_errors(self, dev: CupyDevice) -> None:
        word = int(dev.error_word.get(stream=dev.stream.cupy_stream)[0])
        if word:
            self._memset(dev.error_word, 0, dev.stream)
            dev.stream.cupy_stream.synchronize()
            raise DeviceError(f"{dev.name}: " + "; ".join(plan.decode_errors(word)))

    def stream(self, device: Any = None) -> GpuStream:
        return self.device(device).stream

    def record_event(self, stream: GpuStream) -> GpuEvent:
        stream = self._own_stream(stream)
        event = self._cupy().cuda.Event(disable_timing=True)
        event.record(stream.cupy_stream)
        return GpuEvent(event, stream)

    def wait_event(self, stream: GpuStream, event: GpuEvent) -> None:
        if not isinstance(event, GpuEvent):
            raise TypeError(f"event must come from record_event, got {type(event).__name__}")
        self._own_stream(stream).cupy_stream.wait_event(event.cupy_event)

    def copy_async(self, src: GpuArray, dst_device: Any, stream: GpuStream | None = None):
        """ggml's contract, by plan.copy_async_steps: runs on the source stream (or on
        ``stream`` = the destination's), ordered by events on both sides; never blocks."""
        cupy = self._cupy()
        src_dev, dst_dev = self.owner("src", src), self.device(dst_device)
        if not src.data.flags.c_contiguous:
            raise ValueError("copy_async: src must be contiguous")
        streams = {"src": src_dev.stream, "dst": dst_dev.stream}
        on = "src" if stream is None or self._own_stream(stream) is src_dev.stream else "dst"
        if stream is not None and self._own_stream(stream) not in streams.values():
            raise DeviceMismatchError(f"copy_async: {stream} is neither {src_dev}'s nor "
                                      f"{dst_dev}'s stream")
        with cupy.cuda.Device(dst_dev.gpu), dst_dev.stream.cupy_stream:
            dst = GpuArray(cupy.empty_like(src.data), src.dtype, dst_dev)
        events = {}
        for step in plan.copy_async_steps(src_dev.gpu, dst_dev.gpu, on):
            kind, side, what = step
            if kind == "record":
                events[what] = self.record_event(streams[side])
            elif kind == "wait":
                self.wait_event(streams[side], events[what])
            else:
                self._memcpy(dst, src, streams[side], peer=what == "peer")
        return dst

    def copy_bytes(self, dst: GpuArray, src: GpuArray, stream: GpuStream) -> None:
        """dst <- src's bytes, a device-to-device memcpy queued on ``stream`` (both arrays on
        its device, contiguous, of the same size)."""
        self._memcpy(dst, src, stream, peer=False)

    def _memcpy(self, dst: GpuArray, src: GpuArray, stream: GpuStream, peer: bool) -> None:
        runtime = self._cupy().cuda.runtime
        nbytes, s = src.data.nbytes, stream.cupy_stream.ptr
        if nbytes == 0:
            return
        with self._cupy().cuda.Device(stream.device.gpu):
            if peer:
                runtime.memcpyPeerAsync(dst.data.data.ptr, dst.device.gpu, src.data.data.ptr,
                                        src.device.gpu, nbytes, s)
            else:
                runtime.memcpyAsync(dst.data.data.ptr, src.data.data.ptr, nbytes,
                                    runtime.memcpyDeviceToDevice, s)

    def flush_l2(self, device: Any = None) -> None:
        """Overwrite a buffer of twice the L2 size on the device's stream (cold caches)."""
        dev = self.device(device)
        buf = self._flush_buffers.get(dev.index)
        if buf is None:
            buf = self._flush_buffers[dev.index] = self._allocate(
                plan.l2_flush_bytes(dev.l2_bytes), np.uint8, dev)
        self._memset(buf, dev.index + 1, dev.stream)

    def device_ceilings(self, device: Any = None) -> dict:
        """The GPU's copy ceiling (device-to-device copies on the device's stream, timed by
        CUDA events) and its L2 size, measured once (``common.device_ceilings``)."""
        dev = self.device(device)
        if dev.index not in self._ceilings:
            nbytes = device_ceilings.copy_bytes(dev.l2_bytes)
            arrays = [GpuArray(self._allocate(nbytes, np.uint8, dev), np.dtype(np.uint8), dev,
                               None) for _ in range(2)]
            time_call = self.timer(dev)
            self._ceilings[dev.index] = device_ceilings.gpu_ceilings(
                lambda: time_call(lambda: self.copy_bytes(arrays[1], arrays[0], dev.stream)),
                nbytes, dev.l2_bytes)
        return dict(self._ceilings[dev.index])

    def _memset(self, data, value: int, stream: GpuStream) -> None:
        """cudaMemsetAsync on the stream (cupy's fill may need its own JIT kernels)."""
        cupy = self._cupy()
        with cupy.cuda.Device(stream.device.gpu):
            cupy.cuda.runtime.memsetAsync(data.data.ptr, value, data.nbytes,
                                          stream.cupy_stream.ptr)

    def timer(self, device: Any = None) -> EventTimer:
        """Times one call with CUDA events on the device's stream (nanoseconds), the host's
        enqueue hidden behind the launcher's spin kernel (``common.event_timer``)."""
        dev = self.device(device)
        cupy = self._cupy()
        stream = dev.stream

        def record():
            event = cupy.cuda.Event()
            event.record(stream.cupy_stream)
            return event

        def wait(event) -> None:
            event.synchronize()
            self._raise_device_errors(dev)

        return EventTimer(spin=lambda ns: self.launcher.spin(stream, ns), record=record,
                          wait=wait,
                          elapsed_ns=lambda a, b: cupy.cuda.get_elapsed_time(a, b) * 1e6)

    def _own_stream(self, stream: Any) -> GpuStream:
        if not isinstance(stream, GpuStream) or stream.device not in self._devices:
            raise TypeError(f"stream={stream!r} is not a stream of this cupy backend")
        return stream

    def owner(self, name: str, arr: Any) -> CupyDevice:
        if not isinstance(arr, GpuArray) or arr.device not in self._devices:
            raise TypeError(f"{name} must be an array made by this backend's to_device, got "
                            f"{type(arr).__name__}")
        return arr.device


    def to_host(self, arr: GpuArray) -> np.ndarray:
        """A host copy of a contiguous array (the backend gathers strided views first)."""
        device = self.owner("arr", arr)
        self.synchronize(device)
        host = arr.data.get(stream=device.stream.cupy_stream)
        return np.ascontiguousarray(host).view(arr.dtype)

    def close(self) -> None:
        for gate in self._gates:
            gate.release()  # a held stream would never drain
        self._gates.clear()
        self.abandon_capture()  # a capturing stream cannot be synchronized
        for dev in self._devices:
            dev.stream.cupy_stream.synchronize()
            dev.rope_tables.clear()
            dev.workspaces.clear()
            dev.constants.clear()
        self._devices.clear()
        self._flush_buffers.clear()
