"""The cupy backend: every op against the float64 oracles (through the harness's own
run_case: poisoned outputs, guard regions, tolerance tables), plus the runtime features the
scenarios rely on.  Each test runs twice: on a real GPU (``gpu``; skips with
``CupyBackend.available()``'s reason where there is none) and on the CPU emulator
(``emulator``: the same backend code and .cu kernels, compiled by g++), which runs in CI.
The whole-table and whole-matrix tests (``slow``) run on a GPU only: on the emulator use
``opbench test -b cupy-emu`` and ``opbench scenario -b cupy-emu --matrix``.
"""

from __future__ import annotations

import dataclasses
import time

import ml_dtypes
import numpy as np
import pytest

from opbench.backends.cupy import CupyBackend, plan
from opbench.backends.cupy.emulator import CupyEmulatorBackend
from opbench.backends.cupy.runtime import DeviceError
from opbench.harness.cases import quick_subset
from opbench.harness.contracts import run_copy_async_contract
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.judge import run_scenario, scenario_options
from opbench.harness.scenario.matrix import matrix, unsupported
from opbench.protocol import AttnParams, PagedKV, RopeParams, numpy_dtype
from opbench.reference import attention as attn_ref
from opbench.reference import rope as rope_ref

AVAILABLE, WHY = CupyBackend.available()
EMULATED, EMULATED_WHY = CupyEmulatorBackend.available()
ON_GPU = pytest.param(CupyBackend, id="gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=f"cupy backend unavailable: {WHY}")])
ON_EMULATOR = pytest.param(CupyEmulatorBackend, id="emulator", marks=pytest.mark.skipif(
    not EMULATED, reason=f"cupy emulator unavailable: {EMULATED_WHY}"))

OPS = ["ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS", "CPY"]


@pytest.fixture(scope="module", params=[ON_GPU, ON_EMULATOR])
def backend_class(request):
    return request.param


@pytest.fixture(scope="module")
def backend(backend_class):
    b = backend_class(sync_each_launch=True)
    b.devices(2)
    yield b
    b.close()


def _run_all(backend, cases) -> list[str]:
    problems = []
    for case in cases:
        record = run_case(backend, case, device=backend.device(0), device_name="cupy:0")
        if record["status"] != "OK":
            problems.append(f"{case.id}: {record['status']} {record['reason']}")
    return problems


@pytest.mark.parametrize("op", OPS)
def test_quick_cases_match_the_oracles(backend, op):
    spec = SPECS[op]
    cases = quick_subset(spec.cases(), spec.variant_keys, extra=48, cost=spec.cost)
    problems = _run_all(backend, cases)
    assert not problems, f"{len(problems)}/{len(cases)} failed:\n" + "\n".join(problems[:10])


@pytest.mark.slow
@pytest.mark.parametrize("backend_class", [ON_GPU], indirect=True)
@pytest.mark.parametrize("op", OPS)
def test_every_case_matches_the_oracles(backend, op):
    problems = _run_all(backend, SPECS[op].cases())
    assert not problems, f"{len(problems)} failed:\n" + "\n".join(problems[:10])


def _rope(backend, x, pos, p, ff=None, device=0):
    dx = backend.to_device(x, device)
    out = backend.empty(x.shape, x.dtype, device)
    dff = None if ff is None else backend.to_device(ff, device)
    backend.rope(dx, backend.to_device(pos, device), out, p, freq_factors=dff)
    return backend.to_host(out)


def test_rope_cache_is_keyed_on_every_layer_parameter(backend_class):
    """Gemma-3 local/global layers on one device: the cache must hand each its own angles,
    bit-identical to the cache-off path, inside and beyond the cached rows."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (9, 4, 128)).astype(np.float32)
    pos = np.array([0, 5, 63, 64, 65, 1000, 4, 3, 2], np.int32)
    local = RopeParams(n_dims=128, mode="neox", freq_base=1e4)
    global_ = dataclasses.replace(local, freq_base=1e6, freq_scale=0.125)
    ff = rng.uniform(0.5, 4, 64).astype(np.float32)
    cached = backend_class(rope_cache_rows=64)
    uncached = backend_class(rope_cache=False)
    try:
        for p, f in [(local, None), (global_, None), (local, ff), (local, None)]:
            got = _rope(cached, x, pos, p, f)
            np.testing.assert_array_equal(got, _rope(uncached, x, pos, p, f))
            want = rope_ref.rope(x, pos, n_dims=128, mode="neox", freq_base=p.freq_base,
                                 freq_scale=p.freq_scale, freq_factors=f)
            np.testing.assert_allclose(got, want, atol=2e-5)
        assert len(cached.device(0).rope_tables) == 3
    finally:
        cached.close()
        uncached.close()


def test_graph_replay_reads_new_positions_and_lengths(backend):
    """Capture one decode step (RoPE + paged attention) on two streams, then replay it after
    write()-ing the next step's positions and sequence lengths into the same buffers."""
    rng = np.random.default_rng(1)
    n_seqs, heads, dim, block = 2, 4, 64, 16
    q = rng.uniform(-1, 1, (n_seqs, heads, dim)).astype(np.float16)
    k = rng.uniform(-1, 1, (8, block, heads, dim)).astype(np.float16)
    v = rng.uniform(-1, 1, (8, block, heads, dim)).astype(np.float16)
    table = np.array([[3, 1, 7, 0], [2, 6, 5, 4]], np.int32)
    p = RopeParams(n_dims=dim, mode="neox")
    args = {n: backend.to_device(a) for n, a in dict(q=q, k=k, v=v, table=table).items()}
    pos = backend.to_device(np.array([10, 20], np.int32))
    lens = backend.to_device(np.array([11, 21], np.int32))
    starts = backend.to_device(np.array([0, 1, 2], np.int32))
    roped, out = backend.empty(q.shape, q.dtype), backend.empty(q.shape, q.dtype)
    streams = [backend.stream(0), backend.stream(1)]

    def step():
        backend.rope(args["q"], pos, roped, p)
        backend.attention(roped, args["k"], args["v"], out, AttnParams(scale=0.125, causal=True),
                          paged=PagedKV(args["table"], lens, starts))
        backend.copy_async(out, 1)  # the second stream takes part through copy_async's events

    step()  # uncaptured first: modules loaded, RoPE table filled
    backend.synchronize()
    backend.capture_begin(streams)
    step()
    graph = backend.capture_end(streams)
    for new_pos in ([30, 40], [63, 17]):
        backend.write(pos, np.array(new_pos))
        backend.write(lens, np.array(new_pos) + 1)
        backend.replay(graph)
        got = backend.to_host(out)
        rq = rope_ref.rope(q, np.array(new_pos), n_dims=dim, mode="neox").astype(np.float16)
        want = attn_ref.paged_attention(rq, k, v, table, np.array(new_pos) + 1, np.ones(2, int),
                                        scale=0.125, causal=True)
        np.testing.assert_allclose(got.astype(np.float64), want, atol=5e-3)


def test_copy_async_contract(backend_class):
    fresh = backend_class()
    try:
        results = run_copy_async_contract(fresh)
    finally:
        fresh.close()
    assert all(message is None for message in results.values()), results


def test_copy_async_contract_under_delays(backend_class):
    delayed = backend_class(delay=True, delay_seed=3, delay_max_ms=2.0)
    try:
        results = run_copy_async_contract(delayed, seed=3)
    finally:
        delayed.close()
    assert all(message is None for message in results.values()), results


SMALL_MATRIX = [dict(split=split, devices=devices, graph_reuse=graph, evict=evict, delay=delay)
                for split in ("none", "layer", "head", "ring", "zigzag", "stripe")
                for devices in ([1] if split == "none" else [3])
                for graph, evict, delay in [(False, False, False), (True, True, True)]]


@pytest.mark.parametrize("axes", SMALL_MATRIX, ids=lambda a: ",".join(f"{k}={v}"
                                                                       for k, v in a.items()))
@pytest.mark.parametrize("rope_cache", [True, False])
def test_scenarios_match_the_float64_model(backend_class, axes, rope_cache):
    spec = ScenarioSpec(rope_cache=rope_cache, layers=6, steps=4, **axes)
    b = backend_class(**scenario_options(spec))
    try:
        assert unsupported(b, spec) is None
        result = run_scenario(b, spec)
    finally:
        b.close()
    assert result.ok, result.divergence or result.error


@pytest.mark.slow
@pytest.mark.parametrize("backend_class", [ON_GPU], indirect=True)
def test_full_scenario_matrix(backend_class):
    failures = []
    for spec in matrix():
        b = backend_class(**scenario_options(spec))
        try:
            result = run_scenario(b, spec)
        finally:
            b.close()
        if not result.ok:
            failures.append(f"{spec.id}: {result.divergence or result.error}")
    assert not failures, "\n".join(failures[:10])


def _illegal_in_capture(backend_class):
    """The backend with one op that synchronizes its stream while the stream captures: a
    call CUDA refuses inside a capture (the emulator too), made by the attention."""

    class Illegal(backend_class):
        def attention(self, q, *args, **kwargs):
            stream = q.device.stream.cupy_stream
            if stream.is_capturing():
                stream.synchronize()
            return super().attention(q, *args, **kwargs)

    return Illegal


GRAPH_SPEC = ScenarioSpec(split="layer", devices=2, graph_reuse=True, layers=2, steps=2)


def test_an_op_failing_inside_a_capture_leaves_no_capture_open(backend_class):
    b = _illegal_in_capture(backend_class)(**scenario_options(GRAPH_SPEC))
    try:
        with pytest.raises(Exception, match="capturing"):
            run_scenario(b, GRAPH_SPEC)
        assert b.runtime._capture is None
        assert not any(d.stream.cupy_stream.is_capturing() for d in b.runtime.device_list())
        b.synchronize()  # the streams work again
    finally:
        b.close()


def test_close_ends_a_capture_left_open(backend_class):
    b = backend_class()
    x, pos = b.to_device(np.ones((2, 1, 4), np.float32)), b.to_device(np.array([1, 2], np.int32))
    out = b.empty((2, 1, 4), np.float32)
    b.rope(x, pos, out, RopeParams(n_dims=4))  # kernels load outside the capture
    b.capture_begin([b.stream(0)])
    b.rope(x, pos, out, RopeParams(n_dims=4))
    b.close()  # synchronizes every stream: refused while one still captured
    assert b.runtime._capture is None and b.runtime.device_list() == []


def test_a_kernel_first_used_inside_a_capture_is_loaded_before_it(backend_class):
    b = backend_class()  # a new backend: none of its kernels loaded yet
    host = np.random.default_rng(5).standard_normal((3, 2, 8)).astype(np.float32)
    try:
        x, pos = b.to_device(host), b.to_device(np.array([4, 9, 1], np.int32))
        out = b.empty(host.shape, np.float32)
        b.capture_begin([b.stream(0)])
        b.rope(x, pos, out, RopeParams(n_dims=8, mode="neox"))
        graph = b.capture_end([b.stream(0)])
        b.replay(graph)
        want = rope_ref.rope(host, np.array([4, 9, 1]), n_dims=8, mode="neox")
        np.testing.assert_allclose(b.to_host(out), want, rtol=1e-5, atol=1e-6)
    finally:
        b.close()


def test_buffers_made_inside_a_capture_are_poisoned_again_at_every_replay(backend_class):
    """A scenario makes each step's intermediates inside the capture: ``empty`` must not upload
    from the host there (CuPy refuses it on a capturing stream, as the emulator does), and its
    fill is part of the graph, so a replay that skips a write still shows NaN / -1."""
    b = backend_class()
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32]
    try:
        b.devices(1)
        b.capture_begin([b.stream(0)])
        with pytest.raises(RuntimeError, match="capturing"):
            b.to_device(np.ones(4, np.float32))  # a host upload: refused inside a capture
        made = [b.empty((3, 5), dt) for dt in dtypes]
        graph = b.capture_end([b.stream(0)])
        for arr, dt in zip(made, dtypes):
            b.write(arr, np.zeros((3, 5), dt))  # stale values a replay must overwrite
        b.replay(graph)
        for arr, dt in zip(made, dtypes):
            host = b.to_host(arr)
            if np.dtype(dt).kind == "i":
                assert (host == -1).all(), dt
            else:
                assert np.isnan(host.astype(np.float32)).all(), dt
    finally:
        b.close()


def test_a_scenario_failing_inside_a_capture_is_recorded_with_its_own_error(
        backend_class, monkeypatch):
    from opbench.harness.scenario import matrix as matrix_module

    b = _illegal_in_capture(backend_class)(**scenario_options(GRAPH_SPEC))
    monkeypatch.setattr(matrix_module, "open_backend", lambda ref, options: b)
    record = matrix_module.scenario_record("cupy-emu", GRAPH_SPEC, "run-1")
    assert record["status"] == "ERROR" and "capturing" in record["reason"]  # the op's error
    assert not any("close()" in error for error in record["errors"])
    assert b.runtime.device_list() == []  # closed


def test_a_close_failing_after_the_run_keeps_the_record(backend_class, monkeypatch):
    from opbench.harness.scenario import matrix as matrix_module

    spec = ScenarioSpec(split="none", devices=1, layers=2, steps=1)
    b = backend_class(**scenario_options(spec))
    close = b.close

    def failing_close():
        close()
        raise RuntimeError("driver gone")

    monkeypatch.setattr(b, "close", failing_close)
    monkeypatch.setattr(matrix_module, "open_backend", lambda ref, options: b)
    record = matrix_module.scenario_record("cupy-emu", spec, "run-1")
    assert record["status"] == "ERROR" and record["scenario"]["steps_run"] == 2
    assert record["errors"][-1] == "close() failed after the run: RuntimeError: driver gone"


def test_copy_async_waits_for_slow_source_work(backend_class):
    """A spin kernel delays the source stream; the copy must still see the finished data and
    the destination's next op must see the copy, with one synchronize at the end."""
    backend = backend_class()  # no sync_each_launch: the host must run ahead of the GPU
    try:
        backend.devices(2)
        src_host = (np.arange(1 << 20) % 2048).astype(np.float32)  # exact in f16
        src = backend.to_device(np.zeros_like(src_host), 0)
        staged = backend.to_device(src_host, 0)
        backend.inject_delay(backend.stream(0), 50.0)
        backend.cpy(staged, src, (0,), 1)  # queued behind 50 ms of spinning
        outs = []
        for copied in [backend.copy_async(src, 1) for _ in range(3)]:
            out = backend.empty(copied.shape, np.float16, 1)
            backend.cpy(copied, out, (0,), 1)
            outs.append(out)
        backend.synchronize()
        for out in outs:
            np.testing.assert_array_equal(backend.to_host(out), src_host.astype(np.float16))
    finally:
        backend.close()


def test_split_kv_decode_matches_the_oracle(backend):
    rng = np.random.default_rng(2)
    q = rng.uniform(-1, 1, (1, 8, 128)).astype(np.float32)
    k = rng.uniform(-1, 1, (8192, 2, 128)).astype(np.float32)
    v = rng.uniform(-1, 1, (8192, 2, 128)).astype(np.float32)
    sinks = rng.uniform(-2, 2, 8).astype(np.float32)
    assert plan.attn_plan(1, 8, 128, 128, 8192, decode=True,
                          num_sms=backend.device(0).num_sms).n_splits > 1
    d = {n: backend.to_device(a) for n, a in dict(q=q, k=k, v=v, sinks=sinks).items()}
    out, lse = backend.empty((1, 8, 128), np.float32), backend.empty((1, 8), np.float32)
    backend.attention(d["q"], d["k"], d["v"], out, AttnParams(scale=128**-0.5, causal=True),
                      sinks=d["sinks"], lse=lse)
    want, want_lse = attn_ref.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(backend.to_host(out), want, atol=1e-5)
    np.testing.assert_allclose(backend.to_host(lse), want_lse, atol=1e-5)


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [0, 3, 0], [2, 0, 1]],
                         ids=["one-each", "all-in-one", "uneven"])
def test_decode_blocks_of_several_heads_match_the_oracle(backend, q_lens):
    """A decode launch (as many query rows as sequences) takes the four query heads of a KV
    head in one block (plan.attn_heads_per_block), each head with its own ALiBi slope and
    sink; q_start lives on the device, so a sequence may still hold several rows or none."""
    rng = np.random.default_rng(6)
    n_seqs, heads, kv_heads, dim, block = 3, 8, 2, 64, 16
    seq_lens = np.array([37, 50, 20], np.int32)
    q = rng.uniform(-1, 1, (n_seqs, heads, dim)).astype(np.float32)
    k, v = (rng.uniform(-1, 1, (12, block, kv_heads, dim)).astype(np.float32) for _ in "kv")
    table = rng.permutation(12)[:12].reshape(n_seqs, 4).astype(np.int32)
    sinks = rng.uniform(-2, 2, heads).astype(np.float32)
    params = AttnParams(scale=0.125, causal=True, max_bias=8.0)
    assert plan.attn_plan(n_seqs, heads, dim, dim, 4 * block, n_seqs, decode=True,
                          kv_heads=kv_heads).heads_per_block == 4
    d = {n: backend.to_device(a) for n, a in dict(q=q, k=k, v=v, sinks=sinks).items()}
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    paged = PagedKV(backend.to_device(table), backend.to_device(seq_lens),
                    backend.to_device(starts))
    out, lse = backend.empty(q.shape, np.float32), backend.empty((n_seqs, heads), np.float32)
    backend.attention(d["q"], d["k"], d["v"], out, params, sinks=d["sinks"], lse=lse,
                      paged=paged)
    want, want_lse = attn_ref.paged_attention(q, k, v, table, seq_lens, np.array(q_lens),
                                              scale=0.125, causal=True, max_bias=8.0,
                                              sinks=sinks, return_lse=True)
    np.testing.assert_allclose(backend.to_host(out), want, atol=1e-5)
    np.testing.assert_allclose(backend.to_host(lse), want_lse, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_attention_stages_aligned_and_misaligned_keys(backend, dtype, offset):
    """K/V rows on 16-byte boundaries are staged 16 bytes a load, others an element a load
    (attention.cu's stage_rows): a view one element into its buffer takes the second path."""
    rng = np.random.default_rng(5)
    np_type = numpy_dtype(dtype)
    q = rng.uniform(-1, 1, (3, 4, 64)).astype(np_type)
    k, v = (rng.uniform(-1, 1, (45, 2, 64)).astype(np_type) for _ in range(2))

    def placed(host):  # host's values at element ``offset`` of a larger device buffer
        padded = np.concatenate([np.zeros(offset, np_type), host.reshape(-1)])
        return backend.view(backend.to_device(padded), offset, host.shape)

    out = backend.empty(q.shape, np_type)
    params = AttnParams(scale=0.125, causal=True)
    backend.attention(backend.to_device(q), placed(k), placed(v), out, params)
    want = attn_ref.attention(q, k, v, causal=True, scale=0.125)
    np.testing.assert_allclose(backend.to_host(out).astype(np.float64), want,
                               atol=1e-5 if dtype == "f32" else 2e-3)


def test_bad_slot_raises_on_synchronize(backend_class):
    plain = backend_class()  # no sync_each_launch: the error surfaces at synchronize()
    try:
        dst = plain.to_device(np.zeros((4, 8), np.float32))
        src = plain.to_device(np.ones((2, 8), np.float32))
        plain.set_rows(dst, src, plain.to_device(np.array([1, 9], np.int32)))
        with pytest.raises(DeviceError, match="slot was out of range"):
            plain.synchronize()
        plain.synchronize()  # the error word was reset
    finally:
        plain.close()


def test_timer_and_l2_flush(backend):
    x = backend.to_device(np.ones(1 << 22, np.float32))
    out = backend.empty((1 << 22,), np.float16)
    copy = lambda: backend.cpy(x, out, (0,), 1)  # noqa: E731
    backend.timer()(copy)  # untimed: the first call may compile the kernel
    backend.flush_l2()
    ns = backend.timer()(copy)
    # the emulator's time is a loaded CPU's, with no bound worth asserting
    assert 0 < ns and (backend.is_interpreter or ns < 1e9)


def test_the_timer_counts_the_gpu_work_not_the_hosts_enqueue(backend_class):
    """20 ms of host work before a small copy is kept apart (``launch_ns``), not timed as GPU
    work: a spin kernel covers it (the emulator's stream is a thread, its spin a sleep).  Not
    under ``sync_each_launch``, whose host waits out every kernel, the spin too."""
    backend = backend_class()
    try:
        x = backend.to_device(np.ones(1 << 12, np.float32))
        out = backend.empty((1 << 12,), np.float32)
        copy = lambda: backend.cpy(x, out, (0,), 1)  # noqa: E731
        copy()  # compiles the kernels outside the timer
        backend.timer()(copy)
        timer = backend.timer()

        def slow_enqueue() -> None:
            time.sleep(0.02)
            copy()

        timer.warm(slow_enqueue)  # as the perf harness's warm-up does: sets the spin
        timer.warm(slow_enqueue)
        ns = timer(slow_enqueue)
        assert timer.launch_ns[-1] >= 20_000_000 and timer.exposed == 0
        assert ns < 10_000_000
    finally:
        backend.close()


@pytest.mark.parametrize("src_type, dst_type, perm, view, path", [
    ("f32", "f32", (0, 1, 2), False, "memcpy"),
    ("bf16", "bf16", (0, 1, 2), False, "memcpy"),
    ("f32", "f16", (0, 1, 2), False, "cpy_contiguous"),
    ("f16", "bf16", (0, 1, 2), False, "cpy_contiguous"),
    ("f32", "f32", (1, 0, 2), False, "cpy_kernel_i32"),
    ("f32", "f32", (0, 1, 2), True, "cpy_kernel_i32"),  # a strided view: not contiguous
])
def test_cpy_takes_the_cheapest_path_and_moves_the_same_bits(backend, monkeypatch, src_type,
                                                             dst_type, perm, view, path):
    """A contiguous same-type CPY is a memcpy, a contiguous conversion needs no index math,
    the rest index in 32 bits here: all bit-for-bit what the strided kernel gives."""
    taken = []
    monkeypatch.setattr(backend.runtime, "copy_bytes",
                        lambda *a, real=backend.runtime.copy_bytes: (taken.append("memcpy"),
                                                                    real(*a)))
    monkeypatch.setattr(backend.launcher, "run", lambda t, f, name, *a, real=backend.launcher.run:
                        (taken.append(name.split("<")[0]), real(t, f, name, *a)))
    host = np.random.default_rng(9).uniform(-4, 4, (6, 4, 40 if view else 20)).astype(
        numpy_dtype(src_type))
    src = backend.to_device(host)
    if view:
        host, src = host[:, :, ::2], src[:, :, ::2]
    want = np.ascontiguousarray(host.transpose(perm)).astype(numpy_dtype(dst_type))
    out = backend.empty(want.shape, numpy_dtype(dst_type))
    backend.cpy(src, out, perm)
    got = backend.to_host(out)
    assert taken == [path]
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_the_device_declares_its_own_ceilings(backend):
    """perf judges a GPU against its own copy bandwidth and L2, not the host's calibration."""
    found = backend.device_ceilings(backend.device(0))
    assert set(found) == {"copy_gbps", "llc_bytes"} and found["copy_gbps"] > 0
    assert found["llc_bytes"] == backend.device(0).l2_bytes
    assert backend.device_ceilings(backend.device(0)) == found  # measured once


def test_bf16_round_trips_bit_exactly(backend):
    host = np.random.default_rng(3).uniform(-3, 3, 1000).astype(ml_dtypes.bfloat16)
    back = backend.to_host(backend.to_device(host))
    assert back.dtype == host.dtype
    np.testing.assert_array_equal(back.view(np.uint16), host.view(np.uint16))


@pytest.mark.skipif(not EMULATED, reason=f"cupy emulator unavailable: {EMULATED_WHY}")
def test_cold_timing_flushes_l2_before_every_sample_on_the_emulator(monkeypatch):
    """perf --cold's subject (timing.backend_subject) on cupy: the flush -- a memset over a
    buffer of twice the L2 -- is issued before each timed kernel, never during warm-up."""
    from opbench.backends.cupy.emulator import fake_cupy
    from opbench.perf import timing

    issued = []
    memset, launch = fake_cupy.cuda.runtime.memsetAsync, fake_cupy.Function.__call__
    monkeypatch.setattr(fake_cupy.cuda.runtime, "memsetAsync", lambda ptr, value, nbytes, s: (
        issued.append(("memset", nbytes)), memset(ptr, value, nbytes, s))[1])
    monkeypatch.setattr(fake_cupy.Function, "__call__", lambda self, *a, **k: (
        issued.append(("kernel", self.kernel.name)), launch(self, *a, **k))[1])
    b = CupyEmulatorBackend()
    try:
        dev = b.devices(1)[0]
        x = b.to_device(np.ones(1024, np.float32))
        out = b.empty((1024,), np.float16)
        fn = lambda: b.cpy(x, out, (0,), 1)  # noqa: E731
        subject = timing.backend_subject(b, fn, dev, cold=True)
        timing.measure(fn, sync=subject.sync, timer=subject.timer, flush=subject.flush,
                       warmup=2, budget_ms=0, min_samples=4, max_samples=4)
    finally:
        b.close()
    flush = ("memset", plan.l2_flush_bytes(dev.l2_bytes))
    spin = ("kernel", "spin_kernel")  # the timer's cover for the host's enqueue
    kernels = [item for item in issued if item[0] == "kernel" and item != spin]
    assert len(kernels) == 6 and issued.count(flush) == 4
    timed = [item for item in issued[issued.index(flush):] if item != spin]
    assert timed == [flush, kernels[0]] * 4  # one flush before every timed sample
    assert issued[issued.index(flush) + 1] == spin
