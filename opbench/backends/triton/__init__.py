"""The Triton backend: GPU kernels that run natively on CUDA or, without a GPU, in Triton's
interpreter inside the cpu backend's device model.  Importable without triton or torch
(``TritonBackend.available()`` then says what to install)."""

from .backend import INSTALL_HINT, TritonBackend

__all__ = ["INSTALL_HINT", "TritonBackend"]
