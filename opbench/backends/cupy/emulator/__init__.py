"""The cupy backend on the CPU: its CUDA kernels compiled by the host C++ compiler and run by
a fiber-per-thread emulator, behind a CPU implementation of the cupy API it uses."""

from .backend import CupyEmulatorBackend

__all__ = ["CupyEmulatorBackend"]
