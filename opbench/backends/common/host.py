"""Facts about the host the backends, the worker pool and the calibration share."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def last_level_cache_bytes(cpu: int = 0) -> int | None:
    """The size of the largest (last-level) cache of ``cpu``, from Linux's sysfs; None where
    it cannot be read."""
    sizes = []
    for index in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if size[:-1].isdigit() and size[-1] in units:
            sizes.append((level, int(size[:-1]) * units[size[-1]]))
    return max(sizes)[1] if sizes else None


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """Memory the kernel says a new allocation can take without swapping (Linux's
    MemAvailable); None where it cannot be read."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


#: the last-level cache assumed where sysfs does not say
ASSUMED_LLC_BYTES = 32 * 2**20
_flush_buffer: np.ndarray | None = None


def cache_bytes() -> int:
    """The last-level cache's size, or ASSUMED_LLC_BYTES where it cannot be read."""
    return last_level_cache_bytes() or ASSUMED_LLC_BYTES


def flush_host_caches() -> None:
    """Evict the host's caches (``perf --cold`` on a CPU backend): write a buffer of twice the
    last-level cache, so what a sample reads next comes from memory, as a kernel's inputs do
    when the working set of a real model has passed through the cache since.  The calling
    core's own caches and the shared last level are evicted; another core's private cache may
    keep up to its size (a few MiB at most)."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = np.zeros(2 * cache_bytes(), np.uint8)
    _flush_buffer += 1  # reads and writes every line (a fill could stream past the cache)
