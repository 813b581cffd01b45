"""The cupy backend's device model: logical devices on GPUs, their streams, events and arrays.

Imports cupy only inside functions, so ``import opbench.backends.cupy`` works (and
``available()`` can explain itself) on a machine without cupy, a driver or a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


#: host dtype -> the dtype cupy stores it as (cupy has no bfloat16: keep its 16-bit pattern)
def storage_dtype(dtype: np.dtype) -> np.dtype:
    dt = np.dtype(dtype)
    return np.dtype(np.uint16) if dt.name == "bfloat16" else dt


FINGERPRINT_MAX_BYTES = 1 << 16  # content digests are kept for small inputs only


class DeviceMismatchError(ValueError):
    """An array of one logical device was used by an op running on another."""


class DeviceError(RuntimeError):
    """A kernel reported bad indices (the device error word), raised by synchronize()."""


def driver_missing() -> str | None:
    """Why the CUDA driver library cannot be loaded, or None when it can."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no CUDA driver: libcuda.so.1 cannot be loaded ({exc})"
    return None


def status() -> tuple[bool, str]:
    """(True, "N GPU(s): names") or (False, the precise reason the backend cannot run)."""
    try:
        import cupy
    except ImportError as exc:
        return False, f"cupy is not installed ({exc}); pip install 'opbench[cupy]'"
    missing = driver_missing()
    if missing:
        return False, missing
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # e.g. a driver older than the CUDA runtime cupy was built for
        return False, f"the CUDA driver is unusable: {exc}"
    if count == 0:
        return False, "no CUDA device: the driver sees no GPU"
    names = []
    for gpu in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(gpu)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        if props["major"] < 8:
            return False, (f"GPU {gpu} ({name}) is sm_{props['major']}{props['minor']}; the "
                           "kernels need sm_80 or newer (bf16 conversions)")
        names.append(name)
    return True, f"{count} GPU(s): {', '.join(names)}"


@dataclass(eq=False)
class GpuStream:
    """A logical device's non-blocking stream (the object the protocol hands around)."""

    device: CupyDevice
    cupy_stream: Any

    def __repr__(self) -> str:
        return f"GpuStream({self.device.name})"


@dataclass(eq=False)
class GpuEvent:
    cupy_event: Any
    stream: GpuStream


@dataclass(eq=False)
class CupyDevice:
    """Logical device ``index`` on GPU ``gpu``; owns one stream, an error word and caches."""

    index: int
    gpu: int
    num_sms: int
    shared_optin: int  # most dynamic shared memory one block may opt into
    l2_bytes: int
    stream: GpuStream | None = None
    error_word: Any = None  # cupy int32[1], OR-ed by kernels that meet bad indices
    rope_tables: OrderedDict = field(default_factory=OrderedDict)  # LRU, plan.rope_cache_key
    constants: dict = field(default_factory=dict)  # small read-only device arrays (slopes)
    workspaces: dict = field(default_factory=dict)
    staging: list = field(default_factory=list)  # pinned host buffers of queued uploads

    @property
    def name(self) -> str:
        return f"cupy:{self.index}(gpu{self.gpu})"

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class GpuArray:
    """A cupy array owned by one logical device, with its logical dtype (bf16 included).

    ``fingerprint`` is a digest of the contents when uploaded by to_device (small arrays only),
    cleared when an op writes the array; the RoPE cache keys freq_factors on it without a
    device-to-host copy (which would also be illegal inside a CUDA graph capture)."""

    data: Any
    dtype: np.dtype
    device: CupyDevice
    fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape) -> GpuArray:
        """A view with another shape, like ndarray.reshape (the scenario model uses it);
        refuses to copy, since ops write through views."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        view = self.data.reshape(tuple(shape))
        if view.size and view.data.ptr != self.data.data.ptr:
            raise ValueError(f"reshape of {self} to {tuple(shape)} would copy")
        return GpuArray(view, self.dtype, self.device)

    def __getitem__(self, index) -> GpuArray:
        """A view (basic slicing only), owned by the same device."""
        return GpuArray(self.data[index], self.dtype, self.device)

    def __repr__(self) -> str:
        return f"GpuArray({self.shape}, {self.dtype}, {self.device.name})"
