"""CUDA-graph reuse in the Triton backend's cuda mode (``graphs_cuda``, ``runtime_cuda``).

No GPU here: ``FakeCuda`` stands in for ``graphs_cuda.TorchCuda`` (the one seam through which
the cuda-mode runtime calls ``torch.cuda``) and enforces the rules of CUDA stream capture that
this code must respect, so a wrong orchestration fails these tests:

* work issued on a capturing stream becomes a graph node -- after the stream's previous work
  and the events it waited for -- and does not run; outside a capture work runs at once;
* a kernel first launched inside a capture fails (module load), as do synchronize, device->host
  reads (``Tensor.item`` ...), work on a stream outside the capture, and waits on events
  recorded outside it; ending a capture with a stream not joined back fails (unjoined work);
* replay runs the nodes in an adversarial dependency order (newest ready node first), so an
  ordering the recorded events do not enforce shows up in the results.

Levels: ``GraphCapture`` alone with Python "kernels"; ``CudaRuntime`` on CPU tensors; and the
backend end to end -- the interpreter's Triton kernels launched through the cuda-mode runtime,
whose launches the fake intercepts -- on a decode step checked against the float64 oracles.
The same decode-step check runs on a real GPU in ``test_decode_step_graph_on_a_gpu`` (skipped
without one: this code has never run on a GPU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from opbench.backends.triton.graphs_cuda import (
    CapturedEvent,
    CudaGraph,
    GraphCapture,
    triton_compile_only,
)
from opbench.protocol import AttnParams, PagedKV, RopeParams
from opbench.reference import attention as attn_ref
from opbench.reference import rope as rope_ref

torch = pytest.importorskip("torch")


# -- the fake -------------------------------------------------------------------------------------
class FakeCudaError(RuntimeError):
    """What the CUDA driver (or torch) would answer."""


@dataclass(eq=False)
class FakeStream:
    name: str
    device: object

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


@dataclass(eq=False)
class FakeEvent:
    n: int
    capture: int | None = None
    deps: frozenset = frozenset()

    def __repr__(self) -> str:
        return f"<event {self.n}>"


@dataclass(eq=False)
class Node:
    n: int
    name: str
    stream: FakeStream
    deps: frozenset
    run: object


@dataclass(eq=False)
class FakeGraph:
    nodes: list = field(default_factory=list)
    pool: object = None
    captured: bool = False


@dataclass(eq=False)
class _FakeCapture:
    id: int
    origin: FakeStream
    graph: FakeGraph
    pool: object
    tails: dict
    nodes: list = field(default_factory=list)


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


class FakeCuda:
    """``graphs_cuda.TorchCuda``'s methods over a simulated CUDA (see the module docstring).
    ``log`` holds every call; ``executed`` the node names each replay ran, in order."""

    HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__")

    def __init__(self, gpus: int = 1) -> None:
        self.gpus = gpus
        self.log: list[tuple] = []
        self.loaded: set[str] = set()
        self.executed: list[str] = []
        self.capture: _FakeCapture | None = None
        self._current: list[FakeStream] = []
        self._counter = iter(range(1, 1 << 30))
        self._default = FakeStream("default", torch.device("cpu"))

    # devices, streams, events
    def device_count(self) -> int:
        return self.gpus

    def torch_device(self, gpu: int):
        return torch.device("cpu")  # the runtime's tensors are CPU tensors here

    def new_stream(self, torch_device) -> FakeStream:
        return FakeStream(f"s{next(self._counter)}", torch_device)

    def current_stream(self, torch_device) -> FakeStream:
        return self._default

    def device_of(self, stream):
        return stream.device

    @contextlib.contextmanager
    def on(self, stream):
        self._current.append(stream)
        try:
            yield
        finally:
            self._current.pop()

    def upload(self, host, stream):
        self.log.append(("upload", stream))
        return host.clone()

    def new_event(self) -> FakeEvent:
        return FakeEvent(next(self._counter))

    def _capturing(self, stream) -> bool:
        return self.capture is not None and stream in self.capture.tails

    def record(self, event: FakeEvent, stream) -> None:
        self.log.append(("record", event, stream))
        if self._capturing(stream):
            event.capture, event.deps = self.capture.id, self.capture.tails[stream]
        else:
            event.capture, event.deps = None, frozenset()

    def wait(self, stream, event: FakeEvent) -> None:
        self.log.append(("wait", stream, event))
        if event.capture is not None:
            if self.capture is None or event.capture != self.capture.id:
                raise FakeCudaError("cudaErrorStreamCaptureIsolation: event of another capture")
            tails = self.capture.tails  # the stream joins the capture, or gains a dependency
            tails[stream] = tails.get(stream, frozenset()) | event.deps
        elif self._capturing(stream):
            raise FakeCudaError(f"{stream} (capturing) waits on an event recorded outside")

    def record_stream(self, tensor, stream) -> None:
        self.log.append(("record_stream", stream))

    def stream_synchronize(self, stream) -> None:
        self._no_sync("stream_synchronize")
        self.log.append(("stream_synchronize", stream))

    def synchronize(self, torch_device=None) -> None:
        self._no_sync("synchronize")
        self.log.append(("synchronize",))

    def _no_sync(self, what: str) -> None:
        if self.capture is not None:
            raise FakeCudaError(f"{what}: operation not permitted when stream is capturing")

    # work
    def kernel(self, name: str, thunk, needs_module: bool = True) -> None:
        """A kernel launch on the current stream: recorded into a capture, or run now."""
        stream = self._current[-1] if self._current else self._default
        if self.capture is None:
            if needs_module:
                self.loaded.add(name)  # first launch loads the module
            thunk()
            return
        if not self._capturing(stream):
            raise FakeCudaError(f"{name} launched on {stream}, which is not capturing, while a "
                                "capture is open: it would run now, outside the graph")
        if needs_module and name not in self.loaded:
            raise FakeCudaError(f"{name}: operation not permitted when stream is capturing "
                                "(cuModuleLoadData: first launch inside a capture)")
        node = Node(next(self._counter), name, stream, self.capture.tails[stream], thunk)
        self.capture.tails[stream] = frozenset([node])
        self.capture.nodes.append(node)

    def load(self, name: str) -> None:
        self._no_sync("module load")
        self.loaded.add(name)

    def issue(self, stream, fn, name: str) -> None:
        self.log.append(("issue", name, stream))
        with self.on(stream), self._intercept():
            fn()

    def warm_up(self, stream, fn, name: str) -> None:
        if self.capture is not None:
            raise FakeCudaError("warm-up inside a capture")
        self.log.append(("warm_up", name, stream))
        with self.on(stream):
            fn()

    def torch_work(self, name: str, fn) -> None:
        self.kernel(name, fn, needs_module=False)

    def compile_only(self):
        return triton_compile_only(on_kernel=lambda k: self.load(_kernel_name(k)))

    @contextlib.contextmanager
    def _intercept(self):
        """Interpreted Triton launches become ``kernel`` calls; while capturing, device->host
        reads of tensors fail as they would on a GPU."""
        # no import here: importing triton before TRITON_INTERPRET=1 is set would leave
        # triton.language's own jit functions uninterpretable for the rest of the session
        interpreter = sys.modules.get("triton.runtime.interpreter")
        if interpreter is None:  # no kernel can have been loaded: nothing to intercept
            InterpretedFunction = type("NoKernels", (), {"run": None})
        else:
            InterpretedFunction = interpreter.InterpretedFunction
        original = InterpretedFunction.__dict__["run"]
        fake = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if warmup:
                return original(kernel, *args, grid=grid, warmup=True, **kwargs)
            fake.kernel(_kernel_name(kernel), lambda: original(kernel, *args, grid=grid,
                                                               warmup=False, **kwargs))

        missing = object()
        saved = {name: torch.Tensor.__dict__.get(name, missing) for name in self.HOST_READS}
        InterpretedFunction.run = run
        if self.capture is not None:
            for name in self.HOST_READS:
                setattr(torch.Tensor, name, _refused_read(name))
        try:
            yield
        finally:
            InterpretedFunction.run = original
            for name, method in saved.items():
                if method is missing:
                    if name in torch.Tensor.__dict__:
                        delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, method)

    # graphs
    def pool_handle(self):
        return ("pool", next(self._counter))

    def new_graph(self) -> FakeGraph:
        return FakeGraph()

    def capture_begin(self, graph: FakeGraph, stream, pool) -> None:
        self.log.append(("capture_begin", stream, pool))
        if self.capture is not None:
            raise FakeCudaError("a capture is already open")
        if stream is self._default:
            raise FakeCudaError("cannot capture the default stream")
        self.capture = _FakeCapture(next(self._counter), stream, graph, pool,
                                    {stream: frozenset()})

    def capture_end(self, graph: FakeGraph, stream) -> None:
        self.log.append(("capture_end", stream))
        capture, self.capture = self.capture, None
        if capture is None or capture.graph is not graph:
            raise FakeCudaError("capture_end without a capture of this graph")
        if stream is not capture.origin:
            raise FakeCudaError("capture must end on the stream it began on")
        reached, todo = set(), list(capture.tails[capture.origin])
        while todo:
            node = todo.pop()
            if node not in reached:
                reached.add(node)
                todo.extend(node.deps)
        for other, tail in capture.tails.items():
            if not tail <= reached:
                raise FakeCudaError(f"cudaErrorStreamCaptureUnjoined: work on {other} was not "
                                    f"joined into {capture.origin}")
        graph.nodes, graph.pool, graph.captured = capture.nodes, capture.pool, True

    def replay(self, graph: FakeGraph, stream) -> None:
        self.log.append(("replay", stream))
        if not graph.captured:
            raise FakeCudaError("replay of a graph that was never captured")
        done: set = set()
        pending = list(graph.nodes)
        while pending:
            ready = [n for n in pending if n.deps <= done]
            node = max(ready, key=lambda n: n.n)  # adversarial: the newest ready node first
            pending.remove(node)
            node.run()
            self.executed.append(node.name)
            done.add(node)

    # for the tests
    def calls(self, *kinds: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] in kinds]


def _refused_read(name: str):
    def refused(self, *args, **kwargs):
        raise FakeCudaError(f"Tensor.{name}: a device->host read while a stream is capturing "
                            "(operation not permitted when stream is capturing)")

    return refused


# -- GraphCapture with Python "kernels" -----------------------------------------------------------
@pytest.fixture
def fake():
    return FakeCuda()


def _streams(fake, n=2):
    return [fake.new_stream("gpu0") for _ in range(n)]


def _op(capture: GraphCapture, fake: FakeCuda, name: str, stream, effects: list, keep=()):
    capture.launch(name, stream, lambda: fake.kernel(name, lambda: effects.append(name)),
                   lambda: fake.load(name), keep=keep)


def test_capture_forks_records_joins_then_replays_in_dependency_order(fake):
    s0, s1 = _streams(fake)
    g, effects = GraphCapture(fake), []
    g.begin([s0, s1])
    _op(g, fake, "a", s0, effects)
    g.wait_event(s1, g.record_event(s0))
    _op(g, fake, "b", s1, effects)
    g.wait_event(s0, g.record_event(s1))
    _op(g, fake, "c", s0, effects)
    assert fake.log == [] and effects == []  # recording issues nothing to CUDA
    graph = g.end([s0, s1])
    assert effects == [] and not g.capturing  # a capture runs nothing

    kinds = [entry[0] for entry in fake.log]
    begin = kinds.index("capture_begin")
    assert kinds[:begin] == ["warm_up"] * 3 + ["synchronize"]  # compile and load, then capture
    assert fake.log[begin] == ("capture_begin", s0, graph.pool)
    # fork: s1 joins through an event recorded on s0, before any of its work
    fork_record, fork_wait = fake.log[begin + 1], fake.log[begin + 2]
    assert fork_record[0] == "record" and fork_record[2] is s0
    assert fork_wait == ("wait", s1, fork_record[1])
    assert [e[1] for e in fake.calls("issue")] == ["a", "b", "c"]
    # join: s0 waits for s1 after the last recorded item, then the capture ends on s0
    join_record, join_wait, end = fake.log[-3:]
    assert join_record[0] == "record" and join_record[2] is s1
    assert join_wait == ("wait", s0, join_record[1]) and end == ("capture_end", s0)
    assert isinstance(graph, CudaGraph) and graph.ops == ("a", "b", "c")
    assert graph.graph.pool is graph.pool  # the pool it captured into stays with the graph

    fake.log.clear()
    g.replay(graph)
    assert effects == ["a", "b", "c"]  # even newest-first, the events order a < b < c
    (r1, w1, replay, r2, w2) = fake.log
    assert r1[0] == "record" and r1[2] is s1 and w1 == ("wait", s0, r1[1])  # after s1's work
    assert replay == ("replay", s0)
    assert r2[0] == "record" and r2[2] is s0 and w2 == ("wait", s1, r2[1])  # before s1's next


def test_fake_replay_exposes_work_that_no_event_orders(fake):
    """The fake is adversarial: without the s1 -> s0 event, c may run before b."""
    s0, s1 = _streams(fake)
    g, effects = GraphCapture(fake), []
    g.begin([s0, s1])
    _op(g, fake, "a", s0, effects)
    g.wait_event(s1, g.record_event(s0))
    _op(g, fake, "b", s1, effects)
    _op(g, fake, "c", s0, effects)  # should have waited for b
    graph = g.end([s0, s1])  # the final join still makes the capture valid
    g.replay(graph)
    assert effects == ["a", "c", "b"]


def test_fake_enforces_cuda_capture_rules(fake):
    """Each rule the fake enforces, so a test passing through it means something."""
    s0, s1, outside = _streams(fake, 3)
    graph = fake.new_graph()
    fake.load("k")
    fake.capture_begin(graph, s0, "pool")
    with pytest.raises(FakeCudaError, match="first launch inside a capture"):
        with fake.on(s0):
            fake.kernel("never-loaded", lambda: None)
    with pytest.raises(FakeCudaError, match="outside the graph"):
        with fake.on(outside):
            fake.kernel("k", lambda: None)
    with pytest.raises(FakeCudaError, match="not permitted"):
        fake.synchronize()
    eager = fake.new_event()
    eager.capture = None
    with pytest.raises(FakeCudaError, match="outside"):
        fake.wait(s0, eager)
    with pytest.raises(FakeCudaError, match="Tensor.item"):
        with fake._intercept():
            torch.zeros(1).item()
    fork = fake.new_event()
    fake.record(fork, s0)
    fake.wait(s1, fork)
    with fake.on(s1):
        fake.kernel("k", lambda: None)
    with pytest.raises(FakeCudaError, match="Unjoined"):
        fake.capture_end(graph, s0)  # s1's work never joined back
    assert fake.capture is None


@pytest.mark.parametrize("mistake", ["nested", "end without begin", "empty", "duplicate",
                                     "two GPUs"])
def test_capture_state_errors(fake, mistake):
    s0, s1 = _streams(fake)
    g = GraphCapture(fake)
    if mistake == "nested":
        g.begin([s0])
        with pytest.raises(RuntimeError, match="already in progress"):
            g.begin([s1])
        assert g.streams == [s0]  # the open capture is untouched
    elif mistake == "end without begin":
        with pytest.raises(RuntimeError, match="capture_end without capture_begin"):
            g.end([s0])
    elif mistake == "empty":
        with pytest.raises(ValueError, match="at least one stream"):
            g.begin([])
    elif mistake == "duplicate":
        with pytest.raises(ValueError, match="twice"):
            g.begin([s0, s0])
    else:
        with pytest.raises(ValueError, match="several GPUs"):
            g.begin([s0, FakeStream("other", "gpu1")])
    assert fake.log == []


def test_capture_end_with_other_streams_keeps_the_capture_open(fake):
    s0, s1 = _streams(fake)
    g, effects = GraphCapture(fake), []
    g.begin([s0, s1])
    _op(g, fake, "a", s0, effects)
    for wrong in ([s1, s0], [s0], [s0, s1, fake.new_stream("gpu0")]):
        with pytest.raises(ValueError, match="differ"):
            g.end(wrong)
        assert g.capturing and fake.log == []
    g.replay(g.end([s0, s1]))
    assert effects == ["a"]


def test_ops_and_events_must_stay_inside_the_capture(fake):
    s0, s1, outside = _streams(fake, 3)
    g = GraphCapture(fake)
    before = fake.new_event()
    g.begin([s0, s1])
    with pytest.raises(RuntimeError, match="not being captured"):
        g.launch("rope", outside, lambda: None, None)
    with pytest.raises(RuntimeError, match="not being captured"):
        g.record_event(outside)
    inside = g.record_event(s0)
    with pytest.raises(RuntimeError, match="not being captured"):
        g.wait_event(outside, inside)
    with pytest.raises(RuntimeError, match="recorded outside this capture"):
        g.wait_event(s1, before)
    graph = g.end([s0, s1])
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        g.wait_event(s1, inside)  # an eager wait on an event of a finished capture
    g.begin([s0, s1])
    with pytest.raises(RuntimeError, match="recorded outside this capture"):
        g.wait_event(s1, inside)  # nor does it order work in the next capture
    g.abort()
    assert isinstance(inside, CapturedEvent) and graph.ops == ()


def test_replay_errors(fake):
    s0, s1 = _streams(fake)
    g, other = GraphCapture(fake), GraphCapture(fake)
    g.begin([s0])
    graph = g.end([s0])
    with pytest.raises(TypeError, match="capture_end"):
        g.replay(object())
    with pytest.raises(ValueError, match="another backend"):
        other.replay(graph)
    with pytest.raises(ValueError, match="not one of the graph's streams"):
        g.replay(graph, stream=s1)
    g.begin([s0])
    with pytest.raises(RuntimeError, match="replay during a CUDA-graph capture"):
        g.replay(graph)
    g.abort()
    g.replay(graph, stream=s0)
    assert fake.calls("replay") == [("replay", s0)]


def test_a_failure_inside_the_capture_still_ends_it(fake):
    s0, s1 = _streams(fake)
    g, effects = GraphCapture(fake), []
    g.begin([s0, s1])
    _op(g, fake, "a", s0, effects)

    def broken() -> None:
        raise ValueError("launch failed")

    g.launch("broken", s1, broken, None)
    with pytest.raises(ValueError, match="launch failed"):
        g.end([s0, s1])
    assert fake.calls("capture_end") == [("capture_end", s0)]  # no capture left open
    assert fake.capture is None and not g.capturing and gc.isenabled()
    g.begin([s0])  # and the next capture works
    _op(g, fake, "b", s0, effects)
    g.replay(g.end([s0]))
    assert effects == ["b"]


def test_a_failing_warm_up_begins_no_capture(fake):
    (s0,) = _streams(fake, 1)
    g = GraphCapture(fake)
    g.begin([s0])

    def bad_warm() -> None:
        raise RuntimeError("does not compile")

    g.launch("k", s0, lambda: None, bad_warm)
    with pytest.raises(RuntimeError, match="does not compile"):
        g.end([s0])
    assert not fake.calls("capture_begin") and not g.capturing


def test_each_capture_gets_its_own_pool_and_pauses_the_collector(fake):
    (s0,) = _streams(fake, 1)
    g, seen = GraphCapture(fake), []
    graphs = []
    for _ in range(2):
        g.begin([s0])
        g.launch("probe", s0, lambda: seen.append(gc.isenabled()), None)
        graphs.append(g.end([s0]))
    assert graphs[0].pool != graphs[1].pool
    assert seen == [False, False] and gc.isenabled()
    gc.disable()
    try:
        g.begin([s0])
        g.end([s0])
        assert not gc.isenabled()  # a disabled collector stays disabled
    finally:
        gc.enable()


def test_graph_keeps_what_its_work_touches_alive(fake):
    (s0,) = _streams(fake, 1)
    g = GraphCapture(fake)
    buffer = torch.zeros(4)
    ref = weakref.ref(buffer)
    g.begin([s0])
    g.launch("fill", s0, lambda: None, None, keep=(buffer,))
    graph = g.end([s0])
    del buffer
    gc.collect()
    assert ref() is not None  # a replay may still write it
    del graph
    gc.collect()
    assert ref() is None


# -- the compile-only warm-up ---------------------------------------------------------------------
def _cpy_args():
    from opbench.harness.triton_testing import require_triton

    kernels = require_triton()
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return kernels[3], src, torch.full((3, 4), float("nan"))


def test_compile_only_launches_nothing_on_its_thread_only():
    k_copy, src, out = _cpy_args()
    seen = []
    with triton_compile_only(on_kernel=lambda k: seen.append(_kernel_name(k))):
        k_copy.launch_cpy(src, out, (0, 1))
        assert torch.isnan(out).all() and seen == ["cpy_kernel"]
        other = torch.full((3, 4), float("nan"))
        thread = threading.Thread(target=k_copy.launch_cpy, args=(src, other, (0, 1)))
        thread.start()
        thread.join()
        assert torch.equal(other, src)  # another thread's launch runs as usual
    k_copy.launch_cpy(src, out, (0, 1))  # restored on exit
    assert torch.equal(out, src) and seen == ["cpy_kernel"]


def test_compile_only_forces_triton_warmup_and_loads_the_module(monkeypatch):
    """The JITFunction path (GPU): Triton's own warmup=True, then the module load."""
    from opbench.harness.triton_testing import require_triton

    require_triton()  # TRITON_INTERPRET=1 before triton is imported, as for every test here
    from triton.runtime.jit import JITFunction

    calls = []

    class Compiled:
        def _init_handles(self):
            calls.append("load")

    def recorded_run(self, *args, grid, warmup, **kwargs):
        calls.append(("run", args, grid, warmup, kwargs))
        return Compiled()

    monkeypatch.setattr(JITFunction, "run", recorded_run)
    kernel = object.__new__(JITFunction)
    with triton_compile_only():
        compiled = JITFunction.__getitem__(kernel, (4,))(1, 2, BLOCK=8)
    assert calls == [("run", (1, 2), (4,), True, {"BLOCK": 8}), "load"]
    assert isinstance(compiled, Compiled)
    assert JITFunction.__dict__["run"] is recorded_run


# -- CudaRuntime on CPU tensors -------------------------------------------------------------------
def _runtime(fake, n_devices=2):
    from opbench.backends.triton.runtime_cuda import CudaRuntime

    rt = CudaRuntime(api=fake)
    rt.devices(n_devices)
    return rt


def test_uploads_and_empty_arrays_are_made_on_their_devices_stream(fake):
    """Made on the default stream, memory could be handed out again while the device stream's
    kernels still use it (the likely cause of the NaN lse that one ring scenario merged on the
    third H200 run: a race, not reproduced here)."""
    rt = _runtime(fake)
    for device in rt.devices(2):
        fake.log.clear()
        rt.to_device(np.ones(4, np.float32), device)
        rt.empty((2, 3), np.float16, device)
        assert fake.calls("upload") == [("upload", rt.stream(device))] * 2


def test_empty_reads_nan_at_every_float_width_and_minus_one_for_ints(fake):
    """bfloat16's NumPy kind is "V", not "f": it was poisoned with -1.0, which a skipped write
    can hide behind (the scenario engine makes its buffers with empty)."""
    from opbench.protocol import numpy_dtype

    rt = _runtime(fake, 1)
    for name in ("f32", "f16", "bf16"):
        host = rt.to_host(rt.empty((2, 3), numpy_dtype(name)))
        assert np.isnan(host.astype(np.float32)).all(), name
    assert (rt.to_host(rt.empty((4,), np.int32)) == -1).all()


def test_runtime_refuses_what_a_capture_cannot_record(fake):
    rt = _runtime(fake)
    a = rt.to_device(np.ones(4, np.float32))
    fake.log.clear()
    rt.capture_begin([rt.stream(0), rt.stream(1)])
    refusals = {
        "write": lambda: rt.write(a, np.zeros(4, np.float32)),
        "to_host": lambda: rt.to_host(a),
        "synchronize": lambda: rt.synchronize(),
        "flush_l2": rt.flush_l2,
        "timing": rt.timer,
    }
    for action, call in refusals.items():
        with pytest.raises(RuntimeError, match=f"^{action} during a CUDA-graph capture"):
            call()
    assert fake.log == []  # nothing reached CUDA
    rt.capture_end([rt.stream(0), rt.stream(1)])
    rt.write(a, np.zeros(4, np.float32))
    assert (rt.to_host(a) == 0).all()


def test_buffers_made_during_a_capture_are_made_at_once_and_kept_by_the_graph(fake):
    """The capture is deferred, so an upload or a fresh buffer inside it is made at once (the
    scenario engine makes each step's intermediates as it goes); the recorded work that uses
    them keeps them, so every replay computes into the same memory."""
    rt = _runtime(fake)
    rt.capture_begin([rt.stream(1)])
    x = rt.to_device(np.full(4, 3.0, np.float32), 1)
    out = rt.empty((4,), np.float32, 1)
    rt.add(x, x, out)  # on device 1's stream: where x and out were made
    graph = rt.capture_end([rt.stream(1)])
    assert any(t is out for t in graph.keep_alive) and any(t is x for t in graph.keep_alive)
    assert np.isnan(rt.to_host(out)).all()  # made poisoned at once; the add recorded, not run
    rt.replay(graph)
    assert (rt.to_host(out) == 6.0).all()


def test_arrays_know_their_logical_device_on_a_shared_gpu(fake):
    rt = _runtime(fake, n_devices=3)  # three logical devices on the fake's one GPU
    first, second, third = rt.devices(3)
    x = rt.to_device(np.zeros((2, 4), np.float32), second)
    assert rt.device_of(x) is second and rt.device_of(x.reshape(8)[2:]) is second
    assert rt.device_of(rt.empty((3,), np.float32, third)) is third
    assert rt.device_of(rt.copy_async(x, third)) is third
    assert rt.device_of(torch.zeros(2)) is first  # not made here: the first one on its GPU


def test_runtime_refuses_ops_on_streams_outside_the_capture(fake):
    rt = _runtime(fake)
    a = rt.to_device(np.ones(4, np.float32))
    out = rt.empty((4,), np.float32)
    rt.capture_begin([rt.stream(0)])
    with pytest.raises(RuntimeError, match="add: issued during a CUDA-graph capture on"):
        rt.add(a, a, out, stream=rt.stream(1))
    with pytest.raises(RuntimeError, match="copy_async"):
        rt.copy_async(a, 1)  # device 1's stream would take part
    with pytest.raises(TypeError, match="not a stream of this backend"):
        rt.capture_end([FakeStream("foreign", torch.device("cpu"))])
    rt.add(a, a, out)  # the arrays' stream (device 0's) is captured
    rt.replay(rt.capture_end(rt.stream(0)))
    assert (rt.to_host(out) == 2).all()


def test_torch_work_warms_up_into_scratch_and_runs_only_at_replay(fake):
    rt = _runtime(fake, 1)
    a = rt.to_device(np.arange(4, dtype=np.float32))
    b = rt.to_device(np.ones(4, np.float32))
    rt.capture_begin([rt.stream(0)])
    rt.add(a, b, a)  # in place: a warm-up or a capture that ran it would show
    rt.matmul(a.view(2, 2), b.view(2, 2), b.view(2, 2))
    graph = rt.capture_end([rt.stream(0)])
    assert [e[1] for e in fake.calls("warm_up")] == ["add", "matmul"]
    np.testing.assert_array_equal(rt.to_host(a), np.arange(4))
    np.testing.assert_array_equal(rt.to_host(b), np.ones(4))
    rt.replay(graph)
    np.testing.assert_array_equal(rt.to_host(a), np.arange(4) + 1)
    np.testing.assert_array_equal(rt.to_host(b), [3, 3, 7, 7])  # [[1, 2], [3, 4]] @ ones


def test_copy_async_inside_a_capture(fake):
    """The destination comes back at once, stays alive with the graph, and the stream that
    receives it waits for the copy (the fake would otherwise run the reader first)."""
    rt = _runtime(fake)
    s0, s1 = rt.stream(0), rt.stream(1)
    src = rt.to_device(np.arange(4, dtype=np.float32))
    out = rt.to_device(np.zeros(4, np.float32))
    rt.capture_begin([s0, s1])
    dst = rt.copy_async(src, 1)
    rt.add(dst, dst, out, stream=s1)
    graph = rt.capture_end([s0, s1])
    assert "copy_async" in graph.ops and not fake.calls("record_stream")
    ref = weakref.ref(dst)
    del dst
    gc.collect()
    assert ref() is not None
    for step in range(2):
        rt.write(src, np.arange(4) + step * 10)
        rt.replay(graph)
        np.testing.assert_array_equal(rt.to_host(out), 2 * (np.arange(4) + step * 10))
    assert fake.executed[-2:] == ["copy_async", "add"]


def test_eager_runtime_still_runs_at_once(fake):
    rt = _runtime(fake)
    src = rt.to_device(np.arange(3, dtype=np.float32))
    dst = rt.copy_async(src, 1)
    np.testing.assert_array_equal(rt.to_host(dst), np.arange(3))
    assert fake.calls("record_stream")  # the source's memory waits for the copy
    event = rt.record_event(rt.stream(0))
    rt.wait_event(rt.stream(1), event)
    assert not isinstance(event, CapturedEvent)


# -- the backend end to end: interpreted Triton kernels through the cuda-mode runtime --------------
def decode_step_graph_check(backend, positions=((30, 40), (63, 17)), after_capture=None,
                            atol=1e-4) -> list[str]:
    """Capture one decode step on two streams -- RoPE of q and the new keys on stream 0; on
    stream 1, after an event, SET_ROWS of the keys and values into the paged caches; on stream
    0, after an event back, paged attention -- with no eager run before (the kernels are first
    seen inside the capture).  Then per step: write() new q/k/v, positions, slots and lengths,
    replay, and compare the output and the caches with the float64 oracles.  Returns the
    problems found (empty: all good).  Needs a backend in cuda mode (torch tensors)."""
    rng = np.random.default_rng(7)
    b = backend
    n_seqs, heads, kv_heads, dim, block, num_blocks = 2, 4, 2, 32, 16, 8
    p = RopeParams(n_dims=dim, mode="neox")
    ap = AttnParams(scale=dim ** -0.5, causal=True)
    table = np.array([[3, 1, 7, 0], [2, 6, 5, 4]], np.int32)
    k_cache = rng.uniform(-1, 1, (num_blocks, block, kv_heads, dim)).astype(np.float32)
    v_cache = rng.uniform(-1, 1, (num_blocks, block, kv_heads, dim)).astype(np.float32)

    b.devices(2)
    s0, s1 = b.stream(0), b.stream(1)
    dk, dv = b.to_device(k_cache), b.to_device(v_cache)
    k_rows, v_rows = dk.view(-1, kv_heads, dim), dv.view(-1, kv_heads, dim)
    paged = PagedKV(b.to_device(table), b.empty((n_seqs,), np.int32),
                    b.to_device(np.arange(n_seqs + 1, dtype=np.int32)))
    q, q_roped, out = (b.empty((n_seqs, heads, dim), np.float32) for _ in range(3))
    k_new, k_roped, v_new = (b.empty((n_seqs, kv_heads, dim), np.float32) for _ in range(3))
    pos, slots = b.empty((n_seqs,), np.int32), b.empty((n_seqs,), np.int32)

    b.capture_begin([s0, s1])
    b.rope(q, pos, q_roped, p, stream=s0)
    b.rope(k_new, pos, k_roped, p, stream=s0)
    b.wait_event(s1, b.record_event(s0))
    b.set_rows(k_rows, k_roped, slots, stream=s1)
    b.set_rows(v_rows, v_new, slots, stream=s1)
    b.wait_event(s0, b.record_event(s1))
    b.attention(q_roped, dk, dv, out, ap, paged=paged, stream=s0)
    graph = b.capture_end([s0, s1])
    if after_capture is not None:
        after_capture(graph, out)

    problems = []
    for step, step_pos in enumerate(positions):
        step_pos = np.array(step_pos, np.int32)
        step_slots = (table[np.arange(n_seqs), step_pos // block] * block
                      + step_pos % block).astype(np.int32)
        hq = rng.uniform(-1, 1, (n_seqs, heads, dim)).astype(np.float32)
        hk = rng.uniform(-1, 1, (n_seqs, kv_heads, dim)).astype(np.float32)
        hv = rng.uniform(-1, 1, (n_seqs, kv_heads, dim)).astype(np.float32)
        for dst, host in ((q, hq), (k_new, hk), (v_new, hv), (pos, step_pos),
                          (slots, step_slots), (paged.seq_lens, step_pos + 1)):
            b.write(dst, host)
        b.replay(graph)
        got, got_k = b.to_host(out), b.to_host(dk)

        rope = dict(n_dims=dim, mode="neox")
        rq, rk = rope_ref.rope(hq, step_pos, **rope), rope_ref.rope(hk, step_pos, **rope)
        flat_k, flat_v = k_cache.reshape(-1, kv_heads, dim), v_cache.reshape(-1, kv_heads, dim)
        flat_k[step_slots], flat_v[step_slots] = rk, hv
        want = attn_ref.paged_attention(rq, k_cache, v_cache, table, step_pos + 1,
                                        np.ones(n_seqs, np.int32), scale=ap.scale, causal=True)
        for name, g_arr, w_arr in (("out", got, want), ("k cache", got_k, k_cache)):
            err = float(np.max(np.abs(g_arr.astype(np.float64) - w_arr)))
            if not err <= atol:
                problems.append(f"step {step} (positions {step_pos.tolist()}): {name} max "
                                f"error {err:.3g} > {atol}")
    return problems


@pytest.fixture
def fake_cuda_backend(fake):
    """A TritonBackend whose cuda-mode runtime runs on FakeCuda: kernels are the interpreter's,
    every launch goes through the fake (recorded while capturing)."""
    from opbench.backends.triton import TritonBackend
    from opbench.backends.triton.runtime_cuda import CudaRuntime
    from opbench.harness.triton_testing import require_triton

    require_triton()
    backend = TritonBackend(mode="interpreter", runtime=CudaRuntime(api=fake))
    yield backend
    backend.close()


def test_the_cuda_mode_backend_declares_it_cannot_hold_a_stream(fake_cuda_backend):
    """So COPY_ASYNC's gated checks are UNSUPPORTED on it, not errors (the third H200 run)."""
    assert not fake_cuda_backend.implements("hold")
    assert fake_cuda_backend.implements("copy_async")
    assert fake_cuda_backend.implements("capture_begin")


def test_decode_step_graph_through_the_fake(fake, fake_cuda_backend):
    seen = {}

    def after_capture(graph, out):
        seen["out"] = fake_cuda_backend.to_host(out)
        seen["nodes"] = [node.name for node in graph.graph.nodes]

    problems = decode_step_graph_check(fake_cuda_backend, after_capture=after_capture)
    assert not problems, problems
    assert np.isnan(seen["out"]).all()  # nothing ran at capture (nor in its warm-up)
    # paged attention records the split-KV decode: the choice reads shapes only (a read of
    # q_start on the host, Tensor.item, the fake refuses inside a capture)
    assert seen["nodes"] == ["rope_kernel", "rope_kernel", "rows_kernel", "rows_kernel",
                             "decode_split_kernel", "merge_partials_kernel"]
    assert len(fake.calls("replay")) == 2


@pytest.mark.parametrize("split, devices", [("none", 1), ("layer", 2), ("ring", 2)])
def test_scenarios_with_graph_reuse_run_on_the_cuda_runtime(fake, split, devices):
    """The scenario engine, step by step, on the cuda-mode runtime (the fake in CUDA's place):
    several logical devices on one GPU, each step's buffers made as it goes, the decode step
    captured once and replayed, the eviction re-rotating the cache between replays."""
    from opbench.backends.triton import TritonBackend
    from opbench.backends.triton.runtime_cuda import CudaRuntime
    from opbench.harness.scenario.config import ScenarioSpec
    from opbench.harness.scenario.judge import run_scenario, scenario_options
    from opbench.harness.scenario.matrix import declared_options
    from opbench.harness.triton_testing import require_triton

    require_triton()
    spec = ScenarioSpec(split=split, devices=devices, graph_reuse=True, evict=True, layers=2,
                        steps=2)
    backend = TritonBackend(mode="interpreter", runtime=CudaRuntime(api=fake),
                            **declared_options(TritonBackend, scenario_options(spec)))
    try:
        result = run_scenario(backend, spec)
    finally:
        backend.close()
    assert result.ok, result.error or result.divergence.describe()
    assert len(fake.calls("replay")) == spec.steps  # every decode step replayed the graph


def test_eager_decode_still_takes_the_split_kv_path(fake, fake_cuda_backend):
    b = fake_cuda_backend
    b.devices(1)
    rng = np.random.default_rng(0)
    k = b.to_device(rng.uniform(-1, 1, (2, 4, 1, 16)).astype(np.float32))
    q = b.to_device(rng.uniform(-1, 1, (2, 2, 16)).astype(np.float32))
    out = b.empty((2, 2, 16), np.float32)
    paged = PagedKV(*(b.to_device(np.array(a, np.int32)) for a in ([[0], [1]], [3, 4], [0, 1, 2])))
    b.attention(q, k, k, out, AttnParams(scale=0.25), paged=paged)
    assert {"decode_split_kernel", "merge_partials_kernel"} <= fake.loaded
    assert "flash_attention_kernel" not in fake.loaded


def test_backend_capture_errors_through_the_fake(fake_cuda_backend):
    b = fake_cuda_backend
    b.devices(2)
    x = b.to_device(np.zeros(1, np.float32))
    with pytest.raises(RuntimeError, match="capture_end without capture_begin"):
        b.capture_end([b.stream(0)])
    b.capture_begin([b.stream(0), b.stream(1)])
    with pytest.raises(RuntimeError, match="already in progress"):
        b.capture_begin([b.stream(0)])
    with pytest.raises(ValueError, match="differ"):
        b.capture_end([b.stream(1), b.stream(0)])
    with pytest.raises(RuntimeError, match="^write during"):
        b.write(x, np.ones(1))
    graph = b.capture_end([b.stream(0), b.stream(1)])
    b.replay(graph)
    b.capture_begin([b.stream(0)])
    b.close()  # an open capture is dropped, not left behind
    assert not b.runtime.capturing


# -- a real GPU -----------------------------------------------------------------------------------
# Loads this file as module ``m`` in a fresh interpreter. The module is registered before it runs:
# dataclasses look their class's module up in sys.modules (the first H200 run of the GPU test
# below failed there, in the loading).
_LOAD_THIS_MODULE = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('graph_check', {str(Path(__file__))!r})\n"
    "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m\n"
    "spec.loader.exec_module(m)\n"
)


def test_the_gpu_check_loads_this_module_in_a_fresh_process():
    """The loading part of the GPU test's subprocess, which runs here without a GPU."""
    code = _LOAD_THIS_MODULE + "print(m.decode_step_graph_check.__name__)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip() == "decode_step_graph_check"


@pytest.mark.gpu
def test_decode_step_graph_on_a_gpu():
    """The same decode-step check on torch.cuda, in a fresh process (Triton's mode is chosen
    once per process, and other tests load the kernels in interpreter mode)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU: CUDA-graph capture has only been exercised through FakeCuda")
    code = (
        _LOAD_THIS_MODULE +
        "from opbench.backends.triton import TritonBackend\n"
        "b = TritonBackend(mode='cuda')\n"
        "problems = m.decode_step_graph_check(b, atol=2e-4)\n"
        "b.close()\n"
        "print('\\n'.join(problems) or 'OK'); sys.exit(1 if problems else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=900, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
