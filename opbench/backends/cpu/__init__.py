"""The embedded cpu backend: production-style NumPy kernels on logical devices with streams.

``backend`` (CpuBackend: validation, dispatch, copies), ``runtime`` (devices, device arrays,
worker-thread streams, events, gates), ``kernels`` (float32 NumPy kernels), ``rope_cache``
(sin/cos tables), ``jit`` (optional numba loops), ``bench`` (throughput figures).
"""

from .backend import CpuBackend
from .runtime import Device, DeviceArray, DeviceMismatchError, Event, Gate, Stream

__all__ = ["CpuBackend", "Device", "DeviceArray", "DeviceMismatchError", "Event", "Gate", "Stream"]
