"""The slice of cupy's API the cupy backend uses, implemented on the CPU.

With it, ``CupyBackend`` runs unchanged (the same launches, streams, events, copies, graphs
and error word) with its kernels compiled for the host (``build``) instead of by NVRTC.
What it models, and how faithfully:

- Arrays: numpy memory behind ``.data.ptr``; ``empty`` fills NaN bytes (uninitialised, as on a
  GPU).  Every allocation is registered, so a kernel pointer argument or a raw memcpy / memset
  that points outside every live allocation is an error, not a silent scribble.
- Streams: each is a FIFO with its own worker thread, so streams really run concurrently with
  the host and with each other; events order them.  Work on a stream after an error is skipped
  until ``synchronize`` reports the error (CUDA's sticky error, cleared once reported).
- Kernels: arguments are packed by their numpy types and checked against the kernel's
  parameter sizes (a width mismatch is a launch error here, garbage on a GPU); launch limits and
  the dynamic shared memory opt-in are checked as the driver does.
- Graph capture: work issued to a capturing stream is recorded, not run; other streams join
  through events recorded inside the capture, must be joined back before ``end_capture`` and
  may not wait on events from outside it, and synchronizing a capturing stream is refused,
  as is loading a kernel on a device while one of its streams captures (a module's functions
  load on first use) and, as CuPy does, a host-to-device ``set`` on a capturing stream.
  ``Graph.launch`` replays the recorded work in issue order (a valid order of the graph).
- Devices: ``DEVICE_COUNT`` emulated GPUs with peer access, sm_90 properties, a small L2.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import hashlib
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from . import build

__version__ = "emulated (opbench CPU emulator)"
DEVICE_COUNT = 2
DEVICE_PROPERTIES = {"name": b"opbench CPU emulator (sm_90)", "major": 9, "minor": 0,
                     "multiProcessorCount": 8, "sharedMemPerBlockOptin": 232448,
                     "l2CacheSize": 1 << 20}
# The driver's limits, written out here rather than imported from plan.py on purpose: the
# emulator plays the driver that checks the launches plan.py computes.
DEFAULT_SHARED_LIMIT = 48 * 1024


class CUDARuntimeError(RuntimeError):
    pass


class CUDADriverError(RuntimeError):
    pass


# -- allocations ----------------------------------------------------------------------------------
class _Allocations:
    """Live buffers by address, so raw pointers can be checked and kept alive while queued.

    A buffer's death is only noted by its weakref callback (which the garbage collector may run
    inside any allocation, this class's lock held or not) and purged under the lock later."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._buffers: dict[int, tuple[int, weakref.ref]] = {}
        self._dead: collections.deque = collections.deque()

    def add(self, buffer: Any, start: int, nbytes: int) -> None:
        ref = weakref.ref(buffer, lambda _, start=start: self._dead.append(start))
        with self._lock:
            self._purge()
            if start not in self._buffers:
                bisect.insort(self._starts, start)
            self._buffers[start] = (start + max(nbytes, 1), ref)

    def _purge(self) -> None:
        while self._dead:
            start = self._dead.popleft()
            entry = self._buffers.get(start)
            if entry is not None and entry[1]() is None:  # not reused by a newer buffer
                del self._buffers[start]
                self._starts.pop(bisect.bisect_left(self._starts, start))

    def owner(self, ptr: int, nbytes: int = 1) -> Any:
        """The live buffer holding [ptr, ptr + nbytes), or None."""
        with self._lock:
            self._purge()
            i = bisect.bisect_right(self._starts, ptr) - 1
            if i < 0:
                return None
            end, ref = self._buffers[self._starts[i]]
        buffer = ref()
        return buffer if buffer is not None and ptr + max(nbytes, 1) <= end else None


ALLOCATIONS = _Allocations()


@dataclass(frozen=True)
class MemoryPointer:
    ptr: int


class ndarray(np.ndarray):  # noqa: N801 - cupy's name
    """A numpy array standing in for device memory: ``.data.ptr``, ``get`` and ``set``."""

    @property
    def data(self) -> MemoryPointer:  # type: ignore[override]
        return MemoryPointer(self.__array_interface__["data"][0])

    def get(self, stream: Stream | None = None) -> np.ndarray:
        stream = stream or current_stream()
        stream.synchronize()  # a synchronous copy waits for the stream's earlier work
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, host: np.ndarray, stream: Stream | None = None) -> None:
        """Queue host -> device; the host buffer is read when the copy runs (as from pinned
        memory on a GPU), not when it is queued."""
        stream = stream or current_stream()
        if stream.capture is not None:  # CuPy's own refusal, in its words
            raise RuntimeError("the current stream is capturing, so H2D transfers are "
                               "disallowed")
        device = self.view(np.ndarray)
        stream.enqueue("memcpy host->device", lambda: np.copyto(device, host))


def empty(shape, dtype=np.float32) -> ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.full(max(nbytes, 1), 0xFF, np.uint8)  # NaN bytes: never zero by accident
    ALLOCATIONS.add(raw, raw.__array_interface__["data"][0], nbytes)
    return raw[:nbytes].view(dtype).reshape(shape).view(ndarray)


def zeros(shape, dtype=np.float32) -> ndarray:
    arr = empty(shape, dtype)
    arr.view(np.ndarray)[...] = 0
    return arr


def empty_like(arr: np.ndarray) -> ndarray:
    return empty(arr.shape, arr.dtype)


class PinnedMemory(bytearray):
    """Page-locked host memory: a buffer with ``.ptr`` (device code may read it directly)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self._export = (ctypes.c_char * nbytes).from_buffer(self)  # pins the buffer's address
        self.ptr = ctypes.addressof(self._export)
        ALLOCATIONS.add(self._export, self.ptr, nbytes)


def alloc_pinned_memory(nbytes: int) -> PinnedMemory:
    return PinnedMemory(nbytes)


# -- devices, streams, events ---------------------------------------------------------------------
_local = threading.local()


def _stack(name: str) -> list:
    if not hasattr(_local, name):
        setattr(_local, name, [])
    return getattr(_local, name)


class Device:
    def __init__(self, device_id: int = 0) -> None:
        if not 0 <= device_id < DEVICE_COUNT:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: device {device_id} of "
                                   f"{DEVICE_COUNT}")
        self.id = device_id

    def __enter__(self) -> Device:
        _stack("devices").append(self.id)
        return self

    def __exit__(self, *exc) -> None:
        _stack("devices").pop()


def current_device() -> int:
    devices = _stack("devices")
    return devices[-1] if devices else 0


_STREAMS: dict[int, Any] = {}
_DEFAULT_STREAMS: dict[int, Stream] = {}
_stream_ids = itertools.count(1)


@dataclass(eq=False)
class _Capture:
    origin: Stream
    graph: Graph
    members: set = field(default_factory=set)
    joined: dict = field(default_factory=dict)  # stream -> its issue count when joined back


class _Worker:
    """A stream's queue and the thread draining it.  The thread holds only this object, so a
    dropped Stream is collected and its thread told to stop."""

    def __init__(self, name: str) -> None:
        self.cond = threading.Condition()
        self.queue: collections.deque = collections.deque()
        self.issued = self.done = 0
        self.error: str | None = None
        threading.Thread(target=self.run, name=name, daemon=True).start()

    def put(self, what: str, fn: Callable[[], None] | None) -> None:
        with self.cond:
            self.queue.append((what, fn))
            self.issued += 1
            self.cond.notify_all()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                what, fn = self.queue.popleft()
                skip = self.error is not None and what != "event"  # waiters must not hang
            if fn is None:
                return
            try:
                if not skip:
                    fn()
            except Exception as exc:  # the sticky error, reported by synchronize()
                with self.cond:
                    self.error = self.error or f"{what}: {exc}"
            with self.cond:
                self.done += 1
                self.cond.notify_all()

    def drain(self) -> str | None:
        """Wait for everything queued so far; the pending error, cleared once reported."""
        with self.cond:
            target = self.issued
            while self.done < target:
                self.cond.wait()
            error, self.error = self.error, None
        return error


class Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.device_id = current_device()
        self.ptr = next(_stream_ids)
        _STREAMS[self.ptr] = weakref.ref(self)
        self.capture: _Capture | None = None
        self.captured_ops = 0
        self._worker = _Worker(f"emulated-stream-{self.ptr}")
        weakref.finalize(self, self._worker.put, "stop", None)
        weakref.finalize(self, _STREAMS.pop, self.ptr, None)

    def __enter__(self) -> Stream:
        _stack("streams").append(self)
        return self

    def __exit__(self, *exc) -> None:
        _stack("streams").pop()

    def __repr__(self) -> str:
        return f"<emulated Stream {self.ptr} on device {self.device_id}>"

    # work
    def enqueue(self, what: str, fn: Callable[[], None]) -> None:
        if self.capture is not None:
            self.captured_ops += 1
            self.capture.graph.nodes.append((what, fn))
            return
        self._worker.put(what, fn)

    def synchronize(self) -> None:
        if self.capture is not None:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: synchronize() on a "
                                   "stream that is capturing a graph")
        error = self._worker.drain()
        if error:
            raise CUDARuntimeError(f"cudaErrorLaunchFailure: {error}")

    def is_capturing(self) -> bool:
        return self.capture is not None

    def wait_event(self, event: Event) -> None:
        if event.captured_in is not None:
            capture, source, count = event.captured_in
            if self.capture is None:  # joins the capture (the fork)
                self.capture, self.captured_ops = capture, 0
                capture.members.add(self)
            elif self.capture is not capture:
                raise CUDARuntimeError("cudaErrorStreamCaptureIsolation: the event belongs to "
                                       "another capture")
            if self is capture.origin and source is not self:
                capture.joined[source] = count
            return
        if self.capture is not None:
            raise CUDARuntimeError("cudaErrorStreamCaptureIsolation: a capturing stream waits "
                                   "on an event recorded outside the capture")
        flag = event.flag
        if flag is not None:
            self.enqueue("wait_event", flag.wait)

    # graphs
    def begin_capture(self) -> None:
        if self.capture is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        self.capture = _Capture(self, Graph())
        self.capture.members.add(self)
        self.captured_ops = 0

    def end_capture(self) -> Graph:
        capture = self.capture
        if capture is None or capture.origin is not self:
            raise CUDARuntimeError("cudaErrorIllegalState: end_capture on a stream that did "
                                   "not begin the capture")
        unjoined = [s for s in capture.members
                    if s is not self and capture.joined.get(s) != s.captured_ops]
        for member in capture.members:
            member.capture = None
        if unjoined:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureUnjoined: {unjoined} did work in "
                                   "the capture that the origin stream never waited for")
        return capture.graph


def any_stream_capturing(device: int) -> bool:
    streams = (ref() for ref in list(_STREAMS.values()))
    return any(s is not None and s.device_id == device and s.capture is not None for s in streams)


def current_stream() -> Stream:
    streams = _stack("streams")
    if streams:
        return streams[-1]
    device = current_device()
    if device not in _DEFAULT_STREAMS:
        _DEFAULT_STREAMS[device] = Stream()
    return _DEFAULT_STREAMS[device]


def _stream_from_ptr(ptr: int) -> Stream:
    if ptr == 0:
        return current_stream()
    ref = _STREAMS.get(ptr)
    stream = ref() if ref is not None else None
    if stream is None:
        raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: no stream {ptr}")
    return stream


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self.flag: threading.Event | None = None
        self.captured_in: tuple | None = None
        self.time_ns: int | None = None

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or current_stream()
        if stream.capture is not None:
            self.flag, self.captured_in = None, (stream.capture, stream, stream.captured_ops)
            return
        flag = self.flag = threading.Event()
        self.captured_in = None

        def fire() -> None:
            self.time_ns = time.perf_counter_ns()
            flag.set()

        stream.enqueue("event", fire)

    def synchronize(self) -> None:
        if self.captured_in is not None:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: synchronize() on an "
                                   "event recorded in a capture")
        if self.flag is not None:
            self.flag.wait()

    def query(self) -> bool:
        return self.flag is None or self.flag.is_set()


def get_elapsed_time(start: Event, end: Event) -> float:
    """Milliseconds between two completed events."""
    if start.time_ns is None or end.time_ns is None:
        raise CUDARuntimeError("cudaErrorNotReady: an event has not completed")
    return (end.time_ns - start.time_ns) / 1e6


@dataclass(eq=False)
class Graph:
    nodes: list = field(default_factory=list)

    def launch(self, stream: Stream | None = None) -> None:
        nodes = list(self.nodes)

        def run() -> None:
            for what, fn in nodes:
                try:
                    fn()
                except Exception as exc:
                    raise RuntimeError(f"graph node {what}: {exc}") from exc

        (stream or current_stream()).enqueue("graph launch", run)


class MemoryPool:
    """Allocation is numpy's; the pool only stands for the graph's private pool, whose
    buffers the recorded work keeps alive."""

    def malloc(self, nbytes: int) -> Any:
        raise NotImplementedError("the emulator allocates through empty()")


_allocator: list = [None]


def get_allocator() -> Any:
    return _allocator[0]


def set_allocator(allocator: Any) -> None:
    _allocator[0] = allocator


# -- runtime API ----------------------------------------------------------------------------------
def _raw_target(ptr: int, nbytes: int, what: str) -> Any:
    owner = ALLOCATIONS.owner(ptr, nbytes)
    if owner is None:
        raise CUDARuntimeError(f"cudaErrorInvalidValue: {what} of {nbytes} bytes at {ptr:#x} "
                               "is outside every live allocation")
    return owner


def _memcpy(dst: int, src: int, nbytes: int, stream_ptr: int) -> None:
    keep = (_raw_target(dst, nbytes, "memcpy destination"),
            _raw_target(src, nbytes, "memcpy source"))
    _stream_from_ptr(stream_ptr).enqueue(
        "memcpy", lambda: (ctypes.memmove(dst, src, nbytes), keep))


def _memset(ptr: int, value: int, nbytes: int, stream_ptr: int) -> None:
    keep = _raw_target(ptr, nbytes, "memset")
    _stream_from_ptr(stream_ptr).enqueue("memset",
                                         lambda: (ctypes.memset(ptr, value, nbytes), keep))


_peers: set = set()


def _enable_peer(other: int) -> None:
    pair = (current_device(), other)
    if pair in _peers:
        raise CUDARuntimeError("cudaErrorPeerAccessAlreadyEnabled")
    _peers.add(pair)


runtime = SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError,
    memcpyDeviceToDevice=3,
    getDeviceCount=lambda: DEVICE_COUNT,
    getDeviceProperties=lambda device: dict(DEVICE_PROPERTIES),
    runtimeGetVersion=lambda: 12080,
    deviceCanAccessPeer=lambda a, b: int(a != b),
    deviceEnablePeerAccess=_enable_peer,
    memcpyAsync=lambda dst, src, nbytes, kind, stream: _memcpy(dst, src, nbytes, stream),
    memcpyPeerAsync=lambda dst, dst_dev, src, src_dev, nbytes, stream: _memcpy(
        dst, src, nbytes, stream),
    memsetAsync=_memset,
)
driver = SimpleNamespace(CUDADriverError=CUDADriverError)


# -- kernels --------------------------------------------------------------------------------------
_modules: dict[str, dict[str, build.HostKernel]] = {}
_modules_lock = threading.Lock()


class RawModule:
    def __init__(self, code: str, options: tuple = (), name_expressions: tuple = ()) -> None:
        names = list(name_expressions)
        key = hashlib.sha256("\0".join([code, *names]).encode()).hexdigest()
        with _modules_lock:
            if key not in _modules:
                label = f"module-{key[:8]}"
                _modules[key] = build.load_kernels(code, names, label)
        self._kernels = _modules[key]
        self._loaded: set[str] = set()  # functions this module has loaded (per instance)

    def get_function(self, name: str) -> Function:
        if name not in self._kernels:
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: {name} is not a name expression of "
                                  "this module")
        if name not in self._loaded and any_stream_capturing(current_device()):
            # A real module (and, with CUDA's lazy loading, each of its functions) is loaded
            # on first use; loading is not permitted while a stream captures a graph.
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: operation not "
                                   f"permitted when stream is capturing (first load of {name})")
        self._loaded.add(name)
        return Function(self._kernels[name])


def _dims(value) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class Function:
    def __init__(self, kernel: build.HostKernel) -> None:
        self.kernel = kernel
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args: tuple, shared_mem: int = 0,
                 stream: Stream | None = None) -> None:
        grid, block = _dims(grid), _dims(block)
        self._check_launch(grid, block, shared_mem)
        buffers, keep = self._pack(args)
        pointers = (ctypes.c_void_p * max(len(buffers), 1))(
            *(ctypes.addressof(b) for b in buffers))
        kernel = self.kernel

        def run(held=(buffers, keep)) -> None:  # arguments live until the kernel has run
            error = kernel.launch(grid, block, shared_mem, pointers)
            if error:
                raise RuntimeError(f"{kernel.name} grid {grid} block {block}: {error}")

        (stream or current_stream()).enqueue(f"kernel {kernel.name}", run)

    def _check_launch(self, grid, block, shared_mem: int) -> None:
        name = self.kernel.name
        if min(grid) < 1 or min(block) < 1 or np.prod(block) > 1024 or grid[0] >= 2**31 \
                or max(grid[1:]) > 65535 or max(block[:2]) > 1024 or block[2] > 64:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {name} grid {grid} block {block}")
        limit = max(DEFAULT_SHARED_LIMIT, self.max_dynamic_shared_size_bytes)
        if shared_mem > limit or shared_mem > DEVICE_PROPERTIES["sharedMemPerBlockOptin"]:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {name} asks {shared_mem} bytes of "
                                  f"dynamic shared memory; the limit set is {limit}")

    def _pack(self, args: tuple) -> tuple[list, list]:
        sizes, name = self.kernel.param_sizes, self.kernel.name
        if len(args) != len(sizes):
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {name} takes {len(sizes)} "
                                  f"arguments, got {len(args)}")
        buffers, keep = [], []
        for i, (arg, size) in enumerate(zip(args, sizes)):
            if isinstance(arg, np.ndarray):
                ptr = arg.__array_interface__["data"][0]
                owner = ALLOCATIONS.owner(ptr, arg.nbytes)
                if owner is None:
                    raise CUDADriverError(f"{name} argument {i}: array is not device memory "
                                          "of this emulator")
                keep.append(owner)
                raw = np.uint64(ptr).tobytes()
            elif isinstance(arg, np.generic):
                raw = arg.tobytes()
                if arg.dtype == np.uint64 and int(arg) and size == 8:
                    owner = ALLOCATIONS.owner(int(arg))
                    if owner is not None:
                        keep.append(owner)
            else:
                raise CUDADriverError(f"{name} argument {i}: pass a numpy scalar or array, "
                                      f"not {type(arg).__name__} (its width would be a guess)")
            if len(raw) != size:
                raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {name} argument {i} is "
                                      f"{len(raw)} bytes but the kernel's parameter is {size}")
            buffers.append((ctypes.c_char * len(raw)).from_buffer_copy(raw))
        return buffers, keep


cuda = SimpleNamespace(
    Device=Device, Stream=Stream, Event=Event, get_elapsed_time=get_elapsed_time,
    alloc_pinned_memory=alloc_pinned_memory, MemoryPool=MemoryPool, get_allocator=get_allocator,
    set_allocator=set_allocator, runtime=runtime, driver=driver,
)
