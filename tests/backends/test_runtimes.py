"""Runtimes are composed, not inherited: a backend holds the ``Runtime`` it was given and
delegates to it; backend packages import protocol, ``backends/common`` and
``backends/runtimes``, never another backend."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from opbench.backends.cpu import CpuBackend
from opbench.backends.runtimes.threads import ThreadRuntime
from opbench.harness.registry import backend_class, registered_names
from opbench.protocol import Backend, Runtime, RuntimeBackend

BACKENDS = Path(__file__).resolve().parents[2] / "opbench" / "backends"
SHARED = {"common", "runtimes"}


def _package_of(module: str) -> str | None:
    """'opbench.backends.cpu.kernels' -> 'cpu'; '...backends.torch_backend' -> 'torch_backend'."""
    parts = module.split(".")
    if parts[:2] != ["opbench", "backends"] or len(parts) < 3:
        return None
    return parts[2].replace("_known_failures", "_backend")  # a one-module backend's table


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(BACKENDS.parent.parent).with_suffix("").parts
    owner = list(rel if path.name == "__init__.py" else rel[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = owner[: len(owner) - node.level + 1] if node.level else []
            names.append(".".join(base + ([node.module] if node.module else [])))
    return names


def test_no_backend_imports_another_backend():
    bad = []
    for path in BACKENDS.rglob("*.py"):
        own = _package_of(".".join(path.relative_to(BACKENDS.parent.parent).with_suffix("").parts))
        for name in _imports(path):
            other = _package_of(name)
            if other and other != own and other not in SHARED:
                bad.append(f"{path.relative_to(BACKENDS)} imports {name}")
    assert not bad, bad


def test_shared_modules_import_no_backend():
    for shared in SHARED:
        for path in (BACKENDS / shared).rglob("*.py"):
            assert all(_package_of(n) in (None, *SHARED) for n in _imports(path)), path


@pytest.mark.parametrize("name", registered_names())
def test_no_registered_backend_subclasses_another_packages_backend(name):
    cls = backend_class(name)
    for base in cls.__mro__[1:]:
        if issubclass(base, Backend) and base not in (Backend, RuntimeBackend):
            assert base.__module__.split(".")[:3] == cls.__module__.split(".")[:3], (cls, base)


def test_cpu_backend_runs_on_the_runtime_it_is_given():
    runtime = ThreadRuntime(delay=True, delay_seed=3, delay_max_ms=0.5)
    backend = CpuBackend(runtime=runtime)
    try:
        assert backend.runtime is runtime
        devices = backend.devices(2)
        assert backend.device_list() == devices == runtime.device_list()
        src = backend.to_device(np.arange(8, dtype=np.float32), devices[0])
        out = backend.empty((8,), np.float16, devices[0])
        backend.cpy(src, out, (0,))
        copied = backend.copy_async(out, devices[1])
        np.testing.assert_array_equal(backend.to_host(copied), np.arange(8))
    finally:
        backend.close()
    assert not any(runtime.stream(d)._thread.is_alive() for d in devices)


def test_triton_holds_a_runtime_and_is_no_cpu_backend():
    from opbench.backends.triton import TritonBackend

    assert not issubclass(TritonBackend, CpuBackend)
    ok, why = TritonBackend.available()
    if not ok:
        pytest.skip(why)
    backend = TritonBackend(mode="interpreter", delay=True, delay_max_ms=0.5)
    try:
        assert isinstance(backend.runtime, ThreadRuntime) and backend.runtime.delay
        assert backend.timer() is None  # the runtime's clock would time Python
    finally:
        backend.close()


def test_runtime_defaults_are_harmless_or_say_what_is_missing():
    class HostOnly(Runtime):
        def to_device(self, host, device=None):
            return np.array(host, copy=True)

    runtime = HostOnly()
    assert np.isnan(runtime.empty((3,), np.float32)).all()
    assert (runtime.empty((2,), np.int32) == -1).all()
    assert runtime.timer() is None and runtime.flush_l2() is None
    assert runtime.device_list() == [] and runtime.capturing is False
    for call in (lambda: runtime.hold(None), lambda: runtime.capture_begin([])):
        with pytest.raises(NotImplementedError, match="runtime cannot"):
            call()
