"""The cpu backend's scenario primitives and graph capture/replay."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.backends.cpu import CpuBackend
from opbench.reference.attention import attention, merge_partials


@pytest.fixture
def cpu():
    backend = CpuBackend()
    backend.devices(2)
    yield backend
    backend.close()


def _rand(rng, *shape):
    return rng.uniform(-1, 1, shape).astype(np.float32)


def test_matmul_rms_norm_add_match_float64(cpu):
    rng = np.random.default_rng(0)
    a, b, w = _rand(rng, 5, 8), _rand(rng, 8, 3), _rand(rng, 8)
    out, normed, summed = (cpu.to_device(np.full(s, np.nan, np.float32))
                           for s in ((5, 3), (5, 8), (5, 8)))
    da = cpu.to_device(a)
    cpu.matmul(da, cpu.to_device(b), out)
    cpu.rms_norm(da, cpu.to_device(w), normed, 1e-6)
    cpu.add(da, normed, summed)
    np.testing.assert_allclose(cpu.to_host(out), a.astype(np.float64) @ b, rtol=1e-5)
    want = a / np.sqrt((a.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(cpu.to_host(normed), want, rtol=1e-5)
    np.testing.assert_allclose(cpu.to_host(summed), a + want, rtol=1e-5)


def test_attn_merge_matches_attention_over_the_union_of_key_sets(cpu):
    rng = np.random.default_rng(1)
    q, k, v = _rand(rng, 3, 4, 8), _rand(rng, 10, 2, 8), _rand(rng, 10, 2, 8)
    parts = []
    for keys in (slice(0, 6), slice(6, 10)):
        parts.append(attention(q, k[keys], v[keys], return_lse=True))
    out, lse = (cpu.to_device(x.astype(np.float32)) for x in parts[0])
    part_out, part_lse = (cpu.to_device(x.astype(np.float32)) for x in parts[1])
    cpu.attn_merge(out, lse, part_out, part_lse)
    want_out, want_lse = attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(cpu.to_host(out), want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cpu.to_host(lse), want_lse, rtol=1e-5)


def test_attn_merge_ignores_parts_that_saw_nothing(cpu):
    rng = np.random.default_rng(2)
    out, lse = _rand(rng, 2, 3, 4), _rand(rng, 2, 3)
    empty_out = np.full((2, 3, 4), np.nan, np.float32)  # ignored even if NaN
    empty_lse = np.full((2, 3), -np.inf, np.float32)
    d_out, d_lse = cpu.to_device(out), cpu.to_device(lse)
    cpu.attn_merge(d_out, d_lse, cpu.to_device(empty_out), cpu.to_device(empty_lse))
    want = merge_partials([out, empty_out], [lse, empty_lse])
    np.testing.assert_allclose(cpu.to_host(d_out), want[0], rtol=1e-6)
    np.testing.assert_allclose(cpu.to_host(d_lse), want[1], rtol=1e-6)


def test_write_snapshots_the_host_array_and_is_ordered_on_the_stream(cpu):
    dst = cpu.to_device(np.zeros(4, np.float32))
    gate = cpu.hold(cpu.stream(0))  # nothing on device 0 runs until released
    host = np.arange(4, dtype=np.float32)
    cpu.write(dst, host)
    host[:] = -1  # the caller may reuse its array at once
    assert np.array_equal(np.asarray(dst), np.zeros(4))  # queued, not run yet
    gate.release()
    assert cpu.to_host(dst).tolist() == [0, 1, 2, 3]


def test_ops_reject_arrays_of_another_device(cpu):
    a = cpu.to_device(np.ones((2, 2), np.float32), 0)
    b = cpu.to_device(np.ones((2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="lives on cpu:1"):
        cpu.add(a, b, a)


def test_capture_records_without_running_and_replay_reads_new_inputs(cpu):
    x = cpu.to_device(np.zeros((1, 2), np.float32), 0)
    one = cpu.to_device(np.ones((1, 2), np.float32), 0)
    out = cpu.to_device(np.zeros((1, 2), np.float32), 0)
    streams = [cpu.stream(0), cpu.stream(1)]
    cpu.capture_begin(streams)
    cpu.add(x, one, out)
    moved = cpu.copy_async(out, 1)  # cross-stream: an event recorded on 0, waited on 1
    doubled = cpu.to_device(np.zeros((1, 2), np.float32), 1)
    cpu.add(moved, moved, doubled)
    graph = cpu.capture_end(streams)
    cpu.synchronize()
    assert cpu.to_host(out).tolist() == [[0, 0]]  # recorded, not run
    for value in (1.0, 5.0, 7.0):
        cpu.write(x, np.full((1, 2), value))
        cpu.replay(graph)
        assert cpu.to_host(doubled).tolist() == [[2 * (value + 1)] * 2]


def test_replay_keeps_cross_stream_order_under_a_held_source(cpu):
    """Device 1's replayed work must wait for device 0's replayed copy, not for the event of
    the previous replay (events are one-shot: replay re-arms them)."""
    src = cpu.to_device(np.zeros(3, np.float32), 0)
    streams = [cpu.stream(0), cpu.stream(1)]
    cpu.capture_begin(streams)
    moved = cpu.copy_async(src, 1)
    seen = cpu.to_device(np.zeros(3, np.float32), 1)
    cpu.add(moved, moved, seen)
    graph = cpu.capture_end(streams)
    cpu.replay(graph)
    cpu.synchronize()
    gate = cpu.hold(cpu.stream(0))
    cpu.write(src, np.full(3, 4.0))
    cpu.replay(graph)
    done = cpu.record_event(cpu.stream(1))
    assert not done.synchronize(timeout=0.2)  # device 1 waits for the held copy
    gate.release()
    assert cpu.to_host(seen).tolist() == [8.0, 8.0, 8.0]


def test_capture_end_without_begin_is_an_error(cpu):
    with pytest.raises(RuntimeError, match="not capturing"):
        cpu.capture_end(cpu.stream(0))
