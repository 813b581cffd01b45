"""The GPU runtime of the Triton backend: torch CUDA tensors, streams, events and a timer.

Only used in ``cuda`` mode; nothing here runs without a GPU (the interpreter mode reuses the cpu
backend's runtime instead).  Several logical devices may share one GPU: each gets its own
non-blocking stream, as the cupy backend does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    torch_device: torch.device

    @property
    def name(self) -> str:
        return f"cuda:{self.index}({self.torch_device})"

    def __str__(self) -> str:
        return self.name


def _to_torch_host(host: np.ndarray) -> torch.Tensor:
    host = np.ascontiguousarray(host)
    if host.dtype.name == "bfloat16":
        return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


class CudaRuntime:
    def __init__(self) -> None:
        self._devices: list[CudaDevice] = []
        self._streams: list[torch.cuda.Stream] = []
        self._flush: dict[int, torch.Tensor] = {}

    def info(self) -> dict:
        names = sorted({torch.cuda.get_device_name(d.torch_device) for d in self._devices})
        return {"cuda": torch.version.cuda, "gpus": names,
                "devices": [d.name for d in self._devices]}

    # -- devices, memory --------------------------------------------------------------------------
    def devices(self, n: int) -> list[CudaDevice]:
        count = torch.cuda.device_count()
        while len(self._devices) < n:
            index = len(self._devices)
            device = CudaDevice(index, torch.device("cuda", index % count))
            self._devices.append(device)
            self._streams.append(torch.cuda.Stream(device=device.torch_device))
        return self._devices[:n]

    def device(self, device: Any = None) -> CudaDevice:
        if not self._devices:
            self.devices(1)
        if device is None:
            return self._devices[0]
        return self._devices[device.index if isinstance(device, CudaDevice) else int(device)]

    def to_device(self, host, device=None) -> torch.Tensor:
        return _to_torch_host(np.asarray(host)).to(self.device(device).torch_device)

    def empty(self, shape, dtype, device=None) -> torch.Tensor:
        host = np.full(tuple(shape), np.nan if np.dtype(dtype).kind == "f" else -1, dtype)
        return self.to_device(host, device)

    def to_host(self, arr: torch.Tensor) -> np.ndarray:
        torch.cuda.synchronize(arr.device)
        return _to_numpy(arr)

    def synchronize(self, device=None) -> None:
        targets = self._streams if device is None else [self.stream(device)]
        for stream in targets:
            stream.synchronize()

    def stream(self, device=None) -> torch.cuda.Stream:
        return self._streams[self.device(device).index]

    def record_event(self, stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def copy_async(self, src: torch.Tensor, dst_device, stream=None) -> torch.Tensor:
        """ggml's contract: after the work queued on the source stream; the destination stream
        waits for the copy; the host is not blocked."""
        source_stream = self._stream_of(src)
        target = self.device(dst_device)
        copy_stream = stream or source_stream
        copy_stream.wait_stream(source_stream)
        with torch.cuda.stream(copy_stream):
            dst = torch.empty_like(src, device=target.torch_device)
            dst.copy_(src, non_blocking=True)
        self.stream(target).wait_stream(copy_stream)
        src.record_stream(copy_stream)
        return dst

    def _stream_of(self, arr: torch.Tensor) -> torch.cuda.Stream:
        for device, stream in zip(self._devices, self._streams):
            if device.torch_device == arr.device:
                return stream
        return torch.cuda.current_stream(arr.device)

    # -- ops ---------------------------------------------------------------------------------------
    def check(self, name: str, *args) -> Any:
        """Shape checks only (the cpu backend's checks expect NumPy dtypes)."""
        if name == "_check_cpy":
            return tuple(int(i) for i in args[2])
        return None

    def run(self, op: str, arrays: dict, stream, launch) -> None:
        tensors = [a for a in arrays.values() if a is not None]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"{op}: arrays live on several GPUs {sorted(map(str, devices))}")
        target = stream or self._stream_of(tensors[0])
        with torch.cuda.device(tensors[0].device), torch.cuda.stream(target):
            launch(arrays)

    # -- scenario primitives (torch ops on the arrays' stream) -----------------------------------
    def matmul(self, a, b, out, stream=None) -> None:
        self.run("matmul", dict(a=a, b=b, out=out), stream,
                 lambda t: t["out"].copy_(torch.matmul(t["a"].float(), t["b"].float())))

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        def work(t):
            xf = t["x"].float()
            scale = torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
            t["out"].copy_(xf * scale * t["weight"].float())

        self.run("rms_norm", dict(x=x, weight=weight, out=out), stream, work)

    def add(self, a, b, out, stream=None) -> None:
        self.run("add", dict(a=a, b=b, out=out), stream,
                 lambda t: torch.add(t["a"], t["b"], out=t["out"]))

    def write(self, dst, host, stream=None) -> None:
        snapshot = _to_torch_host(np.array(host, copy=True))  # the caller may reuse host at once
        self.run("write", dict(dst=dst), stream, lambda t: t["dst"].copy_(snapshot))

    # -- timing (triton.testing.do_bench's method, every sample kept) ---------------------------
    def flush_l2(self) -> None:
        """Evict the L2 cache: write a buffer larger than it (on the ops' stream)."""
        device = torch.cuda.current_device()
        flush = self._flush.get(device)
        if flush is None:
            flush = self._flush[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8,
                                                      device="cuda")
        with torch.cuda.stream(self._timing_stream()):
            flush.zero_()

    def time_one(self, fn) -> float:
        """Nanoseconds of one call between two CUDA events on the ops' stream (the harness
        calls ``flush_l2`` first for cold samples)."""
        stream = self._timing_stream()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) * 1e6

    def do_bench(self, fn, reps: int = 100, warmup: int = 5) -> list[float]:
        """triton.testing.do_bench's method, every sample kept: flush, then time, per sample."""
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            self.flush_l2()
            samples.append(self.time_one(fn))
        return samples

    def _timing_stream(self) -> torch.cuda.Stream:
        # ops run on the logical devices' streams, so the events go there too
        return self._streams[0] if self._streams else torch.cuda.current_stream()
