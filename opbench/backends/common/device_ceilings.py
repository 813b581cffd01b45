"""A GPU's copy ceiling and cache size, for perf's fractions (``Backend.device_ceilings``).

The host's calibrated ceilings (``opbench calibrate``) say nothing about a GPU: judged against
them, an H200's 128 MiB decode read as "cache-resident" and a prefill as "above the calibrated
ceiling".  A GPU backend measures its device instead: the best of a few
device-to-device copies of several times its L2, timed on the device, counting bytes read +
written as perf records count ``bytes``.  No GEMM rate: ``matmul_gflops`` is left out, so a
compute-bound case gets no fraction rather than one against a GEMM it does not run.
"""

from __future__ import annotations

import functools
from typing import Callable

COPY_REPEATS = 5
MIN_COPY_BYTES = 64 << 20


def copy_bytes(l2_bytes: int | None) -> int:
    """Bytes to copy: four times the L2 (a copy from memory, not from cache), at least 64 MiB."""
    return max(MIN_COPY_BYTES, 4 * int(l2_bytes or 0))


def gpu_ceilings(time_copy_ns: Callable[[], float], nbytes: int,
                 l2_bytes: int | None) -> dict:
    """``copy_gbps`` from the fastest of ``COPY_REPEATS`` timed copies (one more first, untimed:
    lazy allocation, clocks), and ``llc_bytes`` when the L2's size is known."""
    time_copy_ns()
    best_ns = min(time_copy_ns() for _ in range(COPY_REPEATS))
    found = {"copy_gbps": 2 * nbytes / best_ns}  # bytes per ns = GB/s
    if l2_bytes:
        found["llc_bytes"] = int(l2_bytes)
    return found


def torch_cuda_ceilings(torch_device) -> dict:
    """``gpu_ceilings`` of a torch CUDA device (the torch backend, Triton's cuda mode), measured
    once per GPU and process."""
    return dict(_measured_torch_cuda(str(torch_device)))


@functools.cache
def _measured_torch_cuda(torch_device: str) -> dict:
    import torch

    l2 = int(getattr(torch.cuda.get_device_properties(torch_device), "L2_cache_size", 0))
    nbytes = copy_bytes(l2)
    with torch.cuda.device(torch_device):
        src = torch.empty(nbytes, dtype=torch.uint8, device=torch_device)
        dst = torch.empty_like(src)

        def time_copy_ns() -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e6

        return gpu_ceilings(time_copy_ns, nbytes, l2 or None)
