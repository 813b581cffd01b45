"""``CupyEmulatorBackend``: ``CupyBackend`` unchanged, on the emulated cupy (``fake_cupy``).

Every line of the cupy backend runs here (checks, plans, launches, streams, events, copies,
graphs, the error word) and so do the .cu kernels, compiled for the host with
``OPB_EMULATE``.  Test infrastructure (CI without a GPU), never a measurement: perf mode
refuses it.  What it proves and what it cannot: see docs/backends-cupy.md.
"""

from __future__ import annotations

from ..backend import CupyBackend
from . import build

EMULATION_REASON = ("CPU emulation of the CUDA kernels: timings would measure the emulator, "
                    "not a GPU")


class CupyEmulatorBackend(CupyBackend):
    """The cupy backend's kernels and runtime code on the CPU (needs g++, no GPU)."""

    name = "cupy-emu"
    is_interpreter = True  # perf mode refuses to time it
    interpreter_reason = EMULATION_REASON

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, version = build.compiler_status()
        return (True, f"kernels emulated on the CPU, compiled by {version}") if ok \
            else (False, version)

    @staticmethod
    def _cupy():
        from . import fake_cupy

        return fake_cupy

    def info(self) -> dict:
        return {**super().info(), "emulated": True, "compiler": build.compiler_status()[1]}
