"""Helpers for testing Triton kernels directly against the oracles (the project's tests use
them; so can a kernel author): interpreter mode, zero-copy torch views of NumPy arrays, and
outputs allocated and judged by the runner's own functions (``allocate_output``,
``judge_output``), so a kernel test passes exactly when ``opbench test`` would pass the op."""

from __future__ import annotations

import os

import numpy as np

from opbench.backends.triton.backend import TritonBackend, as_torch
from opbench.harness.cases import Case, Inputs, OutputSpec
from opbench.harness.compare import compare_exact
from opbench.harness.ops import SPECS
from opbench.harness.runner import DeviceBuffer, allocate_output, check_guards, judge_output
from opbench.protocol import Backend
from opbench.reference.copies import round_to

#: the protocol's default backend: NumPy arrays as device arrays, which the interpreter's
#: kernels write through zero-copy torch views
HOST = Backend()

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


def guarded(shape, dtype: str, init: np.ndarray | None = None) -> DeviceBuffer:
    """A kernel's output as ``opbench test`` allocates it (``runner.allocate_output``): NaN
    poison, or ``init`` for an in-place output, between guard regions.  The kernel writes into
    ``.device_view`` (a NumPy view: pass it through ``tt``); judge it with ``assert_passes``."""
    spec = OutputSpec(tuple(shape), dtype, init_from=None if init is None else "init")
    inputs = Inputs({} if init is None else {"init": np.asarray(init)})
    return allocate_output(HOST, None, "out", spec, inputs)


def result(buf: DeviceBuffer) -> np.ndarray:
    """What the kernel wrote (the output without its guards)."""
    return buf.split(buf.device_flat)[1].reshape(buf.spec.shape)


def guards_intact(buf: DeviceBuffer) -> bool:
    return check_guards(buf, buf.device_flat) is None


def assert_passes(op: str, buf: DeviceBuffer, expected, low=None, **params) -> None:
    """Judge ``buf`` exactly as ``opbench test`` judges an output of ``op`` in the output's
    dtype (``runner.judge_output``: guards intact, then bit-exact or the op's tolerance with
    ``low``, the oracle in float32, rounded to that dtype as the runner rounds it).  ``params``:
    the case params the judging reads besides ``type`` (``type_src`` of a copy)."""
    spec, dtype = SPECS[op], buf.spec.dtype
    low = expected if spec.exact else round_to(low, dtype)
    case = Case.make(op, type=dtype, **params)
    _, problems = judge_output(spec, case, buf, buf.device_flat, np.asarray(expected), low)
    assert not problems, "; ".join(problems)


def assert_exact(expected, actual) -> None:
    """Bit-exact, by the comparison rule data movement is judged with (for a part of an
    output, or an array the kernel writes in place without guards)."""
    verdict = compare_exact(np.asarray(expected), np.asarray(actual))
    assert verdict.ok, verdict.describe("out")


def assert_lse(expected, actual) -> None:
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(actual)), (expected, actual)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-5, atol=1e-5)
