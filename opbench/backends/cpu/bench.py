"""Quick throughput figures for the cpu backend (a benchmark, not a test).

    python -m opbench.backends.cpu.bench

Two medians per case, GB/s of input + output bytes: the backend's timer (``backend.timer()``:
on one device the call runs inline on this thread, timed from its start to its end) and host
wall clock around a call and a ``synchronize`` (adds the synchronize's own cost).
"""

from __future__ import annotations

import time

import numpy as np

from opbench.protocol import RopeParams

from .backend import CpuBackend


def median_seconds(backend: CpuBackend, call, repeats: int = 30) -> tuple[float, float]:
    """(the timer's median, host wall-clock median around a synchronized call) in seconds."""
    device_timer = backend.timer()
    device_timer(call)
    device, host = [], []
    for _ in range(repeats):
        device.append(device_timer(call))
        start = time.perf_counter_ns()
        call()
        backend.synchronize()
        host.append(time.perf_counter_ns() - start)
    return float(np.median(device)) / 1e9, float(np.median(host)) / 1e9


def bench_rope(backend: CpuBackend, mode: str, shape=(512, 32, 128)) -> float:
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.uniform(-1, 1, shape).astype(np.float32))
    pos = backend.to_device(rng.integers(0, 4096, shape[0]).astype(np.int32))
    out = backend.empty(shape, np.float32)
    p = RopeParams(n_dims=shape[2], mode=mode)
    device, host = median_seconds(backend, lambda: backend.rope(x, pos, out, p))
    return 2 * x.nbytes / device / 1e9, 2 * x.nbytes / host / 1e9


def bench_cpy(backend: CpuBackend, dst: str, perm=(0, 1, 2), shape=(512, 32, 128)) -> float:
    rng = np.random.default_rng(0)
    src = backend.to_device(rng.uniform(-1, 1, shape).astype(np.float32))
    out_dtype = {"f32": np.float32, "f16": np.float16}[dst]
    out = backend.empty(np.empty(shape, np.int8).transpose(perm).shape, out_dtype)
    device, host = median_seconds(backend, lambda: backend.cpy(src, out, perm))
    nbytes = src.nbytes + out.nbytes
    return nbytes / device / 1e9, nbytes / host / 1e9


def report(name: str, rates: tuple[float, float]) -> None:
    print(f"{name:42s} timer {rates[0]:6.2f} GB/s   host-synchronized {rates[1]:6.2f} GB/s")


def main() -> None:
    for cache in (True, False):
        with CpuBackend(rope_cache=cache) as backend:
            for mode in ("normal", "neox"):
                name = f"ROPE [512,32,128] f32 {mode} rope_cache={cache}"
                report(name, bench_rope(backend, mode))
    with CpuBackend() as backend:
        for dst, perm in (("f32", (0, 1, 2)), ("f16", (0, 1, 2)), ("f32", (1, 0, 2))):
            report(f"CPY [512,32,128] f32->{dst} perm={perm}", bench_cpy(backend, dst, perm))


if __name__ == "__main__":
    main()
