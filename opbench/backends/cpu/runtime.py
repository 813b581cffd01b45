"""The cpu backend's device model: logical devices, arrays that know their device, streams.

Each logical device runs one stream: a FIFO queue drained by a daemon worker thread.  An op
validates its arguments on the calling thread, enqueues a closure and returns, so the host
really runs ahead of the device and a missing wait shows up as a wrong answer.  Kernel
exceptions are caught on the worker and re-raised by the next ``synchronize`` (as CUDA reports
asynchronous errors), and an optional seeded random sleep before every queued item (fault
injection) widens every race window.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DeviceMismatchError(ValueError):
    """An array of one logical device was used by an op running on another."""


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


def device_array(host: np.ndarray, device: Device) -> DeviceArray:
    arr = np.array(host, copy=True).view(DeviceArray)
    arr._owner = device
    return arr


def plain(arr: np.ndarray) -> np.ndarray:
    """The array without the subclass: kernels run on plain ndarrays (no finalize overhead)."""
    return arr.view(np.ndarray)


class Event:
    """Set by the stream it was recorded on once everything queued before it has run."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


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
    """Seeded random sleep of 0..max_ms before every queued item."""

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
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._closed = False
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
        self._queue.put(work)

    def record(self) -> Event:
        event = Event(self)
        self.submit(event._done.set)
        return event

    def wait(self, event: Event) -> None:
        self.submit(event._done.wait)

    def hold(self) -> Gate:
        gate = Gate(self)
        self.submit(gate._block)
        return gate

    def synchronize(self) -> None:
        """Wait until everything queued so far has run; re-raise the first kernel error."""
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

    # -- worker side ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is _STOP:
                return
            if self._delay is not None:
                self._delay.sleep()
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported at the next synchronize
                self._keep_first(error)

    def _keep_first(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error
