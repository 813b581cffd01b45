"""The size thresholds the built-in backends declare (``Backend.THRESHOLDS``), for the tables.

The built-in backends are the registered ones (``opbench.backends`` entry points) that live in
this package: a plugged-in backend does not change the default tables, whose ids must be the
same on every machine for the gate to compare runs.  torch and ggml run third-party kernels whose
internal cut-offs opbench does not own: they declare none.  A plugged-in backend's thresholds are
read the same way (``declared_by``)."""

from __future__ import annotations

import functools

from opbench.protocol import Backend, SizeThreshold

from .registry import backend_class, registered

BUILTIN_PACKAGE = "opbench.backends."


@functools.cache
def builtin_classes() -> dict[str, type[Backend]]:
    """Name -> class of every registered backend shipped in this package, in registry order."""
    return {name: backend_class(name) for name, target in registered().items()
            if target.startswith(BUILTIN_PACKAGE)}


def declared_by(classes, op: str) -> list[SizeThreshold]:
    """The op's thresholds of the given backend classes, without repeats, in declared order."""
    found: dict[tuple[str, int], SizeThreshold] = {}
    for cls in classes:
        for threshold in cls.THRESHOLDS:
            if threshold.op == op:
                found.setdefault((threshold.size, threshold.value), threshold)
    return list(found.values())


def declared(op: str, backends: tuple[str, ...] | None = None) -> list[SizeThreshold]:
    """Thresholds of ``op`` declared by the named built-in backends (all of them by default)."""
    classes = builtin_classes()
    names = backends or tuple(classes)
    return declared_by([classes[n] for n in names], op)
