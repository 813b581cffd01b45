"""Running one case on one backend and judging it; the records this produces.

The body here is the one generic test: every op, every case table, every backend goes through
``run_case``.  Outputs are poisoned with NaN and surrounded by guard regions before the backend
sees them; inputs are rounded to their storage dtype before the oracle sees them.
"""

from __future__ import annotations

import functools
import math
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from opbench.protocol import Backend, numpy_dtype

from ..reference import copies as copy_ref
from .cases import Case, Inputs, OpSpec, OutputSpec
from .compare import Verdict, compare_close, compare_exact
from .ops import SPECS, support
from .records import case_record, new_run_id

GUARD_SENTINEL = -1234.0

def guard_length(shape: tuple[int, ...]) -> int:
    """One full leading-dim row (so a write one row past the end lands in the guard)."""
    size = int(math.prod(shape))
    row = size // shape[0] if shape and shape[0] else size
    return int(min(max(row, 16), 1 << 16))


@dataclass
class DeviceBuffer:
    """A flat host buffer [guard | output | guard] mirrored on the device."""

    name: str
    spec: OutputSpec
    guard: int
    host_before: np.ndarray
    device_flat: Any
    device_view: Any

    def split(self, host_after: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = host_after.size - 2 * self.guard
        return (host_after[: self.guard], host_after[self.guard: self.guard + n],
                host_after[self.guard + n:])


def allocate_output(backend: Backend, device: Any, name: str, spec: OutputSpec,
                    inputs: Inputs) -> DeviceBuffer:
    dtype = numpy_dtype(spec.dtype)
    size = int(math.prod(spec.shape))
    guard = guard_length(spec.shape)
    host = np.full(size + 2 * guard, GUARD_SENTINEL, dtype=dtype)
    if spec.init_from:
        host[guard: guard + size] = inputs.arrays[spec.init_from].reshape(-1)
    else:
        host[guard: guard + size] = poison(dtype)  # a kernel that skips an element is caught
    flat = backend.to_device(host, device)
    return DeviceBuffer(name, spec, guard, host, flat, backend.view(flat, guard, spec.shape))


def poison(dtype: np.dtype) -> np.ndarray:
    """The output poison: a negative signalling NaN with payload 1.  No rule accepts it where a
    number is due, and the NaN rule accepts no signalling NaN from a conversion, so an element
    left unwritten fails even where the oracle has a NaN; no table input holds this pattern."""
    one = np.ones(1, dtype)
    raw = _bits(one)
    width = 8 * one.dtype.itemsize
    exponent = {16: 5 if one.dtype == np.float16 else 8, 32: 8, 64: 11}[width]
    raw[0] = (1 << (width - 1)) | (((1 << exponent) - 1) << (width - 1 - exponent)) | 1
    return one


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def check_guards(buffer: DeviceBuffer, host_after: np.ndarray) -> str | None:
    before_lo, _, before_hi = buffer.split(buffer.host_before)
    after_lo, _, after_hi = buffer.split(host_after)
    lo = int(np.sum(_bits(before_lo) != _bits(after_lo)))
    hi = int(np.sum(_bits(before_hi) != _bits(after_hi)))
    if lo or hi:
        return (f"{buffer.name}: out-of-bounds write: {lo} guard elements before and {hi} after"
                f" the output changed")
    return None


def references(spec: OpSpec, case: Case, inputs: Inputs) -> tuple[dict, dict]:
    """(float64 oracle, same oracle in float32 rounded to each output's storage dtype).

    The second is computed on first use: each output's entry is a function giving it, which
    ``compare_close`` calls only when an error passes the tolerance's floor (below it no element
    can fail).  A correct backend rarely gets there, and the float32 oracle was half of the
    oracles' time.  The inputs are made read-only, so a backend that writes into the arrays it
    was given fails there instead of changing what that oracle would later read."""
    outputs = spec.outputs(case, inputs)
    expected = spec.reference(case, inputs, np.float64)
    if spec.exact:
        return expected, expected
    for array in inputs.arrays.values():
        array.flags.writeable = False

    @functools.cache
    def low() -> dict[str, np.ndarray]:
        values = spec.reference(case, inputs, np.float32)
        return {k: copy_ref.round_to(v, outputs[k].dtype) for k, v in values.items()}

    return expected, {name: functools.partial(lambda n: low()[n], name) for name in expected}


def judge(spec: OpSpec, case: Case, name: str, expected, low, actual) -> Verdict:
    if spec.exact:
        return compare_exact(np.asarray(expected), actual, converted=spec.converts(case))
    # ``references`` (and every other caller of ``judge_output``) rounds the float32 oracle to
    # the output's dtype, which is the dtype of ``actual``
    return compare_close(expected, low, actual, spec.tolerance(case.dtype),
                         low_rounded_to=actual.dtype)


class KnownFailures:
    """A backend's (regex, reason[, may_pass]) entries.  ``may_pass`` marks precision limits
    whose failure depends on the random inputs: a matching pass is then plain OK, not XPASS."""

    def __init__(self, entries: list[tuple]) -> None:
        self.entries = [(re.compile(e[0]), e[1], bool(e[2]) if len(e) > 2 else False)
                        for e in entries]

    def match(self, case_id: str) -> tuple[str, bool] | None:
        for regex, reason, may_pass in self.entries:
            if regex.search(case_id):
                return reason, may_pass
        return None


def base_record(backend_name: str, case: Case, device_name: str, run_id: str,
                status: str = "OK", reason: str | None = None) -> dict:
    """A test record for ``case``; the verb attaches the run's environment."""
    return case_record("test", backend_name, case, status, run_id, device=device_name,
                       reason=reason, env={})


def place(backend: Backend, spec: OpSpec, case: Case, inputs: Inputs, device: Any
          ) -> tuple[dict[str, Any], dict[str, DeviceBuffer]]:
    """Upload the inputs and allocate the guarded outputs on ``device``: (the op's arguments
    by name, the output buffers).  Shared by the test runner and perf mode."""
    args = {name: backend.to_device(arr, device) for name, arr in inputs.arrays.items()}
    buffers = {name: allocate_output(backend, device, name, out_spec, inputs)
               for name, out_spec in spec.outputs(case, inputs).items()}
    args.update({name: buf.device_view for name, buf in buffers.items()})
    return args, buffers


def execute(backend: Backend, spec: OpSpec, case: Case, inputs: Inputs, device: Any):
    """Upload, run, synchronize, download.  Returns (buffers, host copies)."""
    args, buffers = place(backend, spec, case, inputs, device)
    spec.call(backend, case, args, backend.stream(device))
    backend.synchronize(device)
    return buffers, {name: backend.to_host(buf.device_flat) for name, buf in buffers.items()}


def run_case(backend: Backend, case: Case, *, run_seed: int = 0, device: Any = None,
             device_name: str = "cpu:0", run_id: str | None = None,
             known: KnownFailures | None = None, label: str | None = None) -> dict:
    """Run one case on one backend and return its result record (``run_id``: the run it
    belongs to; a fresh one when the caller has none, e.g. a test calling it directly;
    ``label``: the record's backend, ``registry.backend_label``; the backend's name if None)."""
    run_id = run_id or new_run_id()
    spec = SPECS[case.op]
    record = base_record(label or backend.name, case, device_name, run_id)
    try:
        spec.validate(case)
    except ValueError as exc:
        record.update(status="ERROR", reason=f"bad case: {exc}")
        return record
    supported = support(backend, case)
    if supported is not True:
        record.update(status="UNSUPPORTED", reason=str(supported))
        return record
    started = time.perf_counter()
    if hasattr(spec, "run_check"):
        _run_self_judging(backend, spec, case, run_seed, record)
        record["metrics"]["seconds"] = round(time.perf_counter() - started, 6)
        _apply_known(record, known)
        return record
    try:
        inputs = spec.make_inputs(case, np.random.default_rng(case.seed(run_seed)))
        expected, low = references(spec, case, inputs)
        buffers, hosts = execute(backend, spec, case, inputs, device)
    except Exception as exc:  # a backend bug must not stop the run
        record.update(status="ERROR", reason=f"{type(exc).__name__}: {exc}",
                      errors=traceback.format_exc(limit=4).splitlines()[-6:])
        return record
    _judge_outputs(spec, case, buffers, hosts, expected, low, record,
                   spec.judged_rows(case, inputs))
    record["metrics"]["seconds"] = round(time.perf_counter() - started, 6)
    _apply_known(record, known)
    return record


def judge_output(spec: OpSpec, case: Case, buf: DeviceBuffer, host_after: np.ndarray,
                 expected, low, rows: np.ndarray | None = None) -> tuple[Verdict, list[str]]:
    """One output judged: its verdict, and its problems (an out-of-bounds write, a write
    outside ``rows``, a failed verdict).  An output passes when it has no problem: the one
    definition of passed, used by ``run_case`` and by the kernel-level tests
    (``triton_testing``).  ``rows`` (``OpSpec.judged_rows``): the leading-dim rows ``expected``
    holds; every other row must be unchanged."""
    problems = []
    guard_problem = check_guards(buf, host_after)
    if guard_problem:
        problems.append(guard_problem)
    actual = buf.split(host_after)[1].reshape(buf.spec.shape)
    if rows is not None:
        stray = rows_changed_outside(buf, actual, rows)
        if stray:
            problems.append(stray)
        actual = actual[rows]
    verdict = judge(spec, case, buf.name, expected, low, actual)
    if not verdict.ok:
        problems.append(verdict.describe(buf.name))
    return verdict, problems


CHANGE_SCAN_ELEMENTS = 1 << 24  # rows compared per pass: bounded temporaries on huge outputs


def rows_changed_outside(buf: DeviceBuffer, actual: np.ndarray, rows: np.ndarray) -> str | None:
    """Leading-dim rows of ``actual`` outside ``rows`` whose bits differ from the output's
    initial contents, scanned in passes of a few MiB (no float or full-size copy)."""
    before = buf.split(buf.host_before)[1].reshape(actual.shape)
    per_row = max(1, actual[:1].size)
    step = max(1, CHANGE_SCAN_ELEMENTS // per_row)
    outside = np.ones(len(actual), bool)
    outside[rows] = False  # a mask, not setdiff1d (sorts both sides: 20 us against 3 us)
    strays = []
    for start in range(0, len(actual), step):
        a, b = actual[start:start + step], before[start:start + step]
        differs = (_bits(a.reshape(-1)) != _bits(b.reshape(-1))).reshape(len(a), -1)
        strays.append(np.flatnonzero(differs.any(axis=1) & outside[start:start + step]) + start)
    stray = np.concatenate(strays) if strays else np.array([], int)
    if stray.size:
        return (f"{buf.name}: {stray.size} rows outside the {len(rows)} the op writes changed "
                f"(first: row {int(stray[0])})")
    return None


def _run_self_judging(backend, spec, case, run_seed, record) -> None:
    """A contract op (COPY_ASYNC): the spec runs and judges the case itself."""
    from .contracts import ContractViolation

    reason = spec.unsupported(backend, case)
    if reason:
        record.update(status="UNSUPPORTED", reason=reason)
        return
    try:
        spec.run_check(backend, case, case.seed(run_seed))
    except ContractViolation as violation:
        record.update(status="FAIL", reason=str(violation), errors=[str(violation)])
    except Exception as exc:  # a backend bug must not stop the run
        record.update(status="ERROR", reason=f"{type(exc).__name__}: {exc}",
                      errors=traceback.format_exc(limit=4).splitlines()[-6:])


def _judge_outputs(spec, case, buffers, hosts, expected, low, record, rows) -> None:
    errors = []
    for name, buf in buffers.items():
        verdict, problems = judge_output(spec, case, buf, hosts[name], expected[name], low[name],
                                         rows.get(name))
        record["metrics"][name] = {"metric": verdict.metric, "value": verdict.value,
                                   "threshold": verdict.threshold, "n_bad": verdict.n_bad}
        errors += problems
    if errors:
        record.update(status="FAIL", reason=errors[0], errors=errors)


def _apply_known(record: dict, known: KnownFailures | None) -> None:
    found = known.match(record["case_id"]) if known else None
    if found is None:
        return
    reason, may_pass = found
    if record["status"] == "FAIL":
        record.update(status="XFAIL", reason=f"known failure: {reason}; {record['reason']}")
    elif record["status"] == "OK" and not may_pass:
        record.update(status="XPASS", reason=f"passes but is listed as known failure: {reason}")
