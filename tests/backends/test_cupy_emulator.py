"""The CPU emulator of the CUDA kernels (opbench/backends/cupy/emulator): its CUDA semantics
(barriers, shuffles, shared memory, conversions) and its cupy API (launch checks, streams,
events, graph capture), each against a behaviour a wrong emulator would get wrong."""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
import pytest

from opbench.backends.cupy import plan
from opbench.backends.cupy.emulator import CupyEmulatorBackend, build
from opbench.backends.cupy.emulator import fake_cupy as cp

pytestmark = pytest.mark.skipif(not CupyEmulatorBackend.available()[0],
                                reason=CupyEmulatorBackend.available()[1])

COMMON = (plan.KERNEL_DIR / plan.COMMON_HEADER).read_text().replace("#pragma once\n", "")

TEST_KERNELS = COMMON + r"""
extern "C" __global__ void convert_f16(const float* x, unsigned short* bits, float* back, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        f16_t h = from_f32<f16_t>(x[i]);
        bits[i] = h.bits;
        back[i] = to_f32(h);
    }
}
extern "C" __global__ void convert_bf16(const float* x, unsigned short* bits, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        bits[i] = from_f32<bf16_t>(x[i]).bits;
}
// Block sums: warp shuffles, then one partial per warp through dynamic shared memory.
extern "C" __global__ void block_sum(const int* x, int* out, int n) {
    extern __shared__ int partial[];
    int v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[(long long)blockIdx.x * n + i];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += partial[w];
        out[blockIdx.x] = s;
    }
}
// Each thread reads its neighbour's shared value; `barrier` says whether it waits first.
extern "C" __global__ void neighbour(const float* x, float* out, int barrier) {
    __shared__ float tile[64];
    tile[threadIdx.x] = x[threadIdx.x];
    if (barrier) __syncthreads();
    out[threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x];
}
// Half of each warp shuffles while the other half waits at __syncthreads.
extern "C" __global__ void divergent(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
// Lanes 16..31 exit; lane 0 then reads lane 16.
extern "C" __global__ void shuffle_exited(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}
extern "C" __global__ void add_one(float* x, long long n) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) x[i] += 1.0f;
}
extern "C" __global__ void take_double(float* out, double v) { out[0] = (float)v; }
"""
NAMES = ["convert_f16", "convert_bf16", "block_sum", "neighbour", "divergent",
         "shuffle_exited", "add_one", "take_double"]


@pytest.fixture(scope="module")
def module():
    return cp.RawModule(code=TEST_KERNELS, name_expressions=NAMES)


def _device(host: np.ndarray) -> cp.ndarray:
    """A device copy of ``host``, complete on return: ``set`` is queued on the current stream,
    which the tests' non-blocking streams do not wait for (a kernel once read the NaN bytes of
    the fresh allocation in CI, before the copy ran)."""
    arr = cp.empty(host.shape, host.dtype)
    arr.set(np.ascontiguousarray(host))
    cp.current_stream().synchronize()
    return arr


def _run(module, name, grid, block, args, shared_mem=0, stream=None):
    stream = stream or cp.Stream(non_blocking=True)
    module.get_function(name)(grid, block, args, shared_mem=shared_mem, stream=stream)
    return stream


def _special_floats(seed: int) -> np.ndarray:
    """Random float32 bit patterns plus the edge values where rounding rules differ."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    random = bits.view(np.float32)
    random = random[np.isfinite(random)]
    f16_edges = np.array([65504.0, 65519.99, 65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.9802322e-08,
                          1.0 + 2**-11, 1.0 + 3 * 2**-11, -0.0, np.inf, -np.inf], np.float32)
    ties = (np.arange(1, 2000, dtype=np.uint32) << 13 | 0x1000).view(np.float32)  # f16 ties
    bf16_ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
    return np.concatenate([random, f16_edges, ties, bf16_ties, -ties])


def test_half_conversions_round_like_numpy(module):
    x = _special_floats(seed=3)
    n = x.size
    bits, back, bf = (cp.empty(n, np.uint16), cp.empty(n, np.float32), cp.empty(n, np.uint16))
    xs = _device(x)
    s = _run(module, "convert_f16", 64, 128, (xs, bits, back, np.int32(n)))
    _run(module, "convert_bf16", 64, 128, (xs, bf, np.int32(n)), stream=s)
    s.synchronize()
    with np.errstate(over="ignore"):  # values past 65504 round to inf, as they must
        want16 = x.astype(np.float16)
    np.testing.assert_array_equal(bits.get(), want16.view(np.uint16))
    np.testing.assert_array_equal(back.get(), want16.astype(np.float32))
    np.testing.assert_array_equal(bf.get(), x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_shuffles_and_dynamic_shared_memory_sum_exactly(module):
    rng = np.random.default_rng(5)
    x = rng.integers(-1000, 1000, (6, 1000), dtype=np.int32)
    out = cp.empty(6, np.int32)
    _run(module, "block_sum", 6, 256, (_device(x), out, np.int32(1000)),
         shared_mem=8 * 4).synchronize()
    np.testing.assert_array_equal(out.get(), x.sum(axis=1))


def test_missing_barrier_reads_unwritten_shared_memory(module):
    x = np.arange(64, dtype=np.float32)
    out = cp.empty(64, np.float32)
    _run(module, "neighbour", 1, 64, (_device(x), out, np.int32(1))).synchronize()
    np.testing.assert_array_equal(out.get(), np.roll(x, -1))
    _run(module, "neighbour", 1, 64, (_device(x), out, np.int32(0))).synchronize()
    racy = out.get()
    # thread t runs to its end before t+1 writes: every read but the wrap-around is NaN
    assert np.isnan(racy[:-1]).all() and racy[-1] == 0.0


def test_divergent_barriers_are_an_error_not_a_hang(module):
    stream = _run(module, "divergent", 1, 64, (cp.empty(64, np.float32),))
    with pytest.raises(cp.CUDARuntimeError, match="barrier divergence"):
        stream.synchronize()
    stream.synchronize()  # reported once, then cleared


def test_shuffle_from_an_exited_lane_is_an_error(module):
    stream = _run(module, "shuffle_exited", 1, 32, (cp.empty(32, np.float32),))
    with pytest.raises(cp.CUDARuntimeError, match="reads lane 16, which .* has exited"):
        stream.synchronize()


def test_arguments_are_checked_against_the_kernel_parameters(module):
    out = cp.empty(1, np.float32)
    f = module.get_function("take_double")
    with pytest.raises(cp.CUDADriverError, match="argument 1 is 4 bytes .* parameter is 8"):
        f(1, 1, (out, np.float32(2.5)))
    with pytest.raises(cp.CUDADriverError, match="takes 2 arguments, got 1"):
        f(1, 1, (out,))
    with pytest.raises(cp.CUDADriverError, match="numpy scalar or array, not float"):
        f(1, 1, (out, 2.5))
    with pytest.raises(cp.CUDADriverError, match="not device memory"):
        f(1, 1, (np.zeros(1, np.float32), np.float64(2.5)))
    stream = cp.Stream()
    f(1, 1, (out, np.float64(2.5)), stream=stream)
    stream.synchronize()
    assert out.get()[0] == 2.5


def test_launch_limits_are_the_drivers(module):
    f = module.get_function("block_sum")
    args = (cp.empty(1, np.int32), cp.empty(1, np.int32), np.int32(1))
    with pytest.raises(cp.CUDADriverError, match="grid"):
        f(1, 2048, args)
    with pytest.raises(cp.CUDADriverError, match="dynamic shared memory"):
        f(1, 32, args, shared_mem=64 * 1024)  # over 48 KiB without the opt-in
    f.max_dynamic_shared_size_bytes = 64 * 1024
    stream = cp.Stream()
    f(1, 32, args, shared_mem=64 * 1024, stream=stream)
    stream.synchronize()


def test_raw_pointers_outside_allocations_are_refused():
    src, stream = cp.zeros(4, np.float32), cp.Stream()
    with pytest.raises(cp.CUDARuntimeError, match="outside every live allocation"):
        cp.runtime.memcpyAsync(src.data.ptr + 8, src.data.ptr, 16, 3, stream.ptr)
    with pytest.raises(cp.CUDARuntimeError, match="outside every live allocation"):
        cp.runtime.memsetAsync(src.data.ptr, 0, 17, stream.ptr)


def test_streams_run_concurrently_and_events_order_them(module):
    gate = cp.alloc_pinned_memory(4)
    flag = np.frombuffer(gate, np.int32, 1)
    flag[0] = 0
    held, free = cp.Stream(), cp.Stream()
    hold = cp.RawModule(code=plan.load_source("runtime.cu"), name_expressions=["hold_kernel"])
    hold.get_function("hold_kernel")(1, 1, (np.uint64(gate.ptr),), stream=held)
    x = cp.zeros(8, np.float32)
    _run(module, "add_one", 1, 32, (x, np.int64(8)), stream=held)
    done = cp.Event()
    done.record(held)
    _run(module, "add_one", 1, 32, (x, np.int64(8)), stream=free)
    free.synchronize()  # the other stream is not blocked by the held one
    assert x.get(stream=free)[0] == 1.0
    after = cp.Stream()
    after.wait_event(done)
    y = cp.zeros(8, np.float32)
    _run(module, "add_one", 1, 32, (y, np.int64(8)), stream=after)
    time.sleep(0.05)
    assert not done.query()  # still held: nothing after the wait has run either
    flag[0] = 1
    after.synchronize()
    assert done.query() and x.get(stream=held)[0] == 2.0 and y.get(stream=after)[0] == 1.0


def test_capture_records_instead_of_running_and_replays(module):
    origin, other = cp.Stream(), cp.Stream()
    x = cp.zeros(4, np.float32)
    module.get_function("add_one")  # kernels load before a capture, as a GPU needs
    origin.begin_capture()
    fork = cp.Event()
    fork.record(origin)
    other.wait_event(fork)
    _run(module, "add_one", 1, 32, (x, np.int64(4)), stream=other)
    join = cp.Event()
    join.record(other)
    origin.wait_event(join)
    with pytest.raises(cp.CUDARuntimeError, match="capturing"):
        origin.synchronize()
    graph = origin.end_capture()
    assert x.get(stream=origin)[0] == 0.0  # recorded, not run
    for _ in range(3):
        graph.launch(stream=origin)
    assert x.get(stream=origin)[0] == 3.0 and not other.is_capturing()


def test_capture_refuses_unjoined_streams_and_outside_events(module):
    origin, other = cp.Stream(), cp.Stream()
    before = cp.Event()
    before.record(other)
    module.get_function("add_one")
    origin.begin_capture()
    with pytest.raises(cp.CUDARuntimeError, match="outside the capture"):
        origin.wait_event(before)
    fork = cp.Event()
    fork.record(origin)
    other.wait_event(fork)
    _run(module, "add_one", 1, 32, (cp.zeros(4, np.float32), np.int64(4)), stream=other)
    with pytest.raises(cp.CUDARuntimeError, match="Unjoined"):
        origin.end_capture()
    assert not origin.is_capturing() and not other.is_capturing()


def test_a_kernel_loaded_first_inside_a_capture_is_refused():
    fresh = cp.RawModule(code=TEST_KERNELS, name_expressions=NAMES)  # nothing loaded yet
    stream = cp.Stream()
    fresh.get_function("add_one")
    stream.begin_capture()
    fresh.get_function("add_one")  # loaded before the capture: fine
    with pytest.raises(cp.CUDARuntimeError, match="first load of neighbour"):
        fresh.get_function("neighbour")
    with cp.Device(1):  # another device's context loads freely
        cp.RawModule(code=TEST_KERNELS, name_expressions=NAMES).get_function("neighbour")
    stream.end_capture()
    fresh.get_function("neighbour")  # after the capture: loads


def test_work_after_an_error_is_skipped_until_reported(module):
    stream, x = cp.Stream(), cp.zeros(4, np.float32)
    _run(module, "divergent", 1, 64, (cp.empty(64, np.float32),), stream=stream)
    _run(module, "add_one", 1, 32, (x, np.int64(4)), stream=stream)
    with pytest.raises(cp.CUDARuntimeError, match="kernel divergent"):
        stream.synchronize()
    assert x.get(stream=stream)[0] == 0.0
    _run(module, "add_one", 1, 32, (x, np.int64(4)), stream=stream)
    assert x.get(stream=stream)[0] == 1.0


def test_build_errors_carry_the_compiler_log():
    with pytest.raises(build.EmulatorBuildError, match="not_declared"):
        build.load_kernels('extern "C" __global__ void k() { not_declared(); }', ["k"], "bad.cu")


def test_backend_reports_emulation_and_refuses_perf():
    from opbench.harness.ops import SPECS
    from opbench.perf.run import refusal

    backend = CupyEmulatorBackend()
    try:
        info = backend.info()
        case = SPECS["CPY"].quick_cases()[0]
        assert info["emulated"] is True and "g++" in info["compiler"]
        assert "emulat" in refusal(backend, case)
    finally:
        backend.close()
