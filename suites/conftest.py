"""pytest front end to the case tables: ``pytest suites --backend cpu [--full]``.

One test per case, the case id as test id (so ``-k`` works on ids).  The backend comes from
``--backend`` or ``OPBENCH_BACKEND`` (default cpu); the quick subset runs unless ``--full``.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("opbench")
    group.addoption("--backend", default=os.environ.get("OPBENCH_BACKEND", "cpu"),
                    help="backend to test (name, package.module:Class or file.py:Class)")
    group.addoption("--full", action="store_true", help="run the full default case tables")


@pytest.fixture(scope="session")
def backend(request):
    from opbench.harness.pool import make_backend
    from opbench.harness.registry import backend_class

    ref = request.config.getoption("--backend")
    ok, why = backend_class(ref).available()
    if not ok:
        pytest.skip(f"backend {ref} unavailable: {why}")
    instance = make_backend(ref, {})
    yield instance
    instance.close()
