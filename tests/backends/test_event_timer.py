"""The device timer that hides the host's enqueue (``backends/common/event_timer.py``).

On the CPU: a modelled stream under a fake clock (every host step and every piece of device
work takes a set time), so what the events bracket is exact.  On a GPU (``gpu``): torch's
spin and events, which the torch and Triton backends time with.  The cupy backend's timer is
checked on its emulator and on a GPU in test_cupy_backend.py.
"""

from __future__ import annotations

import time

import pytest

from opbench.backends.common import event_timer
from opbench.backends.common.event_timer import FIRST_SPIN_NS, MAX_SPIN_NS, EventTimer

US = 1_000
HOST_STEP_NS = 1 * US  # what the host takes to queue a spin or record an event


class ModelledStream:
    """One in-order stream and the host that feeds it, on one fake clock: the host advances
    the clock as it works; queued work starts when both the host has queued it and the
    stream has finished what came before."""

    def __init__(self) -> None:
        self.host_ns = 0
        self.stream_free_ns = 0
        self.spins: list[int] = []

    def clock(self) -> int:
        return self.host_ns

    def _queue(self, device_ns: int) -> int:
        """Queue work lasting device_ns; returns when the stream finishes it."""
        self.host_ns += HOST_STEP_NS
        self.stream_free_ns = max(self.stream_free_ns, self.host_ns) + device_ns
        return self.stream_free_ns

    def spin(self, ns: int) -> None:
        self.spins.append(ns)
        self._queue(ns)

    def record(self) -> int:
        return self._queue(0)  # an event completes when the stream reaches it

    def wait(self, event_ns: int) -> None:
        self.host_ns = max(self.host_ns, event_ns)

    def call(self, host_ns: int, kernel_ns: int):
        """A call whose host part takes host_ns before it queues a kernel of kernel_ns."""
        def fn() -> None:
            self.host_ns += host_ns
            self._queue(kernel_ns)
        return fn

    def waiting_call(self, host_ns: int, kernel_ns: int):
        """A call that first waits for the stream (a device-to-host read), then works."""
        def fn() -> None:
            self.host_ns = max(self.host_ns, self.stream_free_ns) + host_ns
            self._queue(kernel_ns)
        return fn

    def timer(self, monkeypatch, **spin) -> EventTimer:
        monkeypatch.setattr(event_timer.time, "perf_counter_ns", self.clock)
        return EventTimer(spin=self.spin, record=self.record, wait=self.wait,
                          elapsed_ns=lambda start, end: end - start, **spin)


def test_the_events_bracket_the_kernel_and_not_the_hosts_enqueue(monkeypatch):
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    assert timer(stream.call(host_ns=50 * US, kernel_ns=9 * US)) == 9 * US
    assert timer.launch_ns == [50 * US + HOST_STEP_NS] and timer.exposed == 0
    assert stream.spins == [FIRST_SPIN_NS]


def test_without_the_spin_the_hosts_enqueue_is_timed_as_device_work(monkeypatch):
    """What the timer replaced (start event on an idle stream, then the call)."""
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    timer.spin = lambda ns: None
    assert timer(stream.call(host_ns=50 * US, kernel_ns=9 * US)) == 50 * US + HOST_STEP_NS + 9 * US


def test_an_enqueue_longer_than_the_spin_leaks_into_its_sample_and_lengthens_the_next_spin(
        monkeypatch):
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    call = stream.call(host_ns=300 * US, kernel_ns=9 * US)
    assert timer(call) > 100 * US and timer.exposed == 1  # the 200 us spin hid 200 of 300
    assert timer(call) == 9 * US and timer.exposed == 1
    assert stream.spins[1] > 300 * US and timer.launch_ns == [300 * US + HOST_STEP_NS] * 2


def test_warm_up_calls_set_the_spin_and_keep_no_sample(monkeypatch):
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    call = stream.call(host_ns=300 * US, kernel_ns=9 * US)
    timer.warm(call)
    assert timer.launch_ns == [] and timer.exposed == 0
    assert timer(call) == 9 * US and timer.exposed == 0


def test_an_enqueue_no_spin_can_hide_is_counted_as_exposed(monkeypatch):
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    call = stream.call(host_ns=MAX_SPIN_NS + 1_000 * US, kernel_ns=9 * US)
    timer.warm(call)
    assert stream.spins[-1] == FIRST_SPIN_NS and timer.spin_ns == MAX_SPIN_NS  # capped
    assert timer(call) > 9 * US and timer.exposed == 1  # host time leaked into the sample


def test_an_enqueue_that_waits_for_the_stream_stops_the_spin(monkeypatch):
    """Such an enqueue waits for the spin too: it grows with every longer spin, never hidden.
    Two misses, the second as long as the doubled spin, and the timer stops spinning."""
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    call = stream.waiting_call(host_ns=30 * US, kernel_ns=9 * US)
    timer.warm(call)
    assert not timer.waits_for_device  # one miss: maybe only a slow host
    timer.warm(call)
    assert timer.waits_for_device and len(stream.spins) == 2
    # no spin now: the events count the host's work after the wait, and the sample says so
    assert timer(call) == 30 * US + HOST_STEP_NS + 9 * US
    assert len(stream.spins) == 2 and timer.exposed == 1


def test_a_slow_enqueue_that_does_not_wait_is_hidden_after_one_miss(monkeypatch):
    stream = ModelledStream()
    timer = stream.timer(monkeypatch)
    call = stream.call(host_ns=900 * US, kernel_ns=9 * US)
    timer.warm(call)
    timer.warm(call)
    assert not timer.waits_for_device
    assert timer(call) == 9 * US and timer.exposed == 0


def test_a_sample_of_a_real_clock_keeps_the_hosts_enqueue_apart():
    """The real perf_counter_ns, a host-side stream: an enqueue of 2 ms is in launch_ns."""
    timer = EventTimer(spin=lambda ns: None, record=time.perf_counter_ns, wait=lambda e: None,
                       elapsed_ns=lambda a, b: b - a)
    timer(lambda: time.sleep(0.002))
    assert timer.launch_ns[0] >= 2_000_000


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    return torch


@pytest.mark.gpu
def test_torchs_spin_lasts_at_least_what_was_asked():
    torch = _cuda_torch()
    stream = torch.cuda.current_stream()
    timer = event_timer.torch_event_timer(torch, stream)
    for ns in (100 * US, 2_000 * US):
        start = timer.record()
        timer.spin(ns)
        end = timer.record()
        timer.wait(end)
        assert timer.elapsed_ns(start, end) >= 0.9 * ns


@pytest.mark.gpu
def test_torchs_timer_counts_the_gpu_work_not_the_hosts_enqueue():
    torch = _cuda_torch()
    x = torch.ones(1 << 20, device="cuda")
    out = torch.empty_like(x)
    timer = event_timer.torch_event_timer(torch, torch.cuda.current_stream())

    def slow_enqueue() -> None:
        time.sleep(0.01)  # 10 ms of host work before a ~2 us copy
        out.copy_(x)

    timer.warm(slow_enqueue)
    ns = timer(slow_enqueue)
    assert timer.launch_ns[-1] >= 10_000_000 and timer.exposed == 0
    assert ns < 2_000_000


@pytest.mark.gpu
def test_the_torch_backends_timer_brackets_the_stream_its_ops_run_on():
    """Torch's ops run on the device's stream (one per GPU), not torch's current stream: the
    timer's events go there, or they would bracket nothing."""
    _cuda_torch()
    import numpy as np

    from opbench.backends.torch_backend import TorchBackend

    backend = TorchBackend()
    device = backend.devices(1)[0]
    stream = backend.stream(device)
    assert backend.stream(device) is stream and backend.stream() is stream
    x = backend.to_device(np.ones(1 << 24, np.float32))
    out = backend.empty((1 << 24,), np.float32)
    timer = backend.timer()
    call = lambda: backend.cpy(x, out, (0,), 1, stream=stream)  # noqa: E731
    timer.warm(call)
    # 128 MiB read and written: more than 10 us below 13 TB/s, an event pair around an empty
    # stream reads a few microseconds
    assert timer(call) > 10_000 and timer.exposed == 0
