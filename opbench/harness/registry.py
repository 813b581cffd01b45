"""Backend lookup: built-in names, the ``opbench.backends`` entry point group, or a direct
``package.module:Class`` / ``path/to/file.py:Class`` reference (a kernel under development)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from opbench.errors import UsageError
from opbench.protocol import Backend

BUILTIN = {
    "cpu": "opbench.backends.cpu:CpuBackend",
    "torch": "opbench.backends.torch_backend:TorchBackend",
    "ggml": "opbench.backends.ggml_backend:GgmlBackend",
    "triton": "opbench.backends.triton:TritonBackend",
    "cupy": "opbench.backends.cupy:CupyBackend",
    "cupy-emu": "opbench.backends.cupy.emulator:CupyEmulatorBackend",
}


def registered_names() -> list[str]:
    names = dict.fromkeys(BUILTIN)
    for ep in entry_points(group="opbench.backends"):
        names.setdefault(ep.name, None)
    return list(names)


def _load_file_class(path: str, class_name: str) -> type:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"backend file {path!r} does not exist")
    module_name = f"opbench_user_backend_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return _class_from(module, class_name, path)


def _class_from(module, class_name: str, where: str) -> type:
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"{where} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UsageError(f"{where}:{class_name} is not a subclass of opbench Backend")
    return cls


def _load_reference(ref: str) -> type:
    target, _, class_name = ref.rpartition(":")
    if target.endswith(".py"):
        return _load_file_class(target, class_name)
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        raise UsageError(f"cannot import backend module {target!r}: {exc}") from None
    return _class_from(module, class_name, target)


def backend_class(name: str) -> type:
    """Resolve a -b value to a Backend subclass, or raise UsageError naming the choices."""
    if ":" in name:
        return _load_reference(name)
    if name in BUILTIN:
        return _load_reference(BUILTIN[name])
    for ep in entry_points(group="opbench.backends"):
        if ep.name == name:
            return ep.load()
    raise UsageError(f"unknown backend {name!r}; choose from {', '.join(registered_names())}"
                     " or give package.module:Class or path/file.py:Class")
