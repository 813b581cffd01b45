"""Every op-level zoo bug is caught by the default case tables; the real cpu backend is not."""

from __future__ import annotations

import math
import re

import pytest
from op_bugs import MODEL_BUGS, NEW_INPUT_BUGS, ONLY_NEW_CASES_CATCH, OP_BUGS

from opbench.backends.cpu import CpuBackend
from opbench.harness.models.cases import model_cases
from opbench.harness.ops import SPECS
from opbench.harness.runner import run_case


def _first_failure(backend, op):
    """Scan the quick subset first, then the rest of the default table; first failing case."""
    spec = SPECS[op]
    quick = spec.quick_cases()
    rest = [c for c in spec.cases() if c not in set(quick)]
    for case in quick + rest:
        record = run_case(backend, case)
        if record["status"] not in ("OK", "UNSUPPORTED"):
            return case, record
    return None, None


@pytest.mark.parametrize("bug", list(OP_BUGS), ids=lambda cls: cls.__name__)
def test_default_suite_catches_bug(bug):
    backend = bug()
    backend.devices(1)
    try:
        case, record = _first_failure(backend, OP_BUGS[bug])
    finally:
        backend.close()
    assert case is not None, f"{bug.__name__}: no case of {OP_BUGS[bug]} fails; add cases"
    assert record["status"] == "FAIL", record["reason"]


@pytest.mark.parametrize("op", list(SPECS))
def test_real_cpu_backend_passes_quick_tables(op):
    backend = CpuBackend()
    backend.devices(1)
    try:
        for case in SPECS[op].quick_cases():
            record = run_case(backend, case)
            assert record["status"] == "OK", f"{case.id}: {record['reason']}"
    finally:
        backend.close()


@pytest.mark.parametrize("bug", list(ONLY_NEW_CASES_CATCH), ids=lambda cls: cls.__name__)
def test_new_cases_alone_catch_bug(bug):
    """Every case outside the new class passes the bug; some case of the class fails it."""
    scope, new = (re.compile(p) for p in ONLY_NEW_CASES_CATCH[bug])
    cases = [c for c in SPECS[OP_BUGS[bug]].cases() if scope.search(c.id)]
    backend = bug()
    backend.devices(1)
    try:
        statuses = {c.id: run_case(backend, c)["status"] for c in cases}
    finally:
        backend.close()
    old = {i: s for i, s in statuses.items() if not new.search(i)}
    assert set(old.values()) == {"OK"}, [i for i, s in old.items() if s != "OK"][:3]
    assert any(s == "FAIL" for i, s in statuses.items() if new.search(i))


@pytest.mark.parametrize("bug", list(NEW_INPUT_BUGS), ids=lambda cls: cls.__name__)
def test_new_input_kinds_alone_catch_their_bug(bug):
    """The bug passes the op's --quick cases of the older kinds and fails one of the new kind
    (the full older tables were checked the same way when the bug was added)."""
    op, new_kind = NEW_INPUT_BUGS[bug]
    spec = SPECS[op]
    new = [c for c in spec.cases() if re.search(new_kind, c.id)]
    old = [c for c in spec.quick_cases() if c not in set(new) and not _new_kind(c)]
    assert new and old
    backend = bug()
    backend.devices(1)
    try:
        failed_old = [c.id for c in old if run_case(backend, c)["status"] != "OK"]
        caught = next((c for c in new if run_case(backend, c)["status"] == "FAIL"), None)
    finally:
        backend.close()
    assert not failed_old, f"{bug.__name__} already fails older cases: {failed_old[:3]}"
    assert caught is not None, f"{bug.__name__}: no case of the new kind catches it"


def _new_kind(case) -> bool:
    """Cases added for special values, positions and sizes past backend thresholds."""
    return bool(re.search(r"vals=|pos=", case.id)) or case in set(
        SPECS[case.op].threshold_cases())


@pytest.mark.parametrize("bug", list(MODEL_BUGS), ids=lambda cls: cls.__name__)
def test_model_cases_alone_catch_bug(bug):
    """The bug passes its op's quick table (a covering array of the default one) and fails a
    case of its model.  Why no default case can catch it: each one passes head_size**-0.5."""
    op, model = MODEL_BUGS[bug]
    spec = SPECS[op]
    assert all(math.isclose(spec.params(c).scale, c["hs"][0] ** -0.5) for c in spec.cases())
    backend = bug()
    backend.devices(1)
    try:
        default = {c.id: run_case(backend, c, run_id="zoo")["status"]
                   for c in spec.quick_cases()}
        at_model = [run_case(backend, c, run_id="zoo")["status"]
                    for c in model_cases(model) if c.op == op]
    finally:
        backend.close()
    assert set(default.values()) == {"OK"}, [i for i, s in default.items() if s != "OK"][:3]
    assert "FAIL" in at_model
