"""The cpu backend's device model: ownership, real asynchrony, events, errors, shutdown.

Ordering is proven with gates (a queued item that blocks its stream until released) and
events, never with timings: while a stream is held, nothing queued behind it can have run.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from opbench.backends.cpu import CpuBackend, DeviceMismatchError
from opbench.backends.runtimes.threads import StreamDelay, plain
from opbench.protocol import RopeParams

WAIT_S = 10.0  # generous bound for "this must happen"; never reached when the code works


@pytest.fixture()
def backend():
    with CpuBackend() as be:
        be.devices(2)
        yield be


def rope_args(be, device, n_tokens=4):
    x = be.to_device(np.ones((n_tokens, 2, 8), np.float32), device)
    pos = be.to_device(np.arange(n_tokens, dtype=np.int32), device)
    return x, pos, be.empty((n_tokens, 2, 8), np.float32, device)


# -- ownership -------------------------------------------------------------------------------
def test_arrays_and_views_know_their_device(backend):
    d0, d1 = backend.devices(2)
    arr = backend.to_device(np.arange(12, dtype=np.float32), d1)
    assert arr.device == d1
    assert backend.view(arr, 2, (2, 5)).device == d1
    assert arr.reshape(3, 4)[1:].device == d1
    assert backend.to_device(np.zeros(3)).device == d0  # default device 0
    np.testing.assert_array_equal(backend.to_host(backend.view(arr, 2, (2, 2))), [[2, 3], [4, 5]])


def test_array_of_another_device_is_refused(backend):
    d0, d1 = backend.devices(2)
    x, pos, out = rope_args(backend, d0)
    foreign_pos = backend.to_device(np.arange(4, dtype=np.int32), d1)
    with pytest.raises(DeviceMismatchError, match=r"pos lives on cpu:1 but x lives on cpu:0"):
        backend.rope(x, foreign_pos, out, RopeParams(n_dims=8))
    with pytest.raises(ValueError):  # DeviceMismatchError is a ValueError
        backend.cpy(x, backend.empty(x.shape, np.float32, d1), (0, 1, 2))


def test_stream_of_another_device_is_refused(backend):
    d0, d1 = backend.devices(2)
    x, pos, out = rope_args(backend, d0)
    with pytest.raises(DeviceMismatchError, match="stream of cpu:1"):
        backend.rope(x, pos, out, RopeParams(n_dims=8), stream=backend.stream(d1))


def test_plain_numpy_array_is_refused(backend):
    x, pos, out = rope_args(backend, 0)
    with pytest.raises(TypeError, match="rope: pos must be an array made by"):
        backend.rope(x, np.arange(4, dtype=np.int32), out, RopeParams(n_dims=8))


def test_unknown_device_and_option_are_refused(backend):
    with pytest.raises(ValueError, match="device=5 does not exist"):
        backend.to_device(np.zeros(2), 5)
    with pytest.raises(ValueError, match="unknown cpu backend option"):
        CpuBackend(rope_cahce=True)
    with pytest.raises(ValueError, match="rope_cache='maybe'"):
        CpuBackend(rope_cache="maybe")
    assert CpuBackend(rope_cache="off").rope_cache is False


def test_devices_keeps_existing_arrays(backend):
    arr = backend.to_device(np.arange(3.0, dtype=np.float32), 1)
    devices = backend.devices(3)
    assert arr.device is devices[1]
    np.testing.assert_array_equal(backend.to_host(arr), [0, 1, 2])


# -- asynchrony and ordering --------------------------------------------------------------------
def test_op_returns_before_its_work_runs(backend):
    x, pos, out = rope_args(backend, 0)
    gate = backend.hold(backend.stream(0))
    backend.rope(x, pos, out, RopeParams(n_dims=8))  # returns although the stream is held
    assert np.isnan(plain(out)).all(), "the op ran on the calling thread"
    gate.release()
    backend.synchronize()
    assert not np.isnan(plain(out)).any()


def test_to_host_waits_for_queued_work(backend):
    src = backend.to_device(np.arange(6, dtype=np.float32))
    out = backend.empty((6,), np.float32)
    gate = backend.hold(backend.stream(0))
    backend.cpy(src, out, (0,))
    threading.Timer(0.05, gate.release).start()
    np.testing.assert_array_equal(backend.to_host(out), np.arange(6))


def order_of(backend, wait: bool) -> list[str]:
    """Stream 0 is held; stream 1 queues an item, after waiting for stream 0's event or not."""
    s0, s1 = backend.stream(0), backend.stream(1)
    order: list[str] = []
    gate = backend.hold(s0)
    s0.submit(lambda: order.append("s0"))
    event = backend.record_event(s0)
    if wait:
        backend.wait_event(s1, event)
    s1.submit(lambda: order.append("s1"))
    s1_done = backend.record_event(s1)
    # 0.2 s shows that s1 did not run (when it waits); that it ran gets the full WAIT_S
    ran_while_held = s1_done.synchronize(timeout=0.2 if wait else WAIT_S)
    gate.release()
    assert event.synchronize(WAIT_S) and s1_done.synchronize(WAIT_S)
    assert ran_while_held == (not wait)
    return order


def test_events_order_two_streams(backend):
    assert order_of(backend, wait=True) == ["s0", "s1"]
    assert order_of(backend, wait=False) == ["s1", "s0"]  # the control: no wait, no order


def test_wait_event_refuses_foreign_objects(backend):
    with pytest.raises(TypeError, match="event"):
        backend.wait_event(backend.stream(0), object())
    with pytest.raises(TypeError, match="stream"):
        backend.record_event("stream 0")


# -- errors ------------------------------------------------------------------------------------
def test_kernel_error_surfaces_at_next_synchronize(backend):
    dst = backend.empty((3, 2), np.float32)
    src = backend.to_device(np.ones((2, 2), np.float32))
    backend.set_rows(dst, src, backend.to_device(np.array([0, 7], np.int32)))  # slot 7 > 2
    with pytest.raises(ValueError, match="slots must lie in"):
        backend.synchronize()
    backend.synchronize()  # reported once
    backend.set_rows(dst, src, backend.to_device(np.array([2, -1], np.int32)))
    np.testing.assert_array_equal(backend.to_host(dst)[2], [1, 1])  # the stream goes on


def test_error_on_one_device_surfaces_at_its_synchronize(backend):
    dst = backend.empty((3, 2), np.float32, 1)
    src = backend.to_device(np.ones((2, 2), np.float32), 1)
    backend.set_rows(dst, src, backend.to_device(np.array([5, 0], np.int32), 1))
    backend.synchronize(0)  # device 0 is fine
    with pytest.raises(ValueError, match="slots"):
        backend.synchronize(1)


# -- copy_async specifics of this backend ------------------------------------------------------
def test_copy_async_destination_is_poisoned_until_the_copy_lands(backend):
    src = backend.to_device(np.arange(5, dtype=np.float32), 0)
    gate = backend.hold(backend.stream(0))
    dst = backend.copy_async(src, 1)
    assert dst.device == backend.devices(2)[1]
    assert np.isnan(plain(dst)).all()
    gate.release()
    np.testing.assert_array_equal(backend.to_host(dst), np.arange(5))


def test_copy_on_destination_stream_protects_the_source(backend):
    """With stream = the destination's, the source must wait for the copy before a later
    write to src on the source stream (write-after-read hazard)."""
    src = backend.to_device(np.arange(5, dtype=np.float32), 0)
    gate = backend.hold(backend.stream(1))
    dst = backend.copy_async(src, 1, stream=backend.stream(1))
    backend.cpy(backend.to_device(np.full(5, -1, np.float32), 0), src, (0,))
    gate.release()
    np.testing.assert_array_equal(backend.to_host(dst), np.arange(5))
    np.testing.assert_array_equal(backend.to_host(src), np.full(5, -1))


def test_copy_async_stream_must_belong_to_source_or_destination(backend):
    backend.devices(3)
    src = backend.to_device(np.zeros(2, np.float32), 0)
    with pytest.raises(DeviceMismatchError, match="neither"):
        backend.copy_async(src, 1, stream=backend.stream(2))


# -- delays and shutdown -------------------------------------------------------------------------
def test_delays_are_seeded():
    a, b, c = StreamDelay((3, 0), 2.0), StreamDelay((3, 0), 2.0), StreamDelay((3, 1), 2.0)
    draws = [d.rng.uniform(0, 2.0, 5) for d in (a, b, c)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    with pytest.raises(ValueError, match="delay_max_ms"):
        CpuBackend(delay=True, delay_max_ms=-1)


def test_delayed_backend_still_computes_correctly():
    with CpuBackend(delay=True, delay_seed=1, delay_max_ms=1.0) as be:
        src = be.to_device(np.arange(8, dtype=np.float32))
        out = be.empty((8,), np.float16)
        be.cpy(src, out, (0,))
        np.testing.assert_array_equal(be.to_host(out), np.arange(8))


def test_delays_come_before_the_first_kernel_or_copy_after_each_record_or_wait(monkeypatch):
    """A stream sleeps before its first item and before the first kernel or copy after each
    event record or wait, never before the record or wait itself nor mid-segment."""
    slept = []
    monkeypatch.setattr(StreamDelay, "sleep", lambda self: slept.append(self.seed))
    with CpuBackend(delay=True, delay_seed=2) as be:
        d0, d1 = be.devices(2)
        src = be.to_device(np.arange(8, dtype=np.float32), d0)
        out = be.empty((8,), np.float32, d0)
        be.synchronize()
        slept.clear()
        be.cpy(src, out, (0,), stream=be.stream(d0))  # after the synchronize's record: sleeps
        be.cpy(out, out, (0,), stream=be.stream(d0))  # mid-segment: no sleep
        be.stream(d1).wait(be.stream(d0).record())  # a record and a wait: no sleep
        moved = be.copy_async(out, d1)  # on d0 after its record: sleeps
        be.cpy(moved, moved, (0,), stream=be.stream(d1))  # d1 after its wait: sleeps
        be.synchronize()  # one record per stream (no sleep)
        assert sorted(slept) == [(2, 0), (2, 0), (2, 1)]
        np.testing.assert_array_equal(be.to_host(moved), np.arange(8))


def test_close_joins_threads_even_with_a_held_stream():
    be = CpuBackend()
    be.devices(3)
    be.hold(be.stream(1))  # never released by the caller
    threads = [be.stream(d)._thread for d in be.device_list()]
    assert all(t.is_alive() and t.daemon for t in threads)
    be.close()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="closed"):
        be.cpy(be.to_device(np.zeros(2, np.float32)), be.empty((2,), np.float32), (0,))


def test_timer_runs_the_call_and_returns_device_nanoseconds(backend):
    src = backend.to_device(np.arange(1000, dtype=np.float32))
    out = backend.empty((1000,), np.float16)
    elapsed = backend.timer()(lambda: backend.cpy(src, out, (0,)))
    assert isinstance(elapsed, float) and elapsed > 0
    np.testing.assert_array_equal(backend.to_host(out), np.arange(1000, dtype=np.float16))


def test_a_call_that_raises_under_the_timer_leaves_no_stream_held(backend):
    src = backend.to_device(np.arange(8, dtype=np.float32))
    out = backend.empty((8,), np.float32)
    backend.stream(0)  # a stream the timer holds

    def failing_call():
        raise RuntimeError("launch failed")
    with pytest.raises(RuntimeError, match="launch failed"):
        backend.timer()(failing_call)
    backend.cpy(src, out, (0,))
    finished = threading.Event()
    threading.Thread(target=lambda: (backend.synchronize(), finished.set()), daemon=True).start()
    assert finished.wait(10), "synchronize hung: the timer left a stream held"
    np.testing.assert_array_equal(backend.to_host(out), np.arange(8, dtype=np.float32))


# -- the single-device fast path -----------------------------------------------------------------
def thread_of_next_item(be, device=0) -> threading.Thread:
    ran_on: list[threading.Thread] = []
    be.stream(device).submit(lambda: ran_on.append(threading.current_thread()))
    be.synchronize(device)
    return ran_on[0]


def test_device_0_runs_inline_while_no_other_device_holds_arrays():
    with CpuBackend() as be:
        be.devices(2)
        assert thread_of_next_item(be) is threading.current_thread()
        assert thread_of_next_item(be, 1) is be.stream(1)._thread  # never inline
        remote = be.empty((4,), np.float32, 1)[1:]  # a view keeps the array alive
        # another device holds data: device 0's order could be observed, the worker runs it
        assert thread_of_next_item(be) is be.stream(0)._thread
        del remote
        be.synchronize(0)  # freed and drained: inline again
        assert thread_of_next_item(be) is threading.current_thread()


def test_a_held_stream_runs_on_its_worker_until_released_and_drained():
    with CpuBackend() as be:
        x, pos, out = rope_args(be, 0)
        gate = be.hold(be.stream(0))
        be.rope(x, pos, out, RopeParams(n_dims=8))  # queued behind the gate, host not blocked
        assert np.isnan(plain(out)).all()
        gate.release()
        be.synchronize()
        assert not np.isnan(plain(out)).any()
        assert thread_of_next_item(be) is threading.current_thread()  # drained: inline again


def test_delay_keeps_the_worker_thread():
    with CpuBackend(delay=True, delay_max_ms=0.1) as be:
        be.devices(1)
        assert thread_of_next_item(be) is be.stream(0)._thread


def timed_item(be, work=lambda: None) -> tuple[float, list[threading.Thread]]:
    """(the timer's nanoseconds, the thread that ran ``work`` queued on device 0)."""
    ran_on: list[threading.Thread] = []

    def item():
        ran_on.append(threading.current_thread())
        work()
    return be.timer()(lambda: be.stream(0).submit(item)), ran_on


def test_the_timer_runs_one_device_on_the_calling_thread_and_spans_the_work():
    with CpuBackend() as be:
        be.devices(1)
        elapsed, ran_on = timed_item(be, lambda: time.sleep(0.02))
        assert ran_on == [threading.current_thread()]
        assert elapsed >= 20e6
        assert thread_of_next_item(be) is threading.current_thread()  # still inline


def test_the_timer_holds_the_workers_while_another_device_holds_arrays():
    with CpuBackend() as be:
        be.devices(2)
        remote = be.empty((4,), np.float32, 1)
        _, ran_on = timed_item(be)
        assert ran_on == [be.stream(0)._thread]
        del remote


def test_a_timed_call_that_leaves_the_fast_path_is_timed_to_the_end_of_its_work():
    with CpuBackend() as be:
        be.devices(2)
        kept = []

        def call():
            kept.append(be.empty((4,), np.float32, 1))  # device 0's work goes to its worker
            be.stream(0).submit(lambda: time.sleep(0.02))
        elapsed = be.timer()(call)
        assert elapsed >= 20e6


def test_inline_kernel_error_surfaces_at_next_synchronize():
    with CpuBackend() as be:
        be.devices(1)
        dst = be.empty((3, 2), np.float32)
        src = be.to_device(np.ones((2, 2), np.float32))
        be.set_rows(dst, src, be.to_device(np.array([0, 7], np.int32)))  # returns: no raise
        with pytest.raises(ValueError, match="slots must lie in"):
            be.synchronize()
        be.synchronize()  # reported once


# -- stalled / host_blocked: when a held gate is all that keeps work from running ------------
def test_a_held_stream_and_one_waiting_on_it_are_stalled_until_release(backend):
    d0, d1 = backend.devices(2)
    gate = backend.hold(backend.stream(d0))
    assert gate_entered(gate)
    backend.wait_event(backend.stream(d1), backend.record_event(backend.stream(d0)))
    assert wait_for(lambda: backend.stalled(d1))
    assert backend.stalled(d0)
    gate.release()
    backend.synchronize()
    assert not backend.stalled(d0) and not backend.stalled(d1)


def test_a_stream_running_work_or_waiting_on_a_set_event_is_not_stalled(backend):
    d0, d1 = backend.devices(2)
    done = backend.record_event(backend.stream(d0))
    backend.synchronize(d0)
    running, leave = threading.Event(), threading.Event()
    backend.wait_event(backend.stream(d1), done)
    backend.runtime.submit(d1, None, lambda: (running.set(), leave.wait(WAIT_S)))
    assert running.wait(WAIT_S)
    assert not backend.stalled(d1)  # busy, not stalled: it may finish on its own
    leave.set()
    backend.synchronize()


def test_host_blocked_only_while_a_synchronize_waits_behind_a_hold(backend):
    d0, d1 = backend.devices(2)
    gate = backend.hold(backend.stream(d0))
    backend.synchronize(d1)  # an idle device's synchronize returns at once
    assert not backend.host_blocked()
    waiter = threading.Thread(target=backend.synchronize, args=(d0,))
    waiter.start()
    assert wait_for(backend.host_blocked)
    assert waiter.is_alive()  # what host_blocked promised: it cannot return before release
    gate.release()
    waiter.join(WAIT_S)
    assert not waiter.is_alive() and not backend.host_blocked()


def gate_entered(gate) -> bool:
    return gate.entered.wait(WAIT_S)


def wait_for(condition) -> bool:
    """Poll ``condition`` until true (True) or WAIT_S passes (False)."""
    done = threading.Event()
    for _ in range(int(WAIT_S / 0.001)):
        if condition():
            return True
        done.wait(0.001)
    return False


# -- synchronizing a drained stream ----------------------------------------------------------------
def test_a_drained_stream_synchronizes_without_a_record_and_still_reports_errors(monkeypatch):
    """A synchronize hands the worker an event to set only while work is pending; once the
    stream has run everything, it returns at once, but a kernel error still surfaces."""
    from opbench.backends.runtimes.threads import Stream
    records = []
    real_record = Stream.record
    monkeypatch.setattr(Stream, "record", lambda self: (records.append(self), real_record(self))[1])
    with CpuBackend() as be:
        d0, d1 = be.devices(2)
        out = be.empty((8,), np.float32, d1)
        be.synchronize()
        records.clear()
        be.synchronize()
        assert records == []  # nothing queued since: no record on either stream
        be.cpy(be.to_device(np.arange(8, dtype=np.float32), d1), out, (0,))
        be.synchronize(d1)
        assert records == [be.stream(d1)]
        np.testing.assert_array_equal(be.to_host(out), np.arange(8))

        def failing_kernel():
            raise RuntimeError("kernel failed")
        be.runtime.submit(d1, None, failing_kernel)
        ran = threading.Event()
        be.runtime.submit(d1, None, ran.set)
        assert ran.wait(10)
        while not be.stream(d1).drained:  # the worker counts the item just after running it
            threading.Event().wait(0.001)
        records.clear()
        with pytest.raises(RuntimeError, match="kernel failed"):
            be.synchronize(d1)
        assert records == []


def test_an_array_moved_to_another_device_is_its_own_copy():
    """to_device of another device's array takes the read-back itself (no second copy): the
    new array must still share no memory with the source."""
    with CpuBackend() as be:
        d0, d1 = be.devices(2)
        src = be.to_device(np.arange(8, dtype=np.float32), d0)
        moved = be.to_device(src, d1)
        be.write(src, np.zeros(8, np.float32))
        be.synchronize()
        assert moved.device == d1 and not np.shares_memory(plain(moved), plain(src))
        np.testing.assert_array_equal(be.to_host(moved), np.arange(8))
