"""Helpers for testing Triton kernels directly against the oracles (the project's tests use
them; so can a kernel author): interpreter mode, zero-copy torch views of NumPy arrays, guarded
outputs, oracle comparison with the harness's tolerance table."""

from __future__ import annotations

import os

import numpy as np

from opbench.backends.triton.backend import TritonBackend, as_torch
from opbench.harness.compare import compare_close, compare_exact
from opbench.harness.ops import SPECS
from opbench.reference.copies import round_to

GUARD = -1234.0


def require_triton():
    """Skip without triton/torch, prefer the interpreter (kernel logic, not speed), and return
    the kernel modules (rope, attention, kv, copy)."""
    ok, reason = TritonBackend.available()
    if not ok:
        import pytest

        pytest.skip(reason)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from opbench.backends.triton.backend import load_kernels, resolve_mode

    mode = resolve_mode("auto")
    return load_kernels(mode)


def tt(a: np.ndarray | None):
    """Zero-copy torch view (None stays None)."""
    return as_torch(a)


def uniform(rng, shape, dtype: str) -> np.ndarray:
    return round_to(rng.uniform(-1.0, 1.0, shape), dtype)


class Guarded:
    """An output poisoned with NaN between two guard regions of one row each."""

    def __init__(self, shape, dtype, init=None):
        self.shape = tuple(shape)
        self.n = int(np.prod(shape))
        self.guard = max(16, self.n // max(1, shape[0]))
        self.flat = round_to(np.full(self.n + 2 * self.guard, GUARD), dtype)
        self.view[...] = np.nan if init is None else init
        self._guard_bits = self._outside().view(np.uint8).copy()

    @property
    def view(self) -> np.ndarray:
        return self.flat[self.guard: self.guard + self.n].reshape(self.shape)

    def _outside(self) -> np.ndarray:
        return np.concatenate([self.flat[: self.guard], self.flat[self.guard + self.n:]])

    def guards_intact(self) -> bool:
        """No write landed outside the output (compared bit for bit)."""
        return bool(np.array_equal(self._outside().view(np.uint8), self._guard_bits))


def assert_close(op: str, dtype: str, expected, low, actual) -> None:
    verdict = compare_close(expected, round_to(low, dtype), actual, SPECS[op].tolerance(dtype))
    assert verdict.ok, verdict.describe("out")


def assert_exact(expected, actual) -> None:
    verdict = compare_exact(np.asarray(expected), np.asarray(actual))
    assert verdict.ok, verdict.describe("out")


def assert_lse(expected, actual) -> None:
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(actual)), (expected, actual)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5, atol=1e-5)
