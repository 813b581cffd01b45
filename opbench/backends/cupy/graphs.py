"""CUDA graphs (graph reuse) and stream holds (fault injection) for the cupy backend.

Capture spans several streams the CUDA way: the first stream begins the capture, the others
join it by waiting on an event recorded there (fork) and hand their work back the same way
before it ends (join).  Everything cupy allocates while capturing comes from a memory pool
private to the graph (set as the thread's allocator), so buffers that the recorded work
writes (copy_async destinations, split-KV partials) are never handed to anyone else while
the graph can still be replayed.  Every kernel is loaded on the capture's devices before it
begins: CUDA does not permit loading one while a stream of its device captures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import plan
from .runtime import GpuStream


@dataclass(eq=False)
class CapturedGraph:
    """The recorded work of one capture: replay() launches it on its first stream."""

    graph: Any
    streams: list[GpuStream]
    pool: Any  # the private memory pool its buffers live in: kept as long as the graph


@dataclass(eq=False)
class _Capture:
    streams: list[GpuStream]
    pool: Any
    previous_allocator: Any


class HoldGate:
    """A stream held by hold_kernel until release(): it spins on a pinned, host-mapped flag."""

    def __init__(self, pinned: Any) -> None:
        self._pinned = pinned  # keeps the memory alive while the kernel may read it
        self._flag = np.frombuffer(pinned, np.int32, 1)
        self._flag[0] = 0

    @property
    def device_pointer(self) -> int:
        return self._pinned.ptr  # unified addressing: the host pointer is valid on the GPU

    def release(self) -> None:
        self._flag[0] = 1


class GraphMixin:
    """capture_begin / capture_end / replay and hold for CupyRuntime."""

    _capture: _Capture | None = None

    def _stream_list(self, streams) -> list[GpuStream]:
        streams = [streams] if isinstance(streams, GpuStream) else list(streams)
        if not streams:
            raise ValueError("streams must name at least one stream")
        return [self._own_stream(s) for s in streams]

    def capture_begin(self, streams) -> None:
        """Start recording (not running) the work queued on ``streams``."""
        if self._capture is not None:
            raise RuntimeError("capture_begin: a capture is already in progress")
        cupy, streams = self._cupy(), self._stream_list(streams)
        self.launcher.preload(list({id(s.device): s.device for s in streams}.values()))
        pool, previous = cupy.cuda.MemoryPool(), cupy.cuda.get_allocator()
        origin = streams[0]
        with cupy.cuda.Device(origin.device.gpu):
            origin.cupy_stream.begin_capture()
        cupy.cuda.set_allocator(pool.malloc)
        self._capture = _Capture(streams, pool, previous)
        for other in streams[1:]:  # fork: each stream joins the capture
            self.wait_event(other, self.record_event(origin))

    def capture_end(self, streams) -> CapturedGraph:
        cupy, capture = self._cupy(), self._capture
        if capture is None:
            raise RuntimeError("capture_end without capture_begin")
        if self._stream_list(streams) != capture.streams:
            raise ValueError("capture_end: streams differ from capture_begin's")
        origin = capture.streams[0]
        try:
            for other in capture.streams[1:]:  # join: the origin waits for every stream
                self.wait_event(origin, self.record_event(other))
        finally:
            try:  # an invalidated capture ends with an error: the state is restored anyway
                with cupy.cuda.Device(origin.device.gpu):
                    graph = origin.cupy_stream.end_capture()
            finally:
                cupy.cuda.set_allocator(capture.previous_allocator)
                self._capture = None
        return CapturedGraph(graph, capture.streams, capture.pool)

    def abandon_capture(self) -> None:
        """End a capture left open (an op inside it failed), discarding its graph, so the
        streams can be synchronized again; nothing when no capture is open."""
        if self._capture is not None:
            with contextlib.suppress(Exception):  # an invalidated capture ends with its own error
                self.capture_end(self._capture.streams)

    def replay(self, graph: CapturedGraph, stream=None) -> None:
        """Relaunch the recorded work, ordered after what each of its streams already holds
        (e.g. the write() of this step's positions) and before what they get next."""
        if not isinstance(graph, CapturedGraph):
            raise TypeError(f"graph must come from capture_end, got {type(graph).__name__}")
        origin = graph.streams[0]
        for other in graph.streams[1:]:
            self.wait_event(origin, self.record_event(other))
        with self._cupy().cuda.Device(origin.device.gpu):
            graph.graph.launch(stream=origin.cupy_stream)
        for other in graph.streams[1:]:
            self.wait_event(other, self.record_event(origin))

    def hold(self, stream: GpuStream) -> HoldGate:
        """Block ``stream`` at this point until ``gate.release()`` (COPY_ASYNC contracts)."""
        stream = self._own_stream(stream)
        gate = HoldGate(self._cupy().cuda.alloc_pinned_memory(4))
        self._gates.append(gate)
        kernel = self.launcher.kernel(stream.device, "runtime.cu", "hold_kernel")
        self.launcher.launch(stream, kernel, "hold_kernel", plan.Launch((1, 1, 1), (1, 1, 1)),
                     (np.uint64(gate.device_pointer),), delay=False, check=False)
        return gate
