"""Fixtures shared by the tests under tests/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_script():
    """load(name): benchmarks/<name>.py imported as a module (the scripts are no package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                      BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
