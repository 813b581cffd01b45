"""Timing a GPU call by its device work alone: two events, the host's enqueue hidden.

An event recorded before a call starts the clock when its stream reaches it.  On an idle
stream that is at once, so everything the host then does to enqueue the call's kernels
(checks, argument packing, a JIT's launcher, torch's dispatcher) is counted as device time.
On an H200 that made a 16 MiB copy take 33 us in torch and 88 us in Triton, ~9 us of which the
copy itself needs: small cases measured launch overhead, not kernels.

``EventTimer`` queues a spin on the stream first, longer than the host takes to enqueue the
call, so the stream reaches the start event only after the whole call is queued behind it;
the events then bracket the device's work.  What the host took to enqueue the call is kept
apart (``launch_ns``, one per sample): a figure of its own, the overhead an engine without
CUDA graphs pays per call.  The spin is twice the longest enqueue seen so far, warm-up calls
included (``warm``); a sample whose enqueue outlasted its spin counts host time, and is
counted (``exposed``).  It is not taken again: a retry would run the call once more without
the L2 flush that a cold sample starts with.

A call whose enqueue waits for its stream (a device-to-host read such as ``.item()``, a
pageable upload) cannot be hidden: it waits for the spin too, so its enqueue grows with the
spin.  When a doubled spin is outlasted again by an enqueue that doubled with it, the timer
stops spinning (``waits_for_device``): the events then also count the host's work after the
wait, which such a call makes the device wait for on every call.  On the fifth H200 run,
torch's RoPE and paged attention and Triton's paged decode did this: their enqueue took as
long as the 50 ms spin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: the first spin, before any enqueue was measured (a Python launch takes 5-100 us)
FIRST_SPIN_NS = 200_000
#: no spin longer than this (a call whose enqueue takes longer is host-bound: ``exposed``)
MAX_SPIN_NS = 50_000_000


@dataclass
class EventTimer:
    """Times ``fn`` (enqueuing work on one stream) between two events on that stream.

    ``spin(ns)`` queues ~ns of idle device work on the stream, ``record()`` records an event
    on it, ``wait(event)`` blocks the host until the event completed, and ``elapsed_ns(a, b)``
    is the device time between two completed events."""

    spin: Callable[[int], None]
    record: Callable[[], Any]
    wait: Callable[[Any], None]
    elapsed_ns: Callable[[Any, Any], float]
    spin_ns: int = FIRST_SPIN_NS
    launch_ns: list[int] = field(default_factory=list)
    exposed: int = 0
    waits_for_device: bool = False
    _missed_ns: int = 0  # the last enqueue that outlasted its spin (0: the last one did not)

    def __call__(self, fn: Callable[[], None]) -> float:
        """The device time of one call (ns); its enqueue time goes to ``launch_ns``."""
        called, enqueued, start, end, hidden = self._sample(fn)
        self.launch_ns.append(enqueued - called)
        self.exposed += not hidden
        return self.elapsed_ns(start, end)

    def warm(self, fn: Callable[[], None]) -> None:
        """A warm-up call: it sets the spin for the samples to come, and is kept nowhere."""
        self._sample(fn)

    def _sample(self, fn: Callable[[], None]):
        spun = 0 if self.waits_for_device else self.spin_ns
        queued = time.perf_counter_ns()
        if spun:
            self.spin(spun)
        start = self.record()
        called = time.perf_counter_ns()
        fn()
        enqueued = time.perf_counter_ns()
        end = self.record()
        self.wait(end)
        # the device began the spin no earlier than the host asked for it, so it reached the
        # start event no earlier than ``queued + spun``: if that is past ``enqueued``, the
        # device never waited for the host between the two events
        took = enqueued - queued
        hidden = took < spun
        if spun:
            self._adapt(took, hidden)
        return called, enqueued, start, end, hidden

    def _adapt(self, took: int, hidden: bool) -> None:
        """The next spin: twice the longest enqueue; none once the enqueue is seen to wait
        for the spin (it outlasted a spin twice its last miss: it grew with the spin)."""
        if not hidden and self._missed_ns and took >= 2 * self._missed_ns:
            self.waits_for_device = True
        self._missed_ns = 0 if hidden else took
        self.spin_ns = min(MAX_SPIN_NS, max(self.spin_ns, 2 * took))


def torch_event_timer(torch, stream) -> EventTimer:
    """An ``EventTimer`` on a torch CUDA stream: torch's events, and ``torch.cuda._sleep`` (a
    spin of so many clock cycles) as the spin, its cycles per nanosecond measured once per
    GPU with the same events."""
    cycles_per_ns = _torch_sleep_rate(torch, stream)

    def record():
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def spin(ns: int) -> None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(max(1, int(ns * cycles_per_ns)))

    return EventTimer(spin=spin, record=record, wait=lambda event: event.synchronize(),
                      elapsed_ns=lambda a, b: a.elapsed_time(b) * 1e6)


#: cycles of the calibrating spin (about 1 ms at 1-2 GHz)
CALIBRATION_CYCLES = 2_000_000
#: ``torch.cuda._sleep``'s clock cycles per nanosecond, by GPU index
_SLEEP_RATES: dict[int, float] = {}


def _torch_sleep_rate(torch, stream) -> float:
    """Clock cycles per nanosecond of ``torch.cuda._sleep`` on the stream's GPU: the highest
    of three, so that a spin lasts at least as long as asked."""
    gpu = stream.device.index
    if gpu not in _SLEEP_RATES:
        rates = []
        with torch.cuda.stream(stream):
            for _ in range(3):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                torch.cuda._sleep(CALIBRATION_CYCLES)
                end.record(stream)
                end.synchronize()
                rates.append(CALIBRATION_CYCLES / (start.elapsed_time(end) * 1e6))
        _SLEEP_RATES[gpu] = max(rates)
    return _SLEEP_RATES[gpu]
