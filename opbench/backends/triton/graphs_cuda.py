"""Graph reuse in the Triton backend's ``cuda`` mode: CUDA graphs through ``torch.cuda``.

**Status: CI exercises it through fakes on the CPU; its GPU test passed on an H200
(docs/gpu.md).**

The protocol's ``capture_begin(streams)`` / ``capture_end(streams)`` / ``replay(graph)`` on
torch CUDA streams, with the cupy backend's semantics (``opbench/backends/cupy/graphs.py``):
the first stream is the origin, the others join the capture by waiting on an event recorded
there (fork) and hand their work back the same way before it ends (join); temporaries that the
recorded work allocates come from a memory pool private to the graph
(``torch.cuda.graph_pool_handle()``), and every tensor the recorded work touches is referenced
by the graph, so no buffer it writes is handed to anyone else while it can be replayed;
``replay`` is ordered after what each of the graph's streams already holds.

One difference from cupy: the capture is *deferred*.  Between ``capture_begin`` and
``capture_end`` ops are validated and recorded as closures (as the cpu backend records them);
``capture_end`` then

1. warms every recorded launch up, outside any capture: Triton kernels are compiled and their
   modules loaded without running (``triton_compile_only``; a first launch inside a capture
   would call ``cuModuleLoadData``, which CUDA forbids while a stream captures), and torch
   work runs once into scratch outputs (library handles, workspaces);
2. synchronizes the device, collects garbage and pauses the cyclic collector (a Triton kernel
   object finalized during the capture would unload its module);
3. begins the CUDA capture on the origin stream with a fresh private pool, forks the other
   streams, re-issues the recorded closures in order on their streams, joins, and ends it.

So nothing a caller does between capture_begin and capture_end can break a CUDA capture
half-way, a kernel first seen inside a capture works, and a failure leaves no capture open.

What cannot be recorded is refused while a capture is open, with an error saying so: host
data written into an existing array (``write``: a replay would not write it again), reads to
the host (``to_host``, ``synchronize``), timing and the L2 flush, ops on a stream that is not
being captured, and events that cross the capture's boundary.  New arrays (``to_device``,
``empty``) are made at once: nothing is being captured yet, and the recorded ops that use them
keep them alive with the graph.  Decisions that would need a device value on the host are
avoided: the decode/flash choice of paged attention reads shapes only.  There is no sin/cos
cache in this backend (angles are computed in-kernel), so no cache can be filled, or keyed,
inside a capture.

Every ``torch.cuda`` call goes through one small object (``TorchCuda``) so that a fake can
stand in for it: ``tests/backends/test_triton_cuda_graphs.py`` drives ``GraphCapture`` and
the whole cuda-mode runtime on the CPU through a fake that enforces CUDA's capture rules.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CAPTURE_ERROR_MODE = "global"  # torch.cuda.graph's default: any unsafe CUDA call fails loudly


# -- the seam: every torch.cuda call of the cuda-mode runtime -------------------------------------
class TorchCuda:
    """``torch.cuda``, as the cuda-mode runtime and the graph capture use it.  Thin on purpose:
    one call each, no logic, so that a fake with the same methods tests everything else."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    # devices, streams, events
    def device_count(self) -> int:
        return self.torch.cuda.device_count()

    def torch_device(self, gpu: int):
        return self.torch.device("cuda", gpu)

    def new_stream(self, torch_device):
        return self.torch.cuda.Stream(device=torch_device)

    def current_stream(self, torch_device):
        return self.torch.cuda.current_stream(torch_device)

    def device_of(self, stream):
        return stream.device

    @contextlib.contextmanager
    def on(self, stream) -> Iterator[None]:
        """Make ``stream`` (and its GPU) current: Triton and torch launch on the current stream."""
        with self.torch.cuda.device(stream.device), self.torch.cuda.stream(stream):
            yield

    def upload(self, host, stream):
        """A copy of the CPU tensor ``host`` on ``stream``'s GPU, allocated and copied on
        ``stream``.  The caching allocator hands a freed block out again at once to later work
        on the stream it was allocated on: memory made on the default stream and used by kernels
        on ``stream`` could be handed to a new array (and overwritten by its upload) while those
        kernels still read it.  Pinned and non-blocking: the host does not wait for the stream,
        and torch keeps the pinned copy alive until the copy has run."""
        with self.on(stream):
            return host.pin_memory().to(stream.device, non_blocking=True)

    def new_event(self):
        return self.torch.cuda.Event()

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def record_stream(self, tensor, stream) -> None:
        tensor.record_stream(stream)

    def stream_synchronize(self, stream) -> None:
        stream.synchronize()

    def synchronize(self, torch_device=None) -> None:
        self.torch.cuda.synchronize(torch_device)

    # work
    def issue(self, stream, fn: Callable[[], None], name: str) -> None:
        """Run ``fn`` with ``stream`` current: what it launches goes on that stream (recorded
        into the graph when the stream is capturing)."""
        with self.on(stream):
            fn()

    def warm_up(self, stream, fn: Callable[[], None], name: str) -> None:
        """Run a launch's warm-up (compile and load, no kernel runs) before a capture."""
        with self.on(stream):
            fn()

    def torch_work(self, name: str, fn: Callable[[], None]) -> None:
        """Torch (not Triton) work of one op: its kernels are torch's own."""
        fn()

    def compile_only(self):
        return triton_compile_only()

    # graphs
    def pool_handle(self):
        return self.torch.cuda.graph_pool_handle()

    def new_graph(self):
        return self.torch.cuda.CUDAGraph()

    def capture_begin(self, graph, stream, pool) -> None:
        with self.on(stream):  # torch captures the current stream
            graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_ERROR_MODE)

    def capture_end(self, graph, stream) -> None:
        with self.on(stream):  # and must end on the stream it began on
            graph.capture_end()

    def replay(self, graph, stream) -> None:
        with self.on(stream):  # cudaGraphLaunch on the current stream
            graph.replay()


# -- compile and load Triton kernels without running them -----------------------------------------
_COMPILE_ONLY_LOCK = threading.Lock()


@contextlib.contextmanager
def triton_compile_only(on_kernel: Callable[[Any], None] | None = None) -> Iterator[None]:
    """Within the block, on this thread, ``kernel[grid](...)`` compiles the kernel for these
    arguments and loads its module (``CompiledKernel._init_handles``) but launches nothing;
    ``on_kernel(jit_function)`` is called for each.  Other threads launch as usual.

    Triton's own ``warmup=True`` path does the compiling (same binder, same specialization, so
    the capture later finds this very compiled kernel in the cache); interpreted kernels
    (``TRITON_INTERPRET=1``) accept the same flag and run nothing."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        pass
    owner = threading.get_ident()
    with _COMPILE_ONLY_LOCK:
        originals = {cls: cls.__dict__["run"] for cls in classes if "run" in cls.__dict__}

        def patched(original):
            def run(self, *args, grid, warmup, **kwargs):
                if threading.get_ident() != owner:
                    return original(self, *args, grid=grid, warmup=warmup, **kwargs)
                kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
                init = getattr(kernel, "_init_handles", None)
                if init is not None:
                    init()  # cuModuleLoadData now, not inside the capture
                if on_kernel is not None:
                    on_kernel(self)
                return kernel

            return run

        for cls, original in originals.items():
            cls.run = patched(original)
        try:
            yield
        finally:
            for cls, original in originals.items():
                cls.run = original


# -- what a capture records and what it returns ---------------------------------------------------
@dataclass(eq=False)
class CapturedEvent:
    """An event recorded while a capture is open: it orders work inside that capture only."""

    event: Any
    stream: Any
    capture_id: int


@dataclass(eq=False)
class _Launch:
    op: str
    stream: Any
    run: Callable[[], None]
    warm: Callable[[], None] | None
    keep: tuple


@dataclass(eq=False)
class _Record:
    stream: Any
    event: CapturedEvent


@dataclass(eq=False)
class _Wait:
    stream: Any
    event: CapturedEvent


@dataclass(eq=False)
class _Capture:
    id: int
    streams: list
    items: list = field(default_factory=list)


@dataclass(eq=False)
class CudaGraph:
    """The recorded work of one capture: ``replay`` launches it on its first stream."""

    graph: Any  # torch.cuda.CUDAGraph
    streams: list
    pool: Any  # the private pool its temporaries live in (held by the CUDAGraph as well)
    keep_alive: tuple  # every tensor the recorded work reads or writes (copy_async results too)
    owner: Any
    ops: tuple[str, ...]  # the recorded launches, in issue order (for messages and tests)


class GraphCapture:
    """The capture state machine and stream orchestration, on a ``TorchCuda``-like ``api``.

    The runtime asks it ``capturing``; while a capture is open it hands every op, event record
    and event wait to ``launch`` / ``record_event`` / ``wait_event`` instead of running them."""

    def __init__(self, api) -> None:
        self.api = api
        self._capture: _Capture | None = None
        self._ids = itertools.count(1)

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    @property
    def streams(self) -> list:
        return [] if self._capture is None else list(self._capture.streams)

    def refuse(self, action: str, reason: str) -> None:
        """Raise if a capture is open: ``action`` cannot be recorded (``reason`` says why)."""
        if self._capture is not None:
            raise RuntimeError(f"{action} during a CUDA-graph capture: {reason}")

    # -- begin / record / end -------------------------------------------------------------------
    def begin(self, streams: list) -> None:
        if self._capture is not None:
            raise RuntimeError("capture_begin: a capture is already in progress (nested "
                               "captures are not supported; capture_end first)")
        streams = list(streams)
        if not streams:
            raise ValueError("capture_begin: streams must name at least one stream")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("capture_begin: a stream is named twice")
        gpus = {str(self.api.device_of(s)) for s in streams}
        if len(gpus) > 1:
            raise ValueError(f"capture_begin: the streams live on several GPUs {sorted(gpus)}; "
                             "a CUDA graph is captured on one GPU here")
        self._capture = _Capture(next(self._ids), streams)

    def check_stream(self, op: str, stream) -> None:
        capture = self._capture
        if capture is not None and not any(stream is s for s in capture.streams):
            raise RuntimeError(f"{op}: issued during a CUDA-graph capture on {stream}, which is "
                               "not being captured; every op of a capture must go on one of the "
                               "streams given to capture_begin (pass stream=...)")

    def launch(self, op: str, stream, run: Callable[[], None],
               warm: Callable[[], None] | None, keep=()) -> None:
        """Record one op: ``run`` issues its kernels (with ``stream`` current), ``warm`` prepares
        them without touching the caller's tensors (None: nothing to prepare)."""
        self.check_stream(op, stream)
        self._capture.items.append(_Launch(op, stream, run, warm, tuple(keep)))

    def record_event(self, stream) -> CapturedEvent:
        self.check_stream("record_event", stream)
        event = CapturedEvent(self.api.new_event(), stream, self._capture.id)
        self._capture.items.append(_Record(stream, event))
        return event

    def wait_event(self, stream, event) -> None:
        capture = self._capture
        if capture is None:  # an eager wait
            if isinstance(event, CapturedEvent):
                raise RuntimeError("wait_event: this event was recorded inside a CUDA-graph "
                                   "capture; it orders work inside that capture only")
            return
        self.check_stream("wait_event", stream)
        if not isinstance(event, CapturedEvent) or event.capture_id != capture.id:
            raise RuntimeError("wait_event during a CUDA-graph capture: the event was recorded "
                               "outside this capture; a graph cannot wait on outside work -- "
                               "order it before capture_begin (replay waits for what each "
                               "captured stream already holds)")
        capture.items.append(_Wait(stream, event))

    def end(self, streams: list) -> CudaGraph:
        capture = self._capture
        if capture is None:
            raise RuntimeError("capture_end without capture_begin")
        streams = list(streams)
        if len(streams) != len(capture.streams) or any(
                a is not b for a, b in zip(streams, capture.streams)):
            raise ValueError("capture_end: streams differ from capture_begin's")
        self._capture = None  # consumed from here on, whatever happens
        api, origin = self.api, capture.streams[0]
        launches = [item for item in capture.items if isinstance(item, _Launch)]
        for item in launches:  # 1. compile and load everything, outside any capture
            if item.warm is not None:
                api.warm_up(item.stream, item.warm, item.op)
        api.synchronize(api.device_of(origin))  # 2. as torch.cuda.graph does
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            graph, pool = api.new_graph(), api.pool_handle()
            api.capture_begin(graph, origin, pool)  # 3.
            try:
                self._fork(capture.streams)
                for item in capture.items:
                    self._issue(item)
                self._join(capture.streams)
            except BaseException:
                with contextlib.suppress(Exception):  # the capture may be invalidated already
                    api.capture_end(graph, origin)
                raise
            api.capture_end(graph, origin)
        finally:
            if collecting:
                gc.enable()
        keep = tuple(t for item in launches for t in item.keep)
        return CudaGraph(graph, capture.streams, pool, keep, self,
                         tuple(item.op for item in launches))

    def abort(self) -> None:
        """Drop an open capture (nothing was issued to CUDA yet)."""
        self._capture = None

    def _fork(self, streams: list) -> None:
        for other in streams[1:]:  # each stream joins the capture
            event = self.api.new_event()
            self.api.record(event, streams[0])
            self.api.wait(other, event)

    def _join(self, streams: list) -> None:
        for other in streams[1:]:  # the origin waits for every stream
            event = self.api.new_event()
            self.api.record(event, other)
            self.api.wait(streams[0], event)

    def _issue(self, item) -> None:
        if isinstance(item, _Launch):
            self.api.issue(item.stream, item.run, item.op)
        elif isinstance(item, _Record):
            self.api.record(item.event.event, item.stream)
        else:
            self.api.wait(item.stream, item.event.event)

    # -- replay ---------------------------------------------------------------------------------
    def replay(self, graph: CudaGraph, stream=None) -> None:
        """Relaunch the recorded work, ordered after what each of its streams already holds
        (e.g. the write() of this step's positions) and before what they get next."""
        if not isinstance(graph, CudaGraph):
            raise TypeError(f"graph must come from capture_end, got {type(graph).__name__}")
        if graph.owner is not self:
            raise ValueError("replay: this graph was captured by another backend instance")
        if self._capture is not None:
            raise RuntimeError("replay during a CUDA-graph capture: a graph cannot be recorded "
                               "into another; capture_end first")
        if stream is not None and not any(stream is s for s in graph.streams):
            raise ValueError(f"replay: stream {stream} is not one of the graph's streams; the "
                             "graph replays on the streams it was captured on")
        api, origin = self.api, graph.streams[0]
        for other in graph.streams[1:]:
            event = api.new_event()
            api.record(event, other)
            api.wait(origin, event)
        api.replay(graph.graph, origin)
        for other in graph.streams[1:]:
            event = api.new_event()
            api.record(event, origin)
            api.wait(other, event)
