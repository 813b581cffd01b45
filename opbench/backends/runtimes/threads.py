"""The worker-thread runtime: logical devices in host memory, one stream per device.

Each logical device runs one stream: a FIFO queue drained by a daemon worker thread.  An op
validates its arguments on the calling thread, enqueues a closure and returns, so the host
really runs ahead of the device and a missing wait shows up as a wrong answer.  Kernel
exceptions are caught on the worker and re-raised by the next ``synchronize`` (as CUDA reports
asynchronous errors), and an optional seeded random sleep (fault injection) before the first
kernel or copy after each event record or wait widens every race window.

Fast path: while only device 0 holds arrays and there is no delay, no held stream and no
capture, no other stream has work whose order against device 0's could be observed, so device
0's stream runs its work inline on the calling thread (errors are still kept for the next
``synchronize``); handing every kernel to a worker and waiting for it cost more than the kernel
on small cases.  An array made on another device, ``hold`` (also the timer's), ``delay`` or a
wait on another stream's pending event switches to the worker thread at once (the inline
stream has nothing queued, so the order is kept); a ``synchronize`` of device 0 switches back
when none of that is left (the other devices' arrays freed: a multi-device case that ran before
does not slow down the single-device cases after it).

``ThreadRuntime`` is the ``opbench.protocol.Runtime`` of the cpu backend and of the Triton
backend's interpreter mode.  Graph capture swaps a stream's ``submit`` for a recorder, so
everything queued on it -- kernels, event records and waits, copies -- is kept instead of run;
replay enqueues the same closures again (they hold the same arrays, so new inputs written into
those arrays are seen).  Events are one-shot, so replay first clears every event the graph
records.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opbench.protocol import DeviceMismatchError, Option, Runtime, poisoned_host

from ..common.arrays import plain
from ..common.host import flush_host_caches

__all__ = ["Device", "DeviceArray", "DeviceMismatchError", "Event", "Gate", "Stream",
           "StreamDelay", "ThreadGraph", "ThreadRuntime", "device_array", "plain"]


@dataclass(frozen=True)
class Device:
    """A logical cpu device; ``index`` is its position in ``backend.devices(n)``."""

    index: int

    @property
    def name(self) -> str:
        return f"cpu:{self.index}"

    def __str__(self) -> str:
        return self.name


class DeviceArray(np.ndarray):
    """An ndarray owned by one logical device.  Views and reshapes keep ``.device``.

    (NumPy 2's ndarray has a read-only array-API ``device`` property, "cpu"; this overrides
    it with the logical device.)"""

    _owner: Device | None

    def __array_finalize__(self, obj: Any) -> None:
        self._owner = getattr(obj, "_owner", None)

    @property
    def device(self) -> Device | None:
        return self._owner


def device_array(host: np.ndarray, device: Device, copy: bool = True) -> DeviceArray:
    """``host`` as ``device``'s array: a copy, or (``copy=False``, for an array made for it
    and held by no one else) ``host``'s own memory."""
    arr = (np.array(host, copy=True) if copy else host).view(DeviceArray)
    arr._owner = device
    return arr


class Event:
    """Set by the stream it was recorded on once everything queued before it has run."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self, timeout: float | None = None) -> bool:
        waiting = self.stream._host_waits
        waiting.add(self)  # seen by ThreadRuntime.host_blocked while the host waits here
        try:
            return self._done.wait(timeout)
        finally:
            waiting.discard(self)


class _WaitFor:
    """A queued wait for another stream's event, kept as an object (not a bound method) so
    ``Stream.stalled`` can see which stream the waiting one depends on."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self) -> None:
        self.event._done.wait()


class Gate:
    """A queued item that blocks its stream until the host calls ``release`` (fault injection:
    "slow work of known length", made deterministic)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._open = threading.Event()
        self.entered = threading.Event()  # set when the stream reaches the gate

    def release(self) -> None:
        self._open.set()

    @property
    def released(self) -> bool:
        return self._open.is_set()

    def _block(self) -> None:
        self.entered.set()
        self._open.wait()


_STOP = object()


@dataclass
class StreamDelay:
    """Seeded random sleep of 0..max_ms before the first kernel or copy after each event
    record or wait of a stream (and before its first item).

    Only records and waits order one stream against another, so a race is always between
    the work of two such segments; the work inside a segment runs back to back on the
    stream's thread, and one sleep at its start shifts all of it against every other stream.
    A sleep before every item caught no more and cost ten times the time (0.3 ms a sleep,
    most of it the sleep's own overhead, on ~800 items per stream and scenario); see
    benchmarks/delay_catch.py.  An event record itself never sleeps: its signal has no data
    of its own to race."""

    seed: int
    max_ms: float
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        if self.max_ms < 0:
            raise ValueError(f"delay_max_ms={self.max_ms} must be >= 0")
        self.rng = np.random.default_rng(self.seed)

    def sleep(self) -> None:
        time.sleep(self.rng.uniform(0.0, self.max_ms) / 1000.0)


class Stream:
    """An in-order work queue executed by one daemon worker thread."""

    def __init__(self, device: Device, delay: StreamDelay | None = None) -> None:
        self.device = device
        self._delay = delay
        #: run submitted work on the calling thread (set by the runtime; see the module doc)
        self.inline = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # items handed to the worker and items it has finished: equal when the stream has
        # drained, so a synchronize then returns without handing the worker a record to set
        # (two thread switches; the eviction reads back three arrays per layer and shard)
        self._queued = self._finished = 0
        self._queued_lock = threading.Lock()  # submit may be called from several threads
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._closed = False
        #: the item the worker has taken and not finished (None between items)
        self._current: Callable[[], None] | None = None
        #: events the host is waiting for in ``Event.synchronize`` (see ``host_blocked``)
        self._host_waits: set[Event] = set()
        self._thread = threading.Thread(
            target=self._run, name=f"opbench-{device.name}-stream", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"Stream({self.device.name})"

    # -- host side ------------------------------------------------------------------------
    def submit(self, work: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"stream of {self.device.name} is closed")
        if self.inline:
            self._run_inline(work)
        else:
            with self._queued_lock:
                self._queued += 1
            self._queue.put(work)

    def _run_inline(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as error:  # noqa: BLE001 - reported at the next synchronize
            self._keep_first(error)

    def record(self) -> Event:
        event = Event(self)
        self.submit(event._done.set)
        return event

    def wait(self, event: Event) -> None:
        if event.stream is not self and not event.query():
            self.inline = False  # the host must not block on another stream's work
        self.submit(_WaitFor(event))

    def hold(self) -> Gate:
        self.inline = False  # the host runs on while the stream is held
        gate = Gate(self)
        self.submit(gate._block)
        return gate

    @property
    def drained(self) -> bool:
        """Everything queued so far has run (inline work runs at once)."""
        return self._finished == self._queued

    def synchronize(self) -> None:
        """Wait until everything queued so far has run; re-raise the first kernel error."""
        if not self.drained:
            self.record().synchronize()
        self.raise_pending()

    def raise_pending(self) -> None:
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled(self, seen: frozenset = frozenset()) -> bool:
        """True when this stream cannot run anything more until a held gate is released: its
        worker sits in an unreleased ``hold`` or waits for an unset event of a stream that is
        itself stalled.  False whenever it may still progress (idle, between items, running
        work), so a caller that polls this never mistakes "not yet" for "never"."""
        if self in seen:
            return True  # streams waiting on each other in a ring: none can move
        current = self._current
        if isinstance(getattr(current, "__self__", None), Gate):
            return not current.__self__.released
        if isinstance(current, _WaitFor):
            event = current.event
            return not event.query() and event.stream.stalled(seen | {self})
        return False

    # -- worker side ----------------------------------------------------------------------
    def _run(self) -> None:
        segment_start = True  # see StreamDelay
        while True:
            work = self._queue.get()
            if work is _STOP:
                return
            self._current = work
            ordering = _is_event_set(work) or isinstance(work, _WaitFor)
            if self._delay is not None and segment_start and not ordering:
                self._delay.sleep()
            segment_start = ordering
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported at the next synchronize
                self._keep_first(error)
            self._current = None
            self._finished += 1  # only this thread writes it

    def _keep_first(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error


@dataclass
class ThreadGraph:
    """Recorded work per stream, in queue order."""

    items: dict[Stream, list] = field(default_factory=dict)

    def recorded_events(self) -> list[threading.Event]:
        return [item.__self__ for work in self.items.values() for item in work
                if _is_event_set(item)]


def _is_event_set(item: Any) -> bool:
    return getattr(item, "__name__", "") == "set" and isinstance(
        getattr(item, "__self__", None), threading.Event)


class ThreadRuntime(Runtime):
    """Logical devices ``cpu:N`` with worker-thread streams; ``delay`` sleeps a seeded random
    0..``delay_max_ms`` before the first kernel or copy after each event record or wait (see
    ``StreamDelay``; per device seed ``(delay_seed, N)``)."""

    name = "threads"
    #: whether device 0's stream may run its work inline (see the module doc)
    INLINE_FAST_PATH = True
    #: the options a backend on this runtime declares for it (``from_options`` reads them)
    OPTIONS = (
        Option("delay", bool, False, "fault injection: a seeded random sleep before the first"
               " kernel or copy after each event record or wait"),
        Option("delay_seed", int, 0, "seed of the delays"),
        Option("delay_max_ms", float, 2.0, "longest delay"),
    )

    @classmethod
    def from_options(cls, options: dict) -> ThreadRuntime:
        return cls(options["delay"], options["delay_seed"], options["delay_max_ms"])

    def __init__(self, delay: bool = False, delay_seed: int = 0,
                 delay_max_ms: float = 2.0) -> None:
        if delay_max_ms < 0:
            raise ValueError(f"delay_max_ms={delay_max_ms} must be >= 0")
        self.delay, self.delay_seed, self.delay_max_ms = delay, delay_seed, delay_max_ms
        self._devices: list[Device] = []
        self._streams: list[Stream] = []
        self._gates: list[Gate] = []
        self._lock = threading.Lock()
        self._other_arrays = 0  # live arrays on devices other than 0 (see the module doc)

    def info(self) -> dict:
        return {"devices": [d.name for d in self._devices]}

    # -- devices and memory -----------------------------------------------------------------
    def devices(self, n: int = 1) -> list[Device]:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} devices must be an int >= 1")
        with self._lock:
            while len(self._devices) < n:
                self._start_device(len(self._devices))
            self._set_inline()
        return self._devices[:n]

    def _set_inline(self) -> None:
        """Device 0's stream runs inline only where no other thread could see the difference;
        called when device 0's stream has drained (an inline stream's queue is empty anyway;
        work queued on other devices holds their arrays, so it counts in ``_other_arrays``)."""
        inline = (self.INLINE_FAST_PATH and not self.delay and self._other_arrays == 0
                  and all(gate.released for gate in self._gates) and not self.capturing)
        for stream in self._streams:
            stream.inline = inline and stream is self._streams[0]

    def _new_array(self, host: np.ndarray, device: Device, copy: bool = True) -> DeviceArray:
        arr = device_array(host, device, copy)
        if device.index != 0:
            with self._lock:
                self._other_arrays += 1
            self._streams[0].inline = False  # device 0's work may now be observed from there
            weakref.finalize(arr.base, self._array_freed)  # views keep the base alive
        return arr

    def _array_freed(self) -> None:
        with self._lock:
            self._other_arrays -= 1

    def _start_device(self, index: int) -> None:
        device = Device(index)
        delay = StreamDelay((self.delay_seed, index), self.delay_max_ms) if self.delay else None
        self._devices.append(device)
        self._streams.append(Stream(device, delay))

    def device_list(self) -> list[Device]:
        return list(self._devices)

    def device(self, device: Any = None) -> Device:
        if device is None:
            device = 0
        index = device.index if isinstance(device, Device) else device
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"device={device!r} must be a Device or an index >= 0")
        if index == 0 and not self._devices:
            self.devices(1)  # ops before devices(n): the default device
        if index >= len(self._devices):
            raise ValueError(
                f"device={device!r} does not exist; devices(n) made {len(self._devices)}"
            )
        return self._devices[int(index)]

    def owner(self, name: str, arr: Any) -> Device:
        device = self._own_device(arr)
        if device is not None:
            return device
        device = getattr(arr, "device", None)
        if not isinstance(arr, DeviceArray) or device not in self._devices:
            raise TypeError(
                f"{name} must be an array made by this backend's to_device, got "
                f"{type(arr).__name__}"
            )
        return device

    def _own_device(self, arr: Any) -> Device | None:
        """The device of one of this runtime's arrays, by identity (cheap: every op asks for
        each of its arrays); None for anything else, which ``owner`` then looks at in full."""
        device = getattr(arr, "_owner", None) if isinstance(arr, DeviceArray) else None
        devices = self._devices
        if device is not None and device.index < len(devices) and devices[device.index] is device:
            return device
        return None

    def same_device(self, op: str, **arrays: Any) -> Device | None:
        first = None
        for arr in arrays.values():
            if arr is None:
                continue
            device = self._own_device(arr)
            if device is None or (first is not None and device is not first):
                # not plainly one device: the general check names the culprit
                return super().same_device(op, **arrays)
            first = device
        return first

    def to_device(self, host: np.ndarray, device: Any = None) -> DeviceArray:
        if isinstance(host, DeviceArray):  # another device's array: wait for its queued work
            return self._new_array(self.to_host(host), self.device(device), copy=False)
        return self._new_array(np.asarray(host), self.device(device))

    def empty(self, shape: Sequence[int], dtype: Any, device: Any = None) -> DeviceArray:
        # the filled array is the device's own: copying it again doubled the cost of every
        # output buffer (a 64 MiB one: 2 x 10 ms)
        return self._new_array(poisoned_host(shape, dtype), self.device(device), copy=False)

    def to_host(self, arr: DeviceArray) -> np.ndarray:
        device = self.owner("arr", arr)
        self.synchronize(device)
        return np.array(plain(arr), copy=True)

    def write(self, dst, host: np.ndarray, stream=None) -> None:
        host = np.asarray(host)
        if host.shape != dst.shape:
            raise ValueError(f"write: host shape {host.shape} must be {dst.shape}")
        device = self.same_device("write", dst=dst)
        snapshot, target = np.array(host, dtype=dst.dtype, copy=True), plain(dst)
        self.submit(device, stream, lambda: np.copyto(target, snapshot))

    def synchronize(self, device: Any = None) -> None:
        if device is not None and (stream := self.stream(device)).inline:
            # every op ran as it came: drained, and the fast path stays on (what turns it off
            # turns the stream's ``inline`` off at once)
            stream.raise_pending()
            return
        streams = self._streams if device is None else [stream]
        for stream in streams:
            if not stream.drained:
                stream.record().synchronize()
        if self._streams[0] in streams:  # device 0 drained: its fast path may resume
            self._set_inline()
        for stream in streams:
            stream.raise_pending()

    def close(self) -> None:
        for gate in self._gates:
            gate.release()  # a held stream would never drain
        for stream in self._streams:
            stream.close()

    # -- streams, events, work --------------------------------------------------------------
    def stream(self, device: Any = None) -> Stream:
        return self._streams[self.device(device).index]

    def record_event(self, stream: Stream) -> Event:
        return self.own_stream(stream).record()

    def wait_event(self, stream: Stream, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"event must come from record_event, got {type(event).__name__}")
        self.own_stream(stream).wait(event)

    def hold(self, stream: Stream) -> Gate:
        """Block ``stream`` at this point until ``gate.release()``: deterministic slow work."""
        gate = self.own_stream(stream).hold()
        self._gates = [g for g in self._gates if not g.released] + [gate]  # close() frees these
        return gate

    def stalled(self, device: Any) -> bool:
        """True when ``device``'s stream can run nothing more until a held gate is released
        (see ``Stream.stalled``): the COPY_ASYNC checks release a hold at that moment instead
        of after a fixed settling time."""
        return self.stream(device).stalled()

    def host_blocked(self) -> bool:
        """True when a host thread waits (in a synchronize) for an event that cannot be set
        until a held gate is released: that call cannot return before the release."""
        return any(not event.query() and event.stream.stalled()
                   for stream in self._streams for event in list(stream._host_waits))

    def submit(self, device: Device, stream: Stream | None, work) -> None:
        target = self.stream(device) if stream is None else self.own_stream(stream)
        if target.device is not device and target.device != device:
            raise DeviceMismatchError(
                f"stream of {target.device} cannot run an op on arrays of {device}"
            )
        target.submit(work)

    def kernel_view(self, arr: DeviceArray) -> np.ndarray:
        return plain(arr)

    def own_stream(self, stream: Any) -> Stream:
        if not isinstance(stream, Stream) or stream not in self._streams:
            raise TypeError(f"stream={stream!r} is not a stream of this backend")
        return stream

    def copy_async(self, src: DeviceArray, dst_device: Any, stream: Stream | None = None):
        """ggml's contract.  The copy runs on the source stream (after the work queued there),
        then the destination stream waits for it; with ``stream`` = the destination's stream the
        copy runs there, after waiting for the source, and the source waits for the copy
        before anyone may overwrite src."""
        src_device = self.owner("src", src)
        dst = self.empty(src.shape, src.dtype, dst_device)
        src_stream, dst_stream = self.stream(src_device), self.stream(dst.device)
        copy_stream = src_stream if stream is None else self.own_stream(stream)
        if copy_stream not in (src_stream, dst_stream):
            raise DeviceMismatchError(
                f"copy_async: stream of {copy_stream.device} is neither the source's "
                f"({src_device}) nor the destination's ({dst.device})"
            )
        source, target = plain(src), plain(dst)
        if copy_stream is src_stream:
            src_stream.submit(lambda: np.copyto(target, source))
            dst_stream.wait(src_stream.record())
        else:
            dst_stream.wait(src_stream.record())
            dst_stream.submit(lambda: np.copyto(target, source))
            src_stream.wait(dst_stream.record())
        return dst

    # -- graphs ---------------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return any("submit" in vars(stream) for stream in self._streams)

    def capture_begin(self, streams) -> None:
        for stream in self._stream_list(streams):
            if "submit" in vars(stream):
                raise RuntimeError(f"{stream} is already capturing")
            recorded: list = []
            stream.inline = False  # replay may run while another capture is open
            stream.submit = recorded.append  # instance attribute shadows Stream.submit
            stream._recorded = recorded

    def capture_end(self, streams) -> ThreadGraph:
        graph = ThreadGraph()
        for stream in self._stream_list(streams):
            if "submit" not in vars(stream):
                raise RuntimeError(f"{stream} is not capturing")
            del stream.submit
            graph.items[stream] = stream.__dict__.pop("_recorded")
        return graph

    def replay(self, graph: ThreadGraph, stream=None) -> None:
        if not isinstance(graph, ThreadGraph):
            raise TypeError(f"graph must come from capture_end, got {type(graph).__name__}")
        for event in graph.recorded_events():
            event.clear()  # every stream's waits must see this replay's records, not the last
        for target, work in graph.items.items():
            for item in work:
                target.submit(item)

    def _stream_list(self, streams) -> list[Stream]:
        if not isinstance(streams, (list, tuple)):
            streams = [streams]
        return [self.own_stream(s) for s in streams]

    # -- timing ---------------------------------------------------------------------------------
    def flush_l2(self, device: Any = None) -> None:
        """The devices are the host's cores: evict the host's caches (``perf --cold``)."""
        self.synchronize()  # nothing queued may run while the flush evicts
        flush_host_caches()

    def timer(self):
        """Time of one call in nanoseconds, taken where the call's work runs.

        On the single-device fast path (device 0's stream inline, see the module doc) the work
        runs on the calling thread, as a user of one device runs it, so the span is taken there:
        from just before ``call`` to its end, its validation included -- the host clock the CPU
        peers (torch, ggml) are timed with.  Running it on the worker instead, behind a held
        stream, took a third thread onto a two-core machine: a kernel split over both cores
        read ~30% slower than called inline ([4096, 8, 128] f32 -> f16, cold: 1.27-1.44 ms
        against 0.92-1.01), and a small op read its queue hand-offs (16-23 us against 11 us
        inline, validation in).  Otherwise (several devices, ``delay``, a held stream) as CUDA
        events measure: every stream is held while ``call`` queues its work between two
        timestamps taken on the workers, then released, so the kernels run back to back and
        host-side latency (validation, thread wake-ups) is not counted.  Meaningless with
        ``delay`` on (the sleeps are counted)."""

        def time_call(call) -> float:
            self.synchronize()
            if self._streams and self._streams[0].inline:
                return self._time_inline(call)
            return self._time_held(call)

        return time_call

    def _time_inline(self, call) -> float:
        start = time.perf_counter_ns()
        call()
        # an inline stream stamps at once; a stream the call handed to its worker (an array
        # made on another device, a wait on another stream) stamps after the work it queued
        stamps = [start]
        for stream in self._streams:
            stream.submit(lambda: stamps.append(time.perf_counter_ns()))
        self.synchronize()
        return float(max(stamps) - start)

    def _time_held(self, call) -> float:
        streams = list(self._streams)
        gates = [stream.hold() for stream in streams]
        stamps: list[int] = []
        try:
            for stream in streams:
                stream.submit(lambda: stamps.append(time.perf_counter_ns()))
            call()
            for stream in streams:
                stream.submit(lambda: stamps.append(time.perf_counter_ns()))
        finally:  # a call that raises must not leave every stream held for good
            for gate in gates:
                gate.release()
        self.synchronize()
        return float(max(stamps) - min(stamps))
