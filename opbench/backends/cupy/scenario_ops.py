"""The protocol's scenario primitives on the cupy backend (kernels/model.cu), float32 only,
plus ``write``: what opbench.harness.scenario's model needs besides the ops."""

from __future__ import annotations

import numpy as np

from . import checks, plan
from .runtime import FINGERPRINT_MAX_BYTES


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _need_f32(**arrays) -> None:
    for name, arr in arrays.items():
        checks.need(np.dtype(arr.dtype) == np.float32, f"{name} dtype {arr.dtype} must be f32")


class ScenarioOpsMixin:
    def matmul(self, a, b, out, stream=None) -> None:
        """out [m, n] = a [m, k] @ b [k, n] in float32."""
        _need_f32(a=a, b=b, out=out)
        checks.need(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]
                    and tuple(out.shape) == (a.shape[0], b.shape[1]),
                    lambda: f"matmul shapes a {a.shape}, b {b.shape}, out {out.shape} do not chain")
        target = self._op_stream("matmul", stream, a=a, b=b, out=out)
        (m, k), n = a.shape, b.shape[1]
        self._run(target, "model.cu", "matmul_f32", plan.matmul_launch(m, n),
                  (a.data, b.data, out.data, _i32(m), _i32(n), _i32(k)))

    def rms_norm(self, x, weight, out, eps: float, stream=None) -> None:
        _need_f32(x=x, weight=weight, out=out)
        checks.need(x.ndim == 2 and tuple(out.shape) == tuple(x.shape)
                    and tuple(weight.shape) == (x.shape[1],),
                    lambda: f"rms_norm shapes x {x.shape}, weight {weight.shape}, out {out.shape}")
        target = self._op_stream("rms_norm", stream, x=x, weight=weight, out=out)
        n, d = x.shape
        self._run(target, "model.cu", "rms_norm_f32", plan.row_launch(n, d),
                  (x.data, weight.data, out.data, _i32(d), np.float32(eps)))

    def add(self, a, b, out, stream=None) -> None:
        _need_f32(a=a, b=b, out=out)
        checks.need(tuple(a.shape) == tuple(b.shape) == tuple(out.shape),
                    lambda: f"add shapes a {a.shape}, b {b.shape}, out {out.shape} must be equal")
        target = self._op_stream("add", stream, a=a, b=b, out=out)
        self._run(target, "model.cu", "add_f32", plan.grid_stride(a.size),
                  (a.data, b.data, out.data, np.int64(a.size)))

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        """In place: (out, lse) <- online-softmax merge with (part_out, part_lse)."""
        _need_f32(out=out, lse=lse, part_out=part_out, part_lse=part_lse)
        checks.need(out.ndim == 3 and tuple(part_out.shape) == tuple(out.shape)
                    and tuple(lse.shape) == tuple(part_lse.shape) == tuple(out.shape[:2]),
                    lambda: f"attn_merge shapes out {out.shape}, lse {lse.shape}, part_out "
                            f"{part_out.shape}, part_lse {part_lse.shape}")
        target = self._op_stream("attn_merge", stream, out=out, lse=lse, part_out=part_out,
                                 part_lse=part_lse)
        n_q, n_heads, dv = out.shape
        self._run(target, "model.cu", "merge_partial_f32",
                  plan.row_launch(n_q * n_heads, dv, hi=128),
                  (out.data, lse.data, part_out.data, part_lse.data, _i32(dv)))

    def write(self, dst, host: np.ndarray, stream=None) -> None:
        """dst <- host (converted to dst's dtype), ordered on the stream; the host array is
        copied into pinned memory at the call, so the caller may reuse it at once."""
        host = np.asarray(host)
        checks.need(tuple(host.shape) == tuple(dst.shape),
                    lambda: f"write: host shape {host.shape} must be dst's {dst.shape}")
        target = self._op_stream("write", stream, dst=dst)
        if target.cupy_stream.is_capturing():
            raise RuntimeError("write: host uploads cannot be recorded in a CUDA graph; write "
                               "the inputs before capture_begin / replay")
        converted = np.ascontiguousarray(host.astype(dst.dtype, copy=False))
        self.runtime.upload(dst.data, converted, target)
        small = converted.nbytes <= FINGERPRINT_MAX_BYTES
        dst.fingerprint = plan.fingerprint(converted.tobytes()) if small else None

    def _op_stream(self, op: str, stream, **arrays):
        self._need_contiguous(**arrays)
        return self._target(self._same_device(op, **arrays), stream)
