"""The CUDA backend on CuPy.  Importable without cupy: ``CupyBackend.available()`` says why
it cannot run (cupy missing, no driver, no GPU)."""

from .backend import CupyBackend

__all__ = ["CupyBackend"]
