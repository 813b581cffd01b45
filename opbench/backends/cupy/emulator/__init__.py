"""The cupy backend on the CPU: its CUDA kernels compiled by the host C++ compiler and run by
a fiber-per-thread emulator, behind a CPU implementation of the cupy API it uses.

Test infrastructure, not a product backend: it lets CI run the cupy backend's own code and
.cu kernels without a GPU (registered as ``cupy-emu`` so that ``opbench test`` and
``opbench scenario`` can drive it; perf mode refuses it).  See docs/backends-cupy.md."""

from .backend import CupyEmulatorBackend

__all__ = ["CupyEmulatorBackend"]
