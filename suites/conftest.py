"""pytest front end to the case tables: ``pytest suites [--backend cpu,torch] [--full]``.

One test per case and backend, the case id in the test id (so ``-k`` works on ids).  Backends
come from ``--backend`` or ``OPBENCH_BACKEND`` (comma separated; default: every built-in
backend, each skipping with its reason where it is not installed); the quick subset runs unless
``--full``.
"""

from __future__ import annotations

import os

import pytest

from opbench.harness.registry import registered_names

#: every registered backend (the ``opbench.backends`` entry points of pyproject.toml)
DEFAULT_BACKENDS = ",".join(registered_names())


def pytest_addoption(parser):
    group = parser.getgroup("opbench")
    group.addoption("--backend", default=os.environ.get("OPBENCH_BACKEND", DEFAULT_BACKENDS),
                    help="backends to test, comma separated (names, package.module:Class or"
                         " file.py:Class); default: " + DEFAULT_BACKENDS)
    group.addoption("--full", action="store_true", help="run the full default case tables")


def pytest_configure(config):
    """A backend name or option that does not exist is one usage error before collection,
    not an error per case."""
    from opbench.errors import UsageError
    from opbench.harness.registry import parse_ref, split_backend_list

    try:
        for ref in split_backend_list(config.getoption("--backend")):
            parse_ref(ref)
    except UsageError as exc:
        raise pytest.UsageError(f"--backend: {exc}") from None


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        from opbench.harness.registry import split_backend_list

        names = split_backend_list(metafunc.config.getoption("--backend"))
        metafunc.parametrize("backend_name", names, scope="session")


@pytest.fixture(scope="session")
def available_backend(backend_name):
    """The backend reference, or a skip with the reason it is unavailable here."""
    from opbench.harness.registry import backend_class

    ok, why = backend_class(backend_name).available()
    if not ok:
        pytest.skip(f"backend {backend_name} unavailable: {why}")
    return backend_name


@pytest.fixture(scope="session")
def backend(available_backend):
    from opbench.harness.registry import open_backend

    instance = open_backend(available_backend)
    yield instance
    instance.close()
