"""COPY_ASYNC contract checks (opbench.harness.contracts): the real cpu backend passes them,
with and without delays, and each deliberately broken variant fails its clause every time.

Determinism: every clause check holds a stream (a gate the host releases) before queuing the
work under test, so a missing wait always reads NaN poison -- delays only add noise on top.
"""

from __future__ import annotations

import numpy as np
import pytest

from opbench.backends.common.arrays import plain
from opbench.backends.cpu import CpuBackend
from opbench.harness import contracts
from opbench.harness.contracts import COPY_ASYNC_CHECKS, ContractViolation


class CopyIgnoresSourceQueue(CpuBackend):
    """Bug: the copy runs on the destination stream without waiting for the source's work."""

    def copy_async(self, src, dst_device, stream=None):
        dst = self.empty(src.shape, src.dtype, dst_device)
        source, target = plain(src), plain(dst)
        self.stream(dst.device).submit(lambda: np.copyto(target, source))
        return dst


class DestinationDoesNotWait(CpuBackend):
    """Bug: the copy is ordered on the source stream, but the destination never waits for it."""

    def copy_async(self, src, dst_device, stream=None):
        dst = self.empty(src.shape, src.dtype, dst_device)
        source, target = plain(src), plain(dst)
        self.stream(src.device).submit(lambda: np.copyto(target, source))
        return dst


class SynchronizeReturnsEarly(CpuBackend):
    """Bug: synchronize reports errors but does not wait for queued work."""

    def synchronize(self, device=None):
        streams = ([self.stream(d) for d in self.device_list()] if device is None
                   else [self.stream(device)])
        for stream in streams:
            stream.raise_pending()


class SynchronizeWaitsForDeviceZeroOnly(CpuBackend):
    """Bug: synchronize() (all devices) only drains the first device."""

    def synchronize(self, device=None):
        super().synchronize(0 if device is None else device)


class CopyBlocksTheHost(CpuBackend):
    """Bug: copy_async synchronizes the source first (correct data, but serializes copies)."""

    def copy_async(self, src, dst_device, stream=None):
        self.stream(src.device).synchronize()
        return super().copy_async(src, dst_device, stream)


BROKEN = [
    (CopyIgnoresSourceQueue, "copy_waits_for_source"),
    (DestinationDoesNotWait, "destination_waits_for_copy"),
    (SynchronizeReturnsEarly, "synchronize_waits"),
    (SynchronizeWaitsForDeviceZeroOnly, "synchronize_waits"),
    (CopyBlocksTheHost, "host_not_blocked"),
]


@pytest.fixture(autouse=True)
def short_hold_timeout(monkeypatch):
    # only a host-blocking copy ever reaches it; keep that case quick
    monkeypatch.setattr(contracts, "HOLD_TIMEOUT_S", 1.0)


@pytest.mark.parametrize("delay,seeds", [(False, [0]), (True, [0, 1])])
def test_cpu_backend_passes_the_contract(delay, seeds):
    for seed in seeds:
        with CpuBackend(delay=delay, delay_seed=seed, delay_max_ms=1.0) as backend:
            assert contracts.run_copy_async_contract(backend, seed=seed) == dict.fromkeys(
                COPY_ASYNC_CHECKS
            )


@pytest.mark.parametrize("broken,clause", BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_broken_variant_fails_its_clause_every_time(broken, clause):
    for seed in range(2):  # different delay patterns, same verdict
        with broken(delay=True, delay_seed=seed, delay_max_ms=1.0) as backend:
            with pytest.raises(ContractViolation):
                COPY_ASYNC_CHECKS[clause](backend, seed=seed)


@pytest.mark.parametrize("broken,clause", BROKEN[:3], ids=[b.__name__ for b, _ in BROKEN[:3]])
def test_broken_variant_fails_without_delays_too(broken, clause):
    with broken() as backend:
        with pytest.raises(ContractViolation):
            COPY_ASYNC_CHECKS[clause](backend)


def test_violation_message_names_the_clause_and_the_stale_value():
    with CopyIgnoresSourceQueue() as backend:
        with pytest.raises(ContractViolation, match=r"did not wait.*NaN \(read before"):
            contracts.check_copy_waits_for_source(backend)


def test_run_reports_each_check_by_name():
    with DestinationDoesNotWait() as backend:
        results = contracts.run_copy_async_contract(backend)
    assert set(results) == set(COPY_ASYNC_CHECKS)
    assert "destination" in results["destination_waits_for_copy"]


class WithoutStallHooks:
    """Mixin: a backend that cannot tell when a stream is stalled (the hooks' defaults), so
    the checks fall back to their fixed settle and probe times."""

    def stalled(self, device):
        return False

    def host_blocked(self):
        return False


@pytest.mark.parametrize("broken,clause", BROKEN[:4], ids=[b.__name__ for b, _ in BROKEN[:4]])
def test_broken_variant_fails_without_the_stall_hooks_too(broken, clause):
    hookless = type(f"{broken.__name__}WithoutHooks", (WithoutStallHooks, broken), {})
    with hookless() as backend:
        with pytest.raises(ContractViolation):
            COPY_ASYNC_CHECKS[clause](backend)


GATED_WAITS = ["copy_waits_for_source", "destination_waits_for_copy", "synchronize_waits"]


@pytest.mark.parametrize("clause", GATED_WAITS)
def test_the_cpu_backend_ends_every_settle_and_probe_through_its_hooks(monkeypatch, clause):
    outcomes = spy_on_waits(monkeypatch)
    with CpuBackend() as backend:
        COPY_ASYNC_CHECKS[clause](backend)
    assert outcomes and "timeout" not in outcomes, outcomes  # never the fixed wait


@pytest.mark.parametrize("clause", GATED_WAITS)
def test_without_hooks_a_correct_backend_waits_the_fixed_time(monkeypatch, clause):
    monkeypatch.setattr(contracts, "SETTLE_S", 0.05)
    monkeypatch.setattr(contracts, "SYNC_PROBE_S", 0.05)
    outcomes = spy_on_waits(monkeypatch)
    hookless = type("CpuWithoutHooks", (WithoutStallHooks, CpuBackend), {})
    with hookless() as backend:
        COPY_ASYNC_CHECKS[clause](backend)
    assert outcomes and set(outcomes) == {"timeout"}, outcomes


def spy_on_waits(monkeypatch) -> list[str]:
    """Record how each of the checks' bounded waits ended ("done", "blocked", "timeout")."""
    outcomes: list[str] = []
    real = contracts._wait_until

    def recording(*args):
        outcomes.append(real(*args))
        return outcomes[-1]

    monkeypatch.setattr(contracts, "_wait_until", recording)
    return outcomes


def test_a_large_payload_repeats_a_prime_period_within_its_range():
    """Past FILL_PERIOD elements a payload repeats one seeded draw (64 MiB payloads cost a copy,
    not a draw): the values stay away from zero, and only an offset of a whole period reads
    the same values."""
    from opbench.harness.cases import FILL_PERIOD

    period = FILL_PERIOD
    x = contracts._payload(np.random.default_rng(3), 2 * period + 5, "f16").astype(np.float64)
    assert np.array_equal(x[:period], x[period:2 * period])
    assert np.abs(x).min() >= 0.0099 and np.abs(x).max() <= 1.0
    for offset in (1, 2, 1 << 10, 1 << 20):
        assert not np.array_equal(x[offset:offset + 4099], x[:4099])
