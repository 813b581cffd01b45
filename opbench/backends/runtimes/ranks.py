"""The rank runtime: every logical device in its own process, a torch.distributed rank.

``RankRuntime`` is made in each of N processes (one rank of a torch.distributed process group)
and given to a backend whose kernels run on host arrays (the cpu backend: its kernels run
unchanged).  Every rank sees the same N logical devices and runs the same host program (the
scenario engine); the backend validates every op on the host as in-process, but the runtime
runs only the work of its own device ``rank``.  Arrays of other devices exist as placeholders
that are never written.  Streams, events, graphs and fault injection (``delay``) are the
worker-thread runtime's, which this one extends.

copy_async between devices becomes point-to-point messages with copy_async's contract:

- the sender queues ``isend`` on its *send stream* after the source stream's queued work, and
  the source stream waits for the send to complete before it runs anything later (which may
  overwrite the source);
- the receiver queues ``irecv`` into the new destination array on its *receive stream* after
  the destination's queued work; the destination stream waits for the receive to complete
  before its next work;
- the host is never blocked, and any number of messages are in flight until a synchronize.

Messages of one (sender, receiver) pair are numbered in queue order on both sides, the number
is the message tag, so each receive matches its own send even with several in flight (and on
every replay of a captured graph, whose recorded send and receive items run again).

``to_host`` of an array is collective: its owner broadcasts it to every rank (a separate
process group, so readbacks never mix with the copies), so every rank reads back the same
values and takes the same decisions.  Every message sent and received is logged with its
peer and size: the run checks the log against the split's plan.

Transport: gloo on CPU tensors that share memory with the arrays; with NCCL (CUDA devices,
rank r on GPU r) the payload is staged through a CUDA tensor on the rank's GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .threads import Device, DeviceArray, Stream, ThreadRuntime, plain


@dataclass
class Message:
    direction: str  # "send" or "recv"
    peer: int  # the other rank
    nbytes: int


class Transport:
    """Point-to-point messages and readback broadcasts over torch.distributed."""

    def __init__(self, rank: int, world: int, readback_group=None, on_wait=None) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.world = rank, world
        self.readback_group = readback_group
        self.nccl = dist.get_backend() == "nccl"
        self.cuda = torch.device("cuda", rank) if self.nccl else None
        # the rank's host-side status hook: on_wait(peer) before a blocking wait, None after
        self.on_wait = on_wait or (lambda peer: None)

    def _tensor(self, arr: np.ndarray):
        flat = self.torch.from_numpy(arr.reshape(-1).view(np.uint8))
        return flat.to(self.cuda) if self.cuda is not None else flat

    def isend(self, arr: np.ndarray, peer: int, tag: int) -> Callable[[], None]:
        """Post the send; returns the call that waits until the message has left arr."""
        tensor = self._tensor(np.ascontiguousarray(arr))
        work = self.dist.isend(tensor, peer, tag=tag)

        def finish() -> None:
            self.on_wait(peer)
            work.wait()
            self.on_wait(None)
            del finish.keep  # the payload must outlive the send

        finish.keep = tensor

        return finish

    def irecv(self, arr: np.ndarray, peer: int, tag: int) -> Callable[[], None]:
        """Post the receive; returns the call that waits for it and lands the data in arr."""
        tensor = self._tensor(arr) if self.cuda is None else self.torch.empty(
            arr.nbytes, dtype=self.torch.uint8, device=self.cuda)
        work = self.dist.irecv(tensor, peer, tag=tag)

        def finish() -> None:
            self.on_wait(peer)
            work.wait()
            self.on_wait(None)
            if self.cuda is not None:
                arr.reshape(-1).view(np.uint8)[...] = tensor.cpu().numpy()

        return finish

    def broadcast(self, arr: np.ndarray, owner: int) -> None:
        tensor = self._tensor(arr)
        self.on_wait(owner)
        self.dist.broadcast(tensor, owner, group=self.readback_group)
        self.on_wait(None)
        if self.cuda is not None:
            arr.reshape(-1).view(np.uint8)[...] = tensor.cpu().numpy()


class _Pending:
    """A receive posted on the receive stream, finished on the destination stream."""

    def __init__(self) -> None:
        self.finish: Callable[[], None] | None = None

    def wait(self) -> None:
        self.finish()


class RankRuntime(ThreadRuntime):
    """One rank of a devices-as-ranks run; ``devices(n)`` needs n == world size.  ``delay``
    and its seed and bound are the worker-thread runtime's (per rank: a run may delay only
    some ranks)."""

    name = "ranks"
    INLINE_FAST_PATH = False  # the send and receive streams are threads of their own

    def __init__(self, rank: int, world: int, transport: Transport, delay: bool = False,
                 delay_seed: int = 0, delay_max_ms: float = 2.0) -> None:
        super().__init__(delay, delay_seed, delay_max_ms)
        self.rank, self.world, self.transport = rank, world, transport
        self.log: list[Message] = []
        self._tags: dict[tuple[str, int], int] = {}
        self._log_lock = threading.Lock()
        self.send_stream: Stream | None = None
        self.recv_stream: Stream | None = None

    def info(self) -> dict:
        return {**super().info(), "rank": self.rank, "world": self.world,
                "transport": "nccl" if self.transport.nccl else "gloo"}

    def devices(self, n: int = 1) -> list[Device]:
        if n != self.world:
            raise ValueError(f"devices({n}): this rank's process group has {self.world} ranks")
        devices = super().devices(n)
        if self.send_stream is None:
            local = devices[self.rank]
            self.send_stream, self.recv_stream = Stream(local), Stream(local)
        return devices

    def local(self, device: Device) -> bool:
        return device.index == self.rank

    def stalled(self, device: Any) -> bool:
        return False  # a stream may wait on another rank's message: progress unseen from here

    def host_blocked(self) -> bool:
        return False

    # -- running only this rank's work -----------------------------------------------------------
    def submit(self, device: Device, stream, work) -> None:
        if self.local(device):
            super().submit(device, stream, work)

    def _comm_streams(self) -> list[Stream]:
        return [s for s in (self.send_stream, self.recv_stream) if s is not None]

    def synchronize(self, device: Any = None) -> None:
        if device is None or self.local(self.device(device)):
            for stream in self._comm_streams():
                stream.synchronize()
        super().synchronize(device)

    def close(self) -> None:
        for stream in self._comm_streams():
            stream.close()
        super().close()

    def to_host(self, arr: DeviceArray) -> np.ndarray:
        """Collective: every rank calls it in the same order; the owner's values come back."""
        owner = self.owner("arr", arr)
        if self.local(owner):
            self.synchronize(owner)
        host = np.ascontiguousarray(np.array(plain(arr), copy=True))
        self.transport.broadcast(host, owner.index)
        return host

    # -- copies as messages --------------------------------------------------------------------
    def copy_async(self, src: DeviceArray, dst_device: Any, stream: Stream | None = None):
        source_device = self.owner("src", src)
        dst = self.empty(src.shape, src.dtype, dst_device)
        if source_device == dst.device:  # on one device: the in-process copy, if it is ours
            return super().copy_async(src, dst_device, stream) if self.local(dst.device) else dst
        if self.local(source_device):
            self._send(plain(src), source_device, dst.device.index)
        elif self.local(dst.device):
            self._receive(plain(dst), dst.device, source_device.index)
        return dst

    def _send(self, source: np.ndarray, device: Device, peer: int) -> None:
        compute = self.stream(device)
        self.send_stream.wait(compute.record())  # after the source's queued work
        posted: list = []

        def post() -> None:
            self._log("send", peer, source.nbytes)
            posted[:] = [self.transport.isend(source, peer, self._next_tag("send", peer))]

        self.send_stream.submit(post)
        # the source's later work (which may overwrite it) waits until the message has left
        compute.wait(self.send_stream.record())
        compute.submit(lambda: posted[0]())

    def _receive(self, target: np.ndarray, device: Device, peer: int) -> None:
        compute, pending = self.stream(device), _Pending()
        self.recv_stream.wait(compute.record())  # the destination's queued work first

        def post() -> None:
            self._log("recv", peer, target.nbytes)
            pending.finish = self.transport.irecv(target, peer, self._next_tag("recv", peer))

        self.recv_stream.submit(post)
        compute.wait(self.recv_stream.record())  # posted ...
        compute.submit(pending.wait)  # ... and landed before the destination's next work

    def _next_tag(self, direction: str, peer: int) -> int:
        key = (direction, peer)
        with self._log_lock:
            self._tags[key] = self._tags.get(key, -1) + 1
            return self._tags[key]

    def _log(self, direction: str, peer: int, nbytes: int) -> None:
        with self._log_lock:
            self.log.append(Message(direction, peer, int(nbytes)))

    def take_log(self) -> list[Message]:
        """The messages since the last call (call after synchronize: all of a step's)."""
        with self._log_lock:
            log, self.log = self.log, []
        return log

    # -- graphs: the send and receive streams are captured with the device streams --------------
    def capture_begin(self, streams) -> None:
        super().capture_begin(self._with_comm(streams))

    def capture_end(self, streams):
        return super().capture_end(self._with_comm(streams))

    def _with_comm(self, streams) -> list[Stream]:
        streams = list(streams) if isinstance(streams, (list, tuple)) else [streams]
        return streams + self._comm_streams()

    def own_stream(self, stream: Any) -> Stream:
        if stream is not None and stream in self._comm_streams():
            return stream
        return super().own_stream(stream)
