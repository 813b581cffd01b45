"""Every kernel launch the cupy backend makes, checked against the kernel's CUDA signature.

cupy.RawKernel packs arguments by their NumPy types and never checks them against the
kernel's parameter list: a missing int or a float where a double is expected silently shifts
every later argument.  Here a fake ``cupy`` (NumPy arrays standing in for device memory,
kernels that only record their launches) drives the real backend code through every op on
the CPU; each recorded launch is matched, parameter by parameter (pointer element types
included), with the signature parsed from kernels/*.cu, and its geometry is checked too.
"""

from __future__ import annotations

import ctypes
import re
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest

from opbench.backends.common.event_timer import FIRST_SPIN_NS
from opbench.backends.cupy import CupyBackend, plan, runtime
from opbench.protocol import AttnParams, PagedKV, RopeParams

LAUNCHES: list[tuple[str, tuple, tuple, tuple, int]] = []
COPIES: list[int] = []  # bytes of each device-to-device memcpy queued


class FakeArray:
    """Device memory stand-in: a NumPy array with cupy's attribute names."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    size = property(lambda self: self.a.size)
    nbytes = property(lambda self: self.a.nbytes)
    itemsize = property(lambda self: self.a.itemsize)
    strides = property(lambda self: self.a.strides)
    flags = property(lambda self: self.a.flags)
    ndim = property(lambda self: self.a.ndim)
    data = property(lambda self: types.SimpleNamespace(ptr=self.a.ctypes.data))

    def reshape(self, *shape):
        return FakeArray(self.a.reshape(*shape))

    def __getitem__(self, index):
        return FakeArray(self.a[index])

    def fill(self, value):
        self.a.fill(value)

    def set(self, host, stream=None):
        self.a[...] = host

    def get(self, stream=None):
        return self.a.copy()


class FakeStream:
    ptr = 1234

    def __init__(self, non_blocking=False):
        self.waited: list = []
        self.capturing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def is_capturing(self):
        return self.capturing

    def begin_capture(self):
        self.capturing = True

    def end_capture(self):
        self.capturing = False
        return FakeGraph()

    def wait_event(self, event):
        self.waited.append(event)


class FakeGraph:
    def __init__(self):
        self.launched_on: list = []

    def launch(self, stream=None):
        self.launched_on.append(stream)


class FakePool:
    def malloc(self, size):
        return size


class FakeEvent:
    def __init__(self, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class FakeKernel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        LAUNCHES.append((self.name, tuple(grid), tuple(block), tuple(args), shared_mem))


class FakeModule:
    def __init__(self, code, options, name_expressions):
        assert "#include" not in code and tuple(options) == plan.COMPILE_OPTIONS
        self.names = set(name_expressions)

    def get_function(self, name):
        assert name in self.names, f"{name} is not instantiated"
        return FakeKernel(name)


class FakePinned(bytearray):
    ptr = 0xDEAD0000

    def __init__(self, n):
        super().__init__(n)


@contextmanager
def _nothing(*args, **kwargs):
    yield


def _fake_cupy() -> types.ModuleType:
    props = {"name": b"Fake H100", "major": 9, "minor": 0, "multiProcessorCount": 132,
             "sharedMemPerBlockOptin": 227 * 1024, "l2CacheSize": 50 << 20}
    rt = types.SimpleNamespace(
        getDeviceCount=lambda: 1, getDeviceProperties=lambda gpu: props,
        deviceCanAccessPeer=lambda a, b: 0, deviceEnablePeerAccess=lambda gpu: None,
        memcpyAsync=lambda dst, src, nbytes, kind, stream: COPIES.append(nbytes),
        memcpyPeerAsync=lambda *a: None, memcpyDeviceToDevice=3,
        # fills for real (the arrays are host memory): empty() poisons by a memset
        memsetAsync=lambda ptr, value, nbytes, stream: ctypes.memset(ptr, value, nbytes),
        runtimeGetVersion=lambda: 12090, CUDARuntimeError=RuntimeError)
    cuda = types.SimpleNamespace(
        runtime=rt, driver=types.SimpleNamespace(CUDADriverError=RuntimeError),
        Device=_nothing, Stream=FakeStream, Event=FakeEvent,
        get_elapsed_time=lambda a, b: 1.0, MemoryPool=FakePool,
        alloc_pinned_memory=lambda n: FakePinned(n))
    allocator = {"current": "default"}
    cuda.get_allocator = lambda: allocator["current"]
    cuda.set_allocator = lambda a: allocator.update(current=a)
    module = types.ModuleType("cupy")
    module.__version__ = "fake"
    module.cuda = cuda
    module.RawModule = FakeModule
    module.empty = lambda shape, dtype=np.float32: FakeArray(np.empty(shape, dtype))
    module.zeros = lambda shape, dtype=np.float32: FakeArray(np.zeros(shape, dtype))
    module.empty_like = lambda arr: FakeArray(np.empty_like(arr.a))
    return module


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(runtime, "driver_missing", lambda: None)
    LAUNCHES.clear()
    b = CupyBackend()
    b.devices(2)
    return b


# -- the kernels' signatures, parsed from the sources --------------------------------------------
STORAGE = {"float": "float32", "f16_t": "float16", "bf16_t": "uint16", "int": "int32",
           "float2": "float32"}
SCALARS = {"long long": "int64", "int": "int32", "float": "float32", "double": "float64"}


def _split_template(expr: str) -> tuple[str, list[str]]:
    if "<" not in expr:
        return expr, []
    base, rest = expr.split("<", 1)
    return base, [a.strip() for a in rest.rstrip(">").split(",")]


def signature(file_name: str, expr: str) -> list[str]:
    """Parameter kinds of kernel expr: "ptr:<element dtype>" or a scalar dtype name."""
    source = plan.load_source(file_name)
    base, targs = _split_template(expr)
    match = re.search(r"__global__[^;{]*?\b" + base + r"\s*\(([^)]*)\)", source, re.S)
    assert match, f"{base} not found in {file_name}"
    head = source[: match.start()]
    template = re.findall(r"template\s*<([^>]*)>", head[-300:])
    names = [t.split()[-1] for t in template[-1].split(",")] if targs else []
    subst = dict(zip(names, targs))
    kinds = []
    for param in match.group(1).split(","):
        words = [w for w in re.split(r"[\s*]+", param) if w and w not in ("const", "volatile",
                                                                          "__restrict__")]
        ctype = " ".join(words[:-1])
        ctype = subst.get(ctype, ctype)
        kinds.append(f"ptr:{STORAGE[ctype]}" if "*" in param else SCALARS[ctype])
    return kinds


def _kind(arg) -> str:
    if isinstance(arg, FakeArray):
        return f"ptr:{arg.dtype.name}"
    if isinstance(arg, np.uint64):
        return "ptr:raw"
    return np.asarray(arg).dtype.name


def _file_of(expr: str) -> str:
    for file_name, names in plan.module_kernels().items():
        if expr in names:
            return file_name
    raise AssertionError(f"{expr} is in no module")


def assert_launches_match_signatures(expected_kernels: set[str]) -> None:
    assert {name.split("<")[0] for name, *_ in LAUNCHES} >= expected_kernels
    for name, grid, block, args, shared in LAUNCHES:
        want = signature(_file_of(name), name)
        got = [_kind(a) for a in args]
        assert len(got) == len(want), f"{name}: {len(got)} args for {len(want)} params"
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w or (g == "ptr:raw" and w.startswith("ptr:")), \
                f"{name} parameter {i}: passed {g}, kernel takes {w}"
        plan.check_launch(name, plan.Launch(grid, block, shared), 227 * 1024)


# -- the tests ---------------------------------------------------------------------------------
def test_signature_parser_reads_templates():
    assert signature("copies.cu", "cpy_kernel<bf16_t, float>")[:3] == [
        "ptr:uint16", "ptr:float32", "int64"]
    kinds = signature("attention.cu", "attn_fwd<f16_t, 16>")
    assert kinds[0] == "ptr:float16" and kinds[-1] == "int64" and "float32" in kinds


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["normal", "neox", "mrope"])
def test_rope_launches(backend, dtype, mode):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    dt = np.dtype(dtype)
    x = backend.to_device(np.zeros((5, 2, 64), dt))
    rows = 4 if mode == "mrope" else 1
    pos = backend.to_device(np.zeros((rows, 5), np.int32).reshape((4, 5) if rows == 4 else 5))
    ff = backend.to_device(np.ones(16, np.float32))
    p = RopeParams(n_dims=32, mode=mode, ext_factor=1.0, n_ctx_orig=4096,
                   sections=(4, 6, 6, 0) if mode == "mrope" else None)
    backend.rope(x, pos, backend.empty(x.shape, dt), p, freq_factors=ff)
    backend.rope(x, pos, backend.empty(x.shape, dt), p)
    assert_launches_match_signatures({"rope_kernel", "rope_cache_fill"})
    assert sum(name == "rope_cache_fill" for name, *_ in LAUNCHES) == 2  # ff is in the key
    backend.rope(x, pos, backend.empty(x.shape, dt), p, freq_factors=ff)
    assert sum(name == "rope_cache_fill" for name, *_ in LAUNCHES) == 2  # now a hit


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n_q,n_kv,hs", [(1, 8192, (128, 128)), (7, 100, (64, 64)),
                                         (3, 50, (576, 512))])
def test_contiguous_attention_launches(backend, dtype, n_q, n_kv, hs):
    import ml_dtypes  # noqa: F401

    dt = np.dtype(dtype)
    q = backend.to_device(np.zeros((n_q, 4, hs[0]), dt))
    k = backend.to_device(np.zeros((n_kv, 2, hs[0]), dt))
    v = backend.to_device(np.zeros((n_kv, 2, hs[1]), dt))
    mask = backend.to_device(np.zeros((n_q, n_kv), np.float32))
    sinks = backend.to_device(np.zeros(4, np.float32))
    lse = backend.to_device(np.zeros((n_q, 4), np.float32))
    out = backend.empty((n_q, 4, hs[1]), dt)
    backend.attention(q, k, v, out, AttnParams(scale=0.1, causal=True, max_bias=8.0),
                      mask=mask, sinks=sinks, lse=lse)
    kernels = {"attn_fwd", "attn_merge"} if n_kv == 8192 else {"attn_fwd"}
    assert_launches_match_signatures(kernels)


def test_paged_attention_launches(backend):
    q = backend.to_device(np.zeros((3, 4, 64), np.float16))
    cache = backend.to_device(np.zeros((9, 16, 2, 64), np.float16))
    paged = PagedKV(backend.to_device(np.zeros((3, 4), np.int32)),
                    backend.to_device(np.full(3, 60, np.int32)),
                    backend.to_device(np.arange(4, dtype=np.int32)))
    backend.attention(q, cache, cache, backend.empty((3, 4, 64), np.float16),
                      AttnParams(scale=0.1, causal=True, window=8), paged=paged)
    assert_launches_match_signatures({"attn_fwd"})


@pytest.mark.parametrize("deltas_width", [1, 16])
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_kv_rotate_launches(backend, deltas_width, layout):
    cache = backend.to_device(np.zeros((6, 16, 2, 64), np.float32))
    blocks = backend.to_device(np.array([1, 4], np.int32))
    deltas = backend.to_device(np.ones((2, deltas_width), np.int32))
    backend.kv_rotate(cache, blocks, deltas, backend.to_device(np.zeros((8, 64), np.float32)),
                      layout)
    assert_launches_match_signatures({"kv_rotate_kernel"})
    per_token, interleaved = (int(a) for a in LAUNCHES[-1][3][-3:-1])
    assert per_token == (deltas_width == 16) and interleaved == (layout == "interleaved")


def test_rows_and_cpy_launches(backend):
    src = backend.to_device(np.zeros((3, 4, 8), np.float32))
    dst = backend.to_device(np.zeros((10, 4, 8), np.float16))
    backend.set_rows(dst, src, backend.to_device(np.array([0, -1, 9], np.int32)))
    backend.get_rows(dst, backend.to_device(np.array([2, 2], np.int32)),
                     backend.empty((2, 4, 8), np.float32))
    backend.cpy(src, backend.empty((2, 3, 8), np.float16), (1, 0, 2), 2)
    backend.cpy(src, backend.empty((3, 4, 8), np.float16), (0, 1, 2), 1)
    # a source whose offsets pass 2**31 elements (never read: the fake runs no kernel)
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (2, 4), (4 << 31, 4))
    far = runtime.GpuArray(FakeArray(huge), np.dtype(np.float32), src.device, None)
    backend.cpy(far, backend.empty((2, 4), np.float32), (0, 1), 1)
    assert_launches_match_signatures({"set_rows_kernel", "get_rows_kernel", "cpy_kernel_i32",
                                      "cpy_contiguous", "cpy_kernel"})
    names = [name for name, *_ in LAUNCHES]
    assert names == ["set_rows_kernel<float, f16_t>", "get_rows_kernel<f16_t, float>",
                     "cpy_kernel_i32<float, f16_t>", "cpy_contiguous<float, f16_t>",
                     "cpy_kernel<float, float>"]


def test_delay_queues_a_spin_kernel_before_each_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(runtime, "driver_missing", lambda: None)
    LAUNCHES.clear()
    b = CupyBackend(delay=True, delay_max_ms=1.0)
    COPIES.clear()
    src = b.to_device(np.zeros(4, np.float32))
    b.cpy(src, b.empty((4,), np.float16), (0,), 1)
    assert [name for name, *_ in LAUNCHES] == ["spin_kernel", "cpy_contiguous<float, f16_t>"]
    assert_launches_match_signatures({"spin_kernel"})
    assert 0 <= int(LAUNCHES[0][3][0]) <= 1_000_000
    b.cpy(src, b.empty((4,), np.float32), (0,), 1)  # a memcpy: delayed all the same
    assert [name for name, *_ in LAUNCHES][2:] == ["spin_kernel"] and COPIES == [16]


def test_arrays_stay_on_their_logical_device(backend):
    a = backend.to_device(np.zeros(4, np.float32), 0)
    b = backend.to_device(np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="lives on cupy:1.*copy_async"):
        backend.cpy(a, b, (0,), 1)
    moved = backend.copy_async(a, 1)
    assert moved.device is backend.device(1) and moved.shape == (4,)
    backend.cpy(moved, b, (0,), 1)
    assert backend.device(1).stream.cupy_stream.waited  # the destination waited for the copy
    with pytest.raises(ValueError, match="int32"):
        backend.get_rows(a.__class__(a.data, np.dtype(np.float32), a.device),
                         backend.to_device(np.zeros(1, np.int64)),
                         backend.empty((1,), np.float32))


def test_logical_devices_share_gpus_round_robin(backend):
    assert [d.gpu for d in backend.devices(3)] == [0, 0, 0]
    assert len({id(d.stream) for d in backend.devices(3)}) == 3  # one stream each


def test_scenario_primitives_launch(backend):
    a = backend.to_device(np.zeros((5, 8), np.float32))
    w = backend.to_device(np.zeros((8, 3), np.float32))
    out = backend.empty((5, 3), np.float32)
    backend.matmul(a, w, out)
    backend.rms_norm(a, backend.to_device(np.ones(8, np.float32)), backend.empty((5, 8),
                                                                                np.float32), 1e-6)
    backend.add(a, a, a)
    o, lse = backend.empty((2, 4, 8), np.float32), backend.empty((2, 4), np.float32)
    backend.attn_merge(o, lse, backend.empty((2, 4, 8), np.float32),
                       backend.empty((2, 4), np.float32))
    assert_launches_match_signatures({"matmul_f32", "rms_norm_f32", "add_f32",
                                      "merge_partial_f32"})
    with pytest.raises(ValueError, match="do not chain"):
        backend.matmul(a, a, out)
    with pytest.raises(ValueError, match="must be f32"):
        backend.add(*(backend.to_device(np.zeros(3, np.float16)),) * 3)


def test_write_converts_and_refreshes_the_fingerprint(backend):
    ff = backend.to_device(np.ones(4, np.float32))
    before = ff.fingerprint
    backend.write(ff, np.arange(4))  # int64 host data, converted to f32
    assert ff.data.a.tolist() == [0.0, 1.0, 2.0, 3.0] and ff.fingerprint != before
    with pytest.raises(ValueError, match="host shape"):
        backend.write(ff, np.zeros(5))
    assert backend.device(0).staging  # pinned copies of the queued uploads...
    backend.synchronize(0)
    assert not backend.device(0).staging  # ...released once the device is drained


def test_hold_launches_a_spin_on_the_gate_flag(backend):
    gate = backend.hold(backend.stream(1))
    assert_launches_match_signatures({"hold_kernel"})
    assert int(LAUNCHES[-1][3][0]) == gate.device_pointer
    assert gate._flag[0] == 0
    gate.release()
    assert gate._flag[0] == 1


def test_capture_forks_and_joins_every_stream_and_uses_a_private_pool(backend):
    import cupy  # the fake

    streams = [backend.stream(0), backend.stream(1)]
    backend.capture_begin(streams)
    assert cupy.cuda.get_allocator() != "default"  # capture allocations: the graph's pool
    assert streams[1].cupy_stream.waited  # joined the capture through an event
    x = backend.to_device(np.zeros(4, np.float32), 0)
    moved = backend.copy_async(x, 1)
    backend.add(moved, moved, moved)
    with pytest.raises(RuntimeError, match="capture is already in progress"):
        backend.capture_begin(streams)
    graph = backend.capture_end(streams)
    assert cupy.cuda.get_allocator() == "default"
    assert len(streams[0].cupy_stream.waited) >= 1  # the origin joined stream 1 back
    backend.replay(graph)
    assert graph.graph.launched_on == [streams[0].cupy_stream]
    with pytest.raises(TypeError):
        backend.replay(object())


def test_split_kv_inside_a_capture_gets_its_own_workspace(backend):
    q = backend.to_device(np.zeros((1, 4, 64), np.float32))
    k = backend.to_device(np.zeros((8192, 4, 64), np.float32))
    out = backend.empty((1, 4, 64), np.float32)
    backend.attention(q, k, k, out, AttnParams(scale=0.1))
    cached = backend.device(0).workspaces[id(backend.stream(0))]
    backend.capture_begin(backend.stream(0))
    backend.attention(q, k, k, out, AttnParams(scale=0.1))
    backend.capture_end(backend.stream(0))
    captured = [launch for launch in LAUNCHES if launch[0].startswith("attn_merge")][-1]
    assert captured[3][0].a.base is not cached.a  # not the buffer later calls will reuse
    assert backend.device(0).workspaces[id(backend.stream(0))] is cached


@pytest.mark.parametrize("split", ["none", "layer", "head", "ring", "zigzag", "stripe"])
def test_every_scenario_split_drives_the_backend_through_valid_launches(backend, split):
    """The scenario engine (graph reuse, eviction, delays on) calls only what this backend
    accepts, and every launch it causes matches its kernel.  The fake computes nothing, so the
    results themselves are not judged here (test_cupy_backend.py judges them, on the emulator
    and on a GPU)."""
    from opbench.harness.scenario.config import ScenarioSpec
    from opbench.harness.scenario.judge import run_scenario, scenario_options

    spec = ScenarioSpec(split=split, devices=1 if split == "none" else 3, graph_reuse=True,
                        evict=True, delay=True, layers=3, steps=3)
    b = CupyBackend(**scenario_options(spec))
    result = run_scenario(b, spec)
    assert result.error is None
    assert_launches_match_signatures({"rope_kernel", "attn_fwd", "set_rows_kernel",
                                      "matmul_f32", "spin_kernel"})


def test_timer_flush_and_strided_readback(backend):
    backend.flush_l2(0)
    assert backend.runtime._flush_buffers[0].nbytes == plan.l2_flush_bytes(50 << 20)
    LAUNCHES.clear()
    assert backend.timer(0)(lambda: None) == 1e6  # the fake's 1 ms, in ns
    # the host's enqueue hides behind a spin queued before the start event
    spins = [(name, int(args[0])) for name, _, _, args, _ in LAUNCHES]
    assert spins[0] == ("spin_kernel", FIRST_SPIN_NS)
    assert {name for name, _ in spins} == {"spin_kernel"}  # (longer ones if the fake was slow)
    store = backend.to_device(np.zeros((4, 2, 3), np.float32))
    LAUNCHES.clear()
    host = backend.to_host(store[:, 0])  # not contiguous: gathered by a strided copy first
    assert host.shape == (4, 3)
    assert [name for name, *_ in LAUNCHES] == ["cpy_kernel_i32<float, float>"]
    assert_launches_match_signatures({"cpy_kernel_i32"})
