"""The GPU runtime of the Triton backend: torch CUDA tensors, streams, events and a timer.

An ``opbench.protocol.Runtime``, held by the Triton backend in ``cuda`` mode (interpreter mode
holds the worker-thread runtime, ``backends/runtimes/threads.py``).
Several logical devices may share one GPU: each gets its own non-blocking stream, as the cupy
backend does.  Arrays are plain torch tensors, which know their GPU only: the runtime remembers
which logical device made each one (``device_of``).  Every ``torch.cuda`` call of devices,
streams, events, launches, copies and graphs (not the timer's) goes through ``api``
(``graphs_cuda.TorchCuda``), so the logic here, graph capture and the scenario engine included,
is tested on the CPU with a fake in its place; on a GPU, only the op tables have run so far (one
H200, 2026-12-04).

While a graph capture is open (``graphs_cuda.GraphCapture``) ops, event records and waits and
async copies are recorded instead of issued, and what cannot be recorded is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opbench.protocol import Runtime, poisoned_host

from ..common.device_ceilings import torch_cuda_ceilings
from ..common.event_timer import EventTimer, torch_event_timer
from .graphs_cuda import CudaGraph, GraphCapture, TorchCuda

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


NO_HOST_READ = ("the captured work has not run (it runs at replay) and a device->host wait "
                "would invalidate the capture; capture_end first")
NO_TIMING = "timing and the L2 flush synchronize and allocate; capture_end first"


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


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


class CudaRuntime(Runtime):
    name = "cuda"

    def __init__(self, api=None) -> None:
        self.api = TorchCuda() if api is None else api
        self.graphs = GraphCapture(self.api)
        self._devices: list[CudaDevice] = []
        self._streams: list = []
        self._flush: dict[int, torch.Tensor] = {}
        self._owners: dict[int, CudaDevice] = {}  # storage address -> the device it was made on

    @property
    def capturing(self) -> bool:
        return self.graphs.capturing

    def info(self) -> dict:
        names = sorted({torch.cuda.get_device_name(d.torch_device) for d in self._devices})
        return {"cuda": torch.version.cuda, "gpus": names,
                "devices": [d.name for d in self._devices]}

    # -- devices, memory --------------------------------------------------------------------------
    def devices(self, n: int) -> list[CudaDevice]:
        count = self.api.device_count()
        if count < 1 and len(self._devices) < n:
            raise RuntimeError("cuda mode: torch sees no CUDA device")
        while len(self._devices) < n:
            index = len(self._devices)
            device = CudaDevice(index, self.api.torch_device(index % count))
            self._devices.append(device)
            self._streams.append(self.api.new_stream(device.torch_device))
        return self._devices[:n]

    def device_list(self) -> list[CudaDevice]:
        return list(self._devices)

    def device(self, device: Any = None) -> CudaDevice:
        if not self._devices:
            self.devices(1)
        if device is None:
            return self._devices[0]
        return self._devices[device.index if isinstance(device, CudaDevice) else int(device)]

    def to_device(self, host, device=None) -> torch.Tensor:
        """A copy of ``host`` on ``device``, queued on the device's stream (``TorchCuda.upload``:
        its memory is then reused only after that stream's earlier work), made even while a
        capture is open (the capture is deferred: nothing is being recorded by CUDA yet); the
        recorded ops that use it keep it alive as long as their graph, so its memory is nobody
        else's."""
        target = self.device(device)
        tensor = self.api.upload(_to_torch_host(np.asarray(host)), self.stream(target))
        return self._made_on(tensor, target)

    def empty(self, shape, dtype, device=None) -> torch.Tensor:
        return self.to_device(poisoned_host(shape, dtype), device)

    def _made_on(self, tensor: torch.Tensor, device: CudaDevice) -> torch.Tensor:
        self._owners[_storage(tensor)] = device
        return tensor

    def device_of(self, arr: torch.Tensor) -> CudaDevice:
        """The logical device ``arr`` was made on (by ``to_device``, ``empty`` or
        ``copy_async``; views share its storage), else the first one on its GPU: a torch tensor
        knows its GPU only, and several logical devices may share one GPU."""
        found = self._owners.get(_storage(arr))
        if found is not None and found.torch_device == arr.device:
            return found
        for device in self._devices:
            if device.torch_device == arr.device:
                return device
        raise TypeError(f"a tensor on {arr.device} lives on none of this backend's devices")

    def to_host(self, arr: torch.Tensor) -> np.ndarray:
        self.graphs.refuse("to_host", NO_HOST_READ)
        self.api.synchronize(arr.device)
        return _to_numpy(arr)

    def synchronize(self, device=None) -> None:
        self.graphs.refuse("synchronize", NO_HOST_READ)
        targets = self._streams if device is None else [self.stream(device)]
        for stream in targets:
            self.api.stream_synchronize(stream)

    def stream(self, device=None):
        return self._streams[self.device(device).index]

    def record_event(self, stream):
        if self.graphs.capturing:
            return self.graphs.record_event(stream)
        event = self.api.new_event()
        self.api.record(event, stream)
        return event

    def wait_event(self, stream, event) -> None:
        self.graphs.wait_event(stream, event)  # checks; records it while capturing
        if not self.graphs.capturing:
            self.api.wait(stream, event)

    def copy_async(self, src: torch.Tensor, dst_device, stream=None) -> torch.Tensor:
        """ggml's contract: after the work queued on the source stream; the destination stream
        waits for the copy; the host is not blocked.  Inside a capture the destination is
        allocated now (outside the CUDA capture) and referenced by the graph, so no one else
        gets its memory while the graph can write it; the copy and its waits are recorded."""
        source_stream = self._stream_of(src)
        target = self.device(dst_device)
        copy_stream = stream or source_stream
        target_stream = self.stream(target)
        for s in (source_stream, copy_stream, target_stream):
            self.graphs.check_stream("copy_async", s)
        with self.api.on(copy_stream):
            dst = self._made_on(torch.empty_like(src, device=target.torch_device), target)
        if copy_stream is not source_stream:
            self.wait_event(copy_stream, self.record_event(source_stream))
        work = lambda: self.api.torch_work(  # noqa: E731
            "copy_async", lambda: dst.copy_(src, non_blocking=True))
        if self.graphs.capturing:
            self.graphs.launch("copy_async", copy_stream, work, None, keep=(src, dst))
        else:
            self.api.issue(copy_stream, work, "copy_async")
            self.api.record_stream(src, copy_stream)  # src's memory waits for the copy
        if target_stream is not copy_stream:
            self.wait_event(target_stream, self.record_event(copy_stream))
        return dst

    def _stream_of(self, arr: torch.Tensor):
        try:
            return self.stream(self.device_of(arr))
        except TypeError:  # not on any of our devices
            return self.api.current_stream(arr.device)

    # -- graphs (graphs_cuda.GraphCapture) -----------------------------------------------------
    def capture_begin(self, streams) -> None:
        self.graphs.begin(self._stream_list(streams))

    def capture_end(self, streams) -> CudaGraph:
        return self.graphs.end(self._stream_list(streams))

    def replay(self, graph: CudaGraph, stream=None) -> None:
        self.graphs.replay(graph, stream)

    def _stream_list(self, streams) -> list:
        streams = list(streams) if isinstance(streams, (list, tuple)) else [streams]
        for stream in streams:
            if not any(stream is own for own in self._streams):
                raise TypeError(f"stream={stream!r} is not a stream of this backend")
        return streams

    # -- ops ---------------------------------------------------------------------------------------
    def check(self, name: str, *args) -> Any:
        """Shape checks only (the cpu backend's checks expect NumPy dtypes)."""
        if name == "cpy":
            return tuple(int(i) for i in args[2])
        return None

    def run(self, op: str, arrays: dict, stream, launch, writes: tuple[str, ...] | None = None
            ) -> None:
        """``launch(arrays)`` on the stream (the arrays' device's by default).  ``writes=None``:
        Triton launches; otherwise torch work writing ``arrays[name]`` for each name."""
        tensors = [a for a in arrays.values() if a is not None]
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"{op}: arrays live on several GPUs {sorted(map(str, devices))}")
        target = stream or self._stream_of(tensors[0])
        if writes is None:
            work = lambda: launch(arrays)  # noqa: E731

            def warm() -> None:  # compile and load the kernels, launch nothing
                with self.api.compile_only():
                    launch(arrays)
        else:
            work = lambda: self.api.torch_work(op, lambda: launch(arrays))  # noqa: E731

            def warm() -> None:  # the same torch work, into scratch outputs
                launch({**arrays, **{n: torch.empty_like(arrays[n]) for n in writes}})
        if self.graphs.capturing:
            self.graphs.launch(op, target, work, warm, keep=tensors)
        else:
            self.api.issue(target, work, op)

    # -- scenario primitives (torch ops on the arrays' stream) -----------------------------------
    def matmul(self, a, b, out, stream=None) -> None:
        self.run("matmul", dict(a=a, b=b, out=out), stream,
                 lambda t: t["out"].copy_(torch.matmul(t["a"].float(), t["b"].float())),
                 writes=("out",))

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        def work(t):
            xf = t["x"].float()
            scale = torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
            t["out"].copy_(xf * scale * t["weight"].float())

        self.run("rms_norm", dict(x=x, weight=weight, out=out), stream, work, writes=("out",))

    def add(self, a, b, out, stream=None) -> None:
        self.run("add", dict(a=a, b=b, out=out), stream,
                 lambda t: torch.add(t["a"], t["b"], out=t["out"]), writes=("out",))

    def write(self, dst, host, stream=None) -> None:
        self.graphs.refuse("write", "host data cannot be recorded in a CUDA graph (a replay "
                           "would upload this call's values again); write the inputs before "
                           "capture_begin and between replays")
        snapshot = _to_torch_host(np.array(host, copy=True))  # the caller may reuse host at once
        self.run("write", dict(dst=dst), stream, lambda t: t["dst"].copy_(snapshot),
                 writes=("dst",))

    # -- timing ------------------------------------------------------------------------------
    def flush_l2(self, device: Any = None) -> None:
        """Evict the L2 cache: write a buffer larger than it (on the ops' stream)."""
        self.graphs.refuse("flush_l2", NO_TIMING)
        device = torch.cuda.current_device()
        flush = self._flush.get(device)
        if flush is None:
            flush = self._flush[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8,
                                                      device="cuda")
        with torch.cuda.stream(self._timing_stream()):
            flush.zero_()

    def timer(self) -> EventTimer:
        """CUDA events on the ops' stream, the host's enqueue hidden behind a spin
        (``common.event_timer``)."""
        self.graphs.refuse("timing", NO_TIMING)
        return torch_event_timer(torch, self._timing_stream())

    def device_ceilings(self, device: Any = None) -> dict:
        """The GPU's copy ceiling and L2 size, measured once (``common.device_ceilings``)."""
        return torch_cuda_ceilings(self.device(device).torch_device)

    def close(self) -> None:
        self.graphs.abort()  # an open capture has issued nothing to CUDA yet
        self.synchronize(None)

    def _timing_stream(self) -> torch.cuda.Stream:
        # ops run on the logical devices' streams, so the events go there too
        return self._streams[0] if self._streams else torch.cuda.current_stream()
