"""The embedded cpu backend: production-style NumPy kernels on logical devices with streams.

``backend`` (CpuBackend: validation, dispatch), ``kernels`` (float32 NumPy kernels),
``rope_cache`` (sin/cos tables), ``jit`` (optional numba loops), ``bench`` (throughput
figures).  Devices, arrays, streams and events are the worker-thread runtime's
(``opbench.backends.runtimes.threads``), re-exported here.
"""

from ..runtimes.threads import Device, DeviceArray, DeviceMismatchError, Event, Gate, Stream
from .backend import CpuBackend

__all__ = ["CpuBackend", "Device", "DeviceArray", "DeviceMismatchError", "Event", "Gate", "Stream"]
