"""Backend-agnostic contract checks for COPY_ASYNC (ggml's ``ggml_backend_tensor_copy_async``).

The contract: (1) the copy happens after all work queued on the source before the call;
(2) work queued on the destination after the call sees the data; (3) the host is not blocked;
(4) several copies may be in flight before one synchronize (which must wait for all of them).

Races are made deterministic, not likely: each check first *holds* a stream (a queued item
that blocks until the host releases it -- slow work of known, unbounded length), queues the
work under test behind it, then releases.  A missing wait therefore always reads the poison
(NaN) the arrays were made with, never depends on luck.  Besides protocol.py's methods the
checks need one fault-injection hook on the backend: ``hold(stream) -> gate`` with
``gate.release()`` (the cpu backend has it; a CUDA backend can spin on a host-mapped flag).
Two more hooks are optional and only save time: ``stalled(device)`` and ``host_blocked()`` say
when a stream, or a host thread in a synchronize, cannot move until the hold is released --
the moment a check may release it; without them it waits SETTLE_S / SYNC_PROBE_S, and a
stream that is *not* stalled (a missing wait) is never cut short either way.
``check_random_trials`` adds seeded, ungated trials for backends run with delays on.

Only protocol ops move data: the payload is written on the source by a queued ``cpy`` and read
on the destination by another queued ``cpy``, so any backend implementing CPY can be checked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from opbench.protocol import numpy_dtype

from .cases import FILL_PERIOD, periodic_fill

HOLD_TIMEOUT_S = 5.0  # safety valve: a host-blocking implementation must not hang the check
SYNC_PROBE_S = 0.3  # how long a synchronize is watched for returning while work is held
SETTLE_S = 0.5  # how long unheld streams get to run what they can before a hold is released
POLL_S = 0.001  # how often a backend's stalled()/host_blocked() is asked meanwhile
SIZES = (1, 7, 4099, 1 << 16, 1 << 20)  # elements: 1 element .. 4 MiB of f32


class ContractViolation(AssertionError):
    """The backend broke the COPY_ASYNC contract; the message says which clause and how."""


class _Hold:
    """A held stream that releases itself after HOLD_TIMEOUT_S, remembering that it had to."""

    def __init__(self, backend: Any, stream: Any) -> None:
        self.gate = backend.hold(stream)
        self.expired = threading.Event()
        self._timer = threading.Timer(HOLD_TIMEOUT_S, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired.set()
        self.gate.release()

    def release(self) -> None:
        self._timer.cancel()
        self.gate.release()


class _Background:
    """``call`` on a helper thread; ``finish()`` joins it and re-raises what it raised."""

    def __init__(self, call: Callable[[], None]) -> None:
        self.done = threading.Event()
        self._errors: list[BaseException] = []
        self._call = call
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as error:  # noqa: BLE001 - re-raised by finish()
            self._errors.append(error)
        self.done.set()

    def finish(self) -> None:
        self.done.wait()
        if self._errors:
            raise self._errors[0]


def _remote(backend: Any, device: Any) -> bool:
    """Under the rank runtime another process runs ``device``: this one cannot watch it (its
    ``synchronize(device)`` returns at once), so clauses about its timing are judged there."""
    runtime = getattr(backend, "runtime", None)
    return hasattr(runtime, "local") and not runtime.local(runtime.device(device))


def _asks(backend: Any, hook: str, *args: Any) -> bool:
    """An optional hook's answer; a backend without it cannot tell (False)."""
    method = getattr(backend, hook, None)
    return bool(method(*args)) if method is not None else False


def _wait_until(done: threading.Event, blocked: Callable[[], bool], limit: float) -> str:
    """Wait for ``done``: "done" once it is set, "blocked" once ``blocked()`` says it cannot
    be set before the hold is released, "timeout" after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not done.wait(POLL_S):
        if blocked():
            return "done" if done.is_set() else "blocked"
        if time.monotonic() >= deadline:
            return "done" if done.is_set() else "timeout"
    return "done"


def _release_after_settling(backend: Any, hold: _Hold, device: Any) -> None:
    """Let ``device`` run everything that does not depend on the held work, then release.

    A correct backend's ``device`` is blocked (it waits for the held source): released as soon
    as the backend reports it stalled behind the hold (``stalled``), else after SETTLE_S.  A
    missing wait lets ``device`` run at once -- reading poison, every time: a stream that is
    not stalled is never cut short.  When ``device`` runs in another process (ranks), the hold
    is kept for the whole SETTLE_S."""
    settle = _Background(lambda: backend.synchronize(device))
    _wait_until(settle.done, lambda: _asks(backend, "stalled", device), SETTLE_S)
    if _remote(backend, device):
        time.sleep(SETTLE_S)
    hold.release()
    settle.finish()


def _payload(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Seeded values in [-1, -0.01] U [0.01, 1], never zero, exactly representable in dtype.

    One float32 draw, shifted away from zero in place; past FILL_PERIOD values the draw
    repeats (a 64 MiB payload: 115 ms drawn whole, a copy of the period instead).  A copy that
    reads poison, stale data or another offset still differs: the period is a prime number of
    elements, so only an offset that is a multiple of it would read the same values."""
    if n > FILL_PERIOD:
        return periodic_fill(_payload(rng, FILL_PERIOD, dtype), (n,))
    x = rng.random(n, dtype=np.float32)
    x *= np.float32(1.98)
    x -= np.float32(0.99)
    x += np.copysign(np.float32(0.01), x)
    return x.astype(numpy_dtype(dtype), copy=False)


def _poisoned(backend: Any, n: int, dtype: str, device: Any) -> Any:
    return backend.to_device(np.full(n, np.nan, numpy_dtype(dtype)), device)


def _write_on_device(backend: Any, host: np.ndarray, device: Any) -> Any:
    """An array of ``device`` whose contents come from queued device work (a CPY), not from
    the host: a copy that does not wait for the source's queue reads its poison."""
    staged = backend.to_device(host, device)
    target = _poisoned(backend, host.size, _name(host), device)
    backend.cpy(staged, target, (0,))
    return target


def _read_on_device(backend: Any, arr: Any, n: int, dtype: str, device: Any) -> Any:
    """Queue a CPY of ``arr`` on ``device`` (work queued on the destination after the call)."""
    out = _poisoned(backend, n, dtype, device)
    backend.cpy(arr, out, (0,))
    return out


def _name(host: np.ndarray) -> str:
    return {np.dtype(numpy_dtype(n)): n for n in ("f32", "f16", "bf16")}[host.dtype]


def _expect_same(what: str, got: np.ndarray, want: np.ndarray) -> None:
    got = np.asarray(got).reshape(want.shape)
    bad = np.flatnonzero(~_bitwise_equal(got, want))  # COPY_ASYNC is bit-exact
    if bad.size:
        i = int(bad[0])
        stale = "NaN (read before the data landed)" if np.isnan(float(got[i])) else got[i]
        raise ContractViolation(
            f"{what}: {bad.size}/{want.size} elements differ; first at [{i}]: got {stale}, "
            f"expected {want[i]}"
        )


def _bitwise_equal(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    uint = np.dtype(f"u{want.dtype.itemsize}")
    return got.view(uint) == want.view(uint)


def _two_devices(backend: Any) -> tuple[Any, Any]:
    devices = backend.devices(2)
    return devices[0], devices[1]


# -- the checks --------------------------------------------------------------------------------
def check_copy_waits_for_source(backend: Any, seed: int = 0, n: int = 4099, dtype="f32") -> None:
    """Clause 1: a copy queued behind (held) work on the source copies that work's result."""
    src_dev, dst_dev = _two_devices(backend)
    want = _payload(np.random.default_rng(seed), n, dtype)
    hold = _Hold(backend, backend.stream(src_dev))
    x = _write_on_device(backend, want, src_dev)
    y = backend.copy_async(x, dst_dev)
    _release_after_settling(backend, hold, dst_dev)
    backend.synchronize()
    _expect_same("copy_async did not wait for work queued on the source",
                 backend.to_host(y), want)


def check_destination_waits_for_copy(backend: Any, seed: int = 0, n: int = 4099,
                                     dtype="f32") -> None:
    """Clause 2: work queued on the destination right after the call reads the copied data."""
    src_dev, dst_dev = _two_devices(backend)
    want = _payload(np.random.default_rng(seed), n, dtype)
    hold = _Hold(backend, backend.stream(src_dev))
    x = _write_on_device(backend, want, src_dev)
    y = backend.copy_async(x, dst_dev)
    z = _read_on_device(backend, y, n, dtype, dst_dev)
    _release_after_settling(backend, hold, dst_dev)
    backend.synchronize()
    _expect_same("work queued on the destination after copy_async ran before the copy landed",
                 backend.to_host(z), want)


def check_host_not_blocked(backend: Any, seed: int = 0, n: int = 4099, dtype="f32") -> None:
    """Clause 3: copy_async returns while the source is still busy."""
    src_dev, dst_dev = _two_devices(backend)
    want = _payload(np.random.default_rng(seed), n, dtype)
    hold = _Hold(backend, backend.stream(src_dev))
    x = _write_on_device(backend, want, src_dev)
    y = backend.copy_async(x, dst_dev)
    blocked = hold.expired.is_set()
    hold.release()
    backend.synchronize()
    if blocked:
        raise ContractViolation("copy_async blocked the host until the source's work was done")
    _expect_same("copy_async result", backend.to_host(y), want)


def check_synchronize_waits(backend: Any, seed: int = 0, n: int = 4099, dtype="f32") -> None:
    """Clause 4's other half: synchronize() and synchronize(dst) wait for copies in flight,
    and synchronize() waits for every device."""
    src_dev, dst_dev = _two_devices(backend)
    want = _payload(np.random.default_rng(seed), n, dtype)
    for target in (None, dst_dev):
        hold = _Hold(backend, backend.stream(src_dev))
        y = backend.copy_async(_write_on_device(backend, want, src_dev), dst_dev)
        watched = [src_dev] + ([] if target is None else [dst_dev])
        _expect_blocks(backend, lambda t=target: backend.synchronize(t), hold,
                       f"synchronize({'' if target is None else 'dst'}) with a copy in flight",
                       judged=not any(_remote(backend, d) for d in watched))
        _expect_same("data after synchronize", backend.to_host(y), want)
    for device in backend.devices(2):
        hold = _Hold(backend, backend.stream(device))
        _expect_blocks(backend, backend.synchronize, hold, f"synchronize() with {device} busy",
                       judged=not _remote(backend, device))


def _expect_blocks(backend: Any, call: Callable[[], None], hold: _Hold, what: str,
                   judged: bool = True) -> None:
    """``call`` (run on a helper thread) must not return while ``hold`` is held (``judged``:
    False on a rank that does not run the held or the synchronized device)."""
    probe = _Background(call)
    returned_early = _wait_until(probe.done, lambda: _asks(backend, "host_blocked"),
                                 SYNC_PROBE_S) == "done"
    hold.release()
    probe.finish()
    backend.synchronize()
    if returned_early and judged:
        raise ContractViolation(f"{what} returned while work was still queued")


def check_many_copies_one_synchronize(backend: Any, seed: int = 0, sizes=SIZES) -> None:
    """Clause 4: copies of every size from both devices, all in flight, then one synchronize."""
    devices = backend.devices(2)
    rng = np.random.default_rng(seed)
    # payloads drawn before the holds: the held window is only the queueing under test
    wants = [_payload(rng, n, ("f32", "f16", "bf16")[i % 3]) for i, n in enumerate(sizes)]
    holds = [_Hold(backend, backend.stream(d)) for d in devices]
    pending = []
    for i, (n, want) in enumerate(zip(sizes, wants)):
        dtype = ("f32", "f16", "bf16")[i % 3]
        src, dst = devices[i % 2], devices[(i + 1) % 2]
        y = backend.copy_async(_write_on_device(backend, want, src), dst)
        pending.append((f"copy {i} ({n} x {dtype}, {src} -> {dst})", y, want))
    for hold in holds:
        hold.release()
    backend.synchronize()
    if any(hold.expired.is_set() for hold in holds):
        raise ContractViolation("copy_async blocked the host: copies were not all in flight")
    for what, y, want in pending:
        _expect_same(what, backend.to_host(y), want)


def check_chain(backend: Any, seed: int = 0, n_devices: int = 4, n: int = 4099,
                dtype: str = "f32") -> None:
    """A chain d0 -> d1 -> ... -> dN-1, every hop queued before the first one can run."""
    devices = backend.devices(n_devices)
    want = _payload(np.random.default_rng(seed), n, dtype)
    hold = _Hold(backend, backend.stream(devices[0]))
    hops = [_write_on_device(backend, want, devices[0])]
    for device in devices[1:]:
        hops.append(backend.copy_async(hops[-1], device))
    last = _read_on_device(backend, hops[-1], n, dtype, devices[-1])
    hold.release()
    backend.synchronize()
    for i, arr in enumerate(hops[1:] + [last], start=1):
        _expect_same(f"chain hop {i} of {n_devices - 1}", backend.to_host(arr), want)


def check_random_trials(backend: Any, seed: int = 0, trials: int = 4, n_devices: int = 3,
                        sizes=SIZES[:4]) -> None:
    """Seeded, ungated trials (meant for a backend with delays on): random pairs, sizes and
    dtypes, copies of copies, destination reads, then one synchronize per trial."""
    devices = backend.devices(n_devices)
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        pending = []
        arrays = []  # (array, device, expected host values)
        for _ in range(int(rng.integers(2, 7))):
            n, dtype = int(rng.choice(sizes)), str(rng.choice(["f32", "f16", "bf16"]))
            if arrays and rng.random() < 0.4:  # copy a copy that may still be in flight
                x, src, want = arrays[int(rng.integers(len(arrays)))]
            else:
                src, want = devices[int(rng.integers(n_devices))], _payload(rng, n, dtype)
                x = _write_on_device(backend, want, src)
            dst = devices[(devices.index(src) + int(rng.integers(1, n_devices))) % n_devices]
            y = backend.copy_async(x, dst)
            arrays.append((y, dst, want))
            z = _read_on_device(backend, y, want.size, _name(want), dst)
            pending += [(f"trial {trial}: copy {src} -> {dst}", y, want),
                        (f"trial {trial}: read on {dst}", z, want)]
        backend.synchronize()
        for what, arr, want in pending:
            _expect_same(what, backend.to_host(arr), want)


COPY_ASYNC_CHECKS: dict[str, Callable[..., None]] = {
    "copy_waits_for_source": check_copy_waits_for_source,
    "destination_waits_for_copy": check_destination_waits_for_copy,
    "host_not_blocked": check_host_not_blocked,
    "synchronize_waits": check_synchronize_waits,
    "many_copies_one_synchronize": check_many_copies_one_synchronize,
    "chain": check_chain,
    "random_trials": check_random_trials,
}


def run_copy_async_contract(backend: Any, seed: int = 0) -> dict[str, str | None]:
    """Every check -> None (passed) or the violation's message.  Other errors propagate."""
    results: dict[str, str | None] = {}
    for name, check in COPY_ASYNC_CHECKS.items():
        try:
            check(backend, seed=seed)
            results[name] = None
        except ContractViolation as violation:
            results[name] = str(violation)
    return results
