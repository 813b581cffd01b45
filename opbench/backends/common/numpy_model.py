"""The scenario primitives (matmul, rms_norm, add, attn_merge) as float32 NumPy work on a
runtime whose arrays live in host memory (``backends/runtimes/threads.py``): the cpu backend's,
and Triton's in interpreter mode (there they are not what the backend tests).

Like every op they validate on the host, then enqueue on the owning device's stream.
"""

from __future__ import annotations

import numpy as np

from .arg_checks import need
from .arrays import plain

F32 = np.float32


class NumpyModelOps:
    """A mixin; relies on the class's ``_same_device(op, **arrays)`` (the owning device) and
    ``_submit(device, stream, work)`` (enqueue a no-argument callable)."""

    def matmul(self, a, b, out, stream=None) -> None:
        need(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0],
             lambda: f"matmul: a {a.shape} and b {b.shape} must be [m, k] and [k, n]")
        need(out.shape == (a.shape[0], b.shape[1]),
             lambda: f"matmul: out shape {out.shape} must be {(a.shape[0], b.shape[1])}")
        device = self._same_device("matmul", a=a, b=b, out=out)
        args = (plain(a), plain(b), plain(out))
        self._submit(device, stream, lambda: _matmul(*args))

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        need(x.ndim == 2 and weight.shape == x.shape[1:] and out.shape == x.shape,
             lambda: f"rms_norm: x {x.shape}, weight {weight.shape}, out {out.shape} must be "
                     f"[n, d], [d], [n, d]")
        need(eps > 0, lambda: f"rms_norm: eps={eps} must be > 0")
        device = self._same_device("rms_norm", x=x, weight=weight, out=out)
        args = (plain(x), plain(weight), plain(out))
        self._submit(device, stream, lambda: _rms_norm(*args, eps))

    def add(self, a, b, out, stream=None) -> None:
        need(a.shape == b.shape == out.shape,
             lambda: f"add: shapes {a.shape}, {b.shape}, {out.shape} must be equal")
        device = self._same_device("add", a=a, b=b, out=out)
        args = (plain(a), plain(b), plain(out))
        self._submit(device, stream, lambda: np.add(*args[:2], out=args[2]))

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        need(out.ndim == 3 and part_out.shape == out.shape,
             lambda: f"attn_merge: out {out.shape} and part_out {part_out.shape} must be "
                     "equal [n, H, D]")
        need(lse.shape == part_lse.shape == out.shape[:2],
             lambda: f"attn_merge: lse {lse.shape}, part_lse {part_lse.shape} must be "
                     f"{out.shape[:2]}")
        device = self._same_device("attn_merge", out=out, lse=lse, part_out=part_out,
                                   part_lse=part_lse)
        args = tuple(plain(a) for a in (out, lse, part_out, part_lse))
        self._submit(device, stream, lambda: merge_into(*args))


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
