"""The scenario primitives of the cpu backend (matmul, rms_norm, add, attn_merge, write) and
graph capture/replay, as a mixin of ``CpuBackend``.

Like every cpu op they validate on the host, then enqueue on the owning device's stream.
Capture swaps a stream's ``submit`` for a recorder, so everything queued on it -- kernels,
event records and waits, copies -- is kept instead of run; replay enqueues the same closures
again (they hold the same arrays, so new inputs written into those arrays are seen).  Events
are one-shot, so replay first clears every event the graph records.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .runtime import Stream, plain

F32 = np.float32


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class CpuGraph:
    """Recorded work per stream, in queue order."""

    items: dict[Stream, list] = field(default_factory=dict)

    def recorded_events(self) -> list[threading.Event]:
        return [item.__self__ for work in self.items.values() for item in work
                if _is_event_set(item)]


def _is_event_set(item: Any) -> bool:
    return getattr(item, "__name__", "") == "set" and isinstance(
        getattr(item, "__self__", None), threading.Event)


class ScenarioOpsMixin:
    """Mixed into CpuBackend; relies on its ``_same_device``, ``_submit`` and ``_own_stream``."""

    def matmul(self, a, b, out, stream=None) -> None:
        _need(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0],
              f"matmul: a {a.shape} and b {b.shape} must be [m, k] and [k, n]")
        _need(out.shape == (a.shape[0], b.shape[1]),
              f"matmul: out shape {out.shape} must be {(a.shape[0], b.shape[1])}")
        device = self._same_device("matmul", a=a, b=b, out=out)
        args = (plain(a), plain(b), plain(out))
        self._submit(device, stream, lambda: _matmul(*args))

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        _need(x.ndim == 2 and weight.shape == x.shape[1:] and out.shape == x.shape,
              f"rms_norm: x {x.shape}, weight {weight.shape}, out {out.shape} must be "
              f"[n, d], [d], [n, d]")
        _need(eps > 0, f"rms_norm: eps={eps} must be > 0")
        device = self._same_device("rms_norm", x=x, weight=weight, out=out)
        args = (plain(x), plain(weight), plain(out))
        self._submit(device, stream, lambda: _rms_norm(*args, eps))

    def add(self, a, b, out, stream=None) -> None:
        _need(a.shape == b.shape == out.shape,
              f"add: shapes {a.shape}, {b.shape}, {out.shape} must be equal")
        device = self._same_device("add", a=a, b=b, out=out)
        args = (plain(a), plain(b), plain(out))
        self._submit(device, stream, lambda: np.add(*args[:2], out=args[2]))

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        _need(out.ndim == 3 and part_out.shape == out.shape,
              f"attn_merge: out {out.shape} and part_out {part_out.shape} must be equal [n, H, D]")
        _need(lse.shape == part_lse.shape == out.shape[:2],
              f"attn_merge: lse {lse.shape}, part_lse {part_lse.shape} must be {out.shape[:2]}")
        device = self._same_device("attn_merge", out=out, lse=lse, part_out=part_out,
                                   part_lse=part_lse)
        args = tuple(plain(a) for a in (out, lse, part_out, part_lse))
        self._submit(device, stream, lambda: merge_into(*args))

    def write(self, dst, host: np.ndarray, stream=None) -> None:
        host = np.asarray(host)
        _need(host.shape == dst.shape, f"write: host shape {host.shape} must be {dst.shape}")
        device = self._same_device("write", dst=dst)
        snapshot, target = np.array(host, dtype=dst.dtype, copy=True), plain(dst)
        self._submit(device, stream, lambda: np.copyto(target, snapshot))

    # -- graphs --------------------------------------------------------------------------------
    def capture_begin(self, streams) -> None:
        for stream in self._stream_list(streams):
            if "submit" in vars(stream):
                raise RuntimeError(f"{stream} is already capturing")
            recorded: list = []
            stream.submit = recorded.append  # instance attribute shadows Stream.submit
            stream._recorded = recorded

    def capture_end(self, streams) -> CpuGraph:
        graph = CpuGraph()
        for stream in self._stream_list(streams):
            if "submit" not in vars(stream):
                raise RuntimeError(f"{stream} is not capturing")
            del stream.submit
            graph.items[stream] = stream.__dict__.pop("_recorded")
        return graph

    def replay(self, graph: CpuGraph, stream=None) -> None:
        if not isinstance(graph, CpuGraph):
            raise TypeError(f"graph must come from capture_end, got {type(graph).__name__}")
        for event in graph.recorded_events():
            event.clear()  # every stream's waits must see this replay's records, not the last
        for target, work in graph.items.items():
            for item in work:
                target.submit(item)

    def _stream_list(self, streams) -> list[Stream]:
        if not isinstance(streams, (list, tuple)):
            streams = [streams]
        return [self._own_stream(s) for s in streams]


def _matmul(a, b, out) -> None:
    if a.dtype == F32 and b.dtype == F32 and out.dtype == F32:
        np.matmul(a, b, out=out)
    else:
        out[...] = np.matmul(a.astype(F32), b.astype(F32))


def _rms_norm(x, weight, out, eps: float) -> None:
    xf = x.astype(F32, copy=False)
    scale = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True, dtype=F32) + F32(eps))
    out[...] = xf * scale * weight


def merge_into(out, lse, part_out, part_lse) -> None:
    """Online-softmax merge in float32; -inf parts contribute nothing."""
    m = np.maximum(lse, part_lse)
    m_safe = np.where(np.isneginf(m), F32(0), m)
    w_old, w_new = np.exp(lse - m_safe), np.exp(part_lse - m_safe)
    total = w_old + w_new
    seen = total > 0
    denom = np.where(seen, total, F32(1))[..., None]
    old = np.where(w_old[..., None] > 0, w_old[..., None] * out, F32(0))
    new = np.where(w_new[..., None] > 0, w_new[..., None] * part_out, F32(0))
    out[...] = (old + new) / denom
    with np.errstate(divide="ignore"):
        lse[...] = np.where(seen, m_safe + np.log(np.where(seen, total, F32(1))), -np.inf)
