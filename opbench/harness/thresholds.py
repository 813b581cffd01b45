"""The size thresholds the built-in backends declare (``Backend.THRESHOLDS``), for the tables.

torch and ggml run third-party kernels whose internal cut-offs opbench does not own: they
declare none.  A plugged-in backend's thresholds are read the same way (``declared_by``)."""

from __future__ import annotations

from opbench.backends.cpu import CpuBackend
from opbench.backends.cupy import CupyBackend
from opbench.backends.triton import TritonBackend
from opbench.protocol import Backend, SizeThreshold

BUILTIN_WITH_THRESHOLDS: dict[str, type[Backend]] = {
    "cpu": CpuBackend, "triton": TritonBackend, "cupy": CupyBackend}


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
    names = backends or tuple(BUILTIN_WITH_THRESHOLDS)
    return declared_by([BUILTIN_WITH_THRESHOLDS[n] for n in names], op)
