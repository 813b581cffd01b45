"""Every case of the op tables as its own test, judged by the same runner as ``opbench test``."""

from __future__ import annotations

import pytest

from opbench.harness.ops import SPECS
from opbench.harness.runner import KnownFailures, run_case


def _cases(full: bool):
    for spec in SPECS.values():
        yield from (spec.cases() if full else spec.quick_cases())


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = list(_cases(metafunc.config.getoption("--full")))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def test_case(backend, case):
    record = run_case(backend, case, known=KnownFailures(backend.known_failures()))
    if record["status"] == "UNSUPPORTED":
        pytest.skip(record["reason"])
    if record["status"] == "XFAIL":
        pytest.xfail(record["reason"])
    assert record["status"] == "OK", "\n".join(record["errors"] or [str(record["reason"])])
