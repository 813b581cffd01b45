"""Host-side argument checks of the cupy backend's ops: the backends' shared checks
(``opbench.backends.common.arg_checks``) with int32 indices, plus this backend's own limits.  Index
values are checked by the kernels, through the device error word."""

from __future__ import annotations

from typing import Sequence

from opbench.protocol import AttnParams

from ..common.arg_checks import ArgChecks, dtype_of, need

#: the kernels read int32 indices only
CHECKS = ArgChecks(index_dtypes=("int32",))
check_rope, check_kv_rotate, check_rows = CHECKS.rope, CHECKS.kv_rotate, CHECKS.rows


def check_attention(q, k, v, out, p: AttnParams, mask, sinks, lse, paged) -> None:
    """The shared checks, plus one dtype for q, k, v and out (one kernel instantiation)."""
    CHECKS.attention(q, k, v, out, p, mask, sinks, lse, paged)
    need(len({dtype_of(a) for a in (q, k, v, out)}) == 1, "q, k, v and out must share one dtype")


def check_cpy(src, out, perm: Sequence[int], step: int) -> tuple[int, ...]:
    """The shared checks, plus cpy_kernel's limit of 4 dims."""
    perm = CHECKS.cpy(src, out, perm, step)
    need(src.ndim <= 4, lambda: f"src has {src.ndim} dims; cpy supports up to 4")
    return perm


def lead_stride(name: str, shape: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Elements between consecutive leading indices of an array whose rows (dims 1..) are each
    C-contiguous -- what the row kernels accept, so views like ``cache[:, 0]`` need no copy."""
    expected = itemsize
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:])):
        need(size == 1 or stride == expected,
             lambda: f"{name}: each row must be contiguous (shape {tuple(shape)}, strides "
                     f"{tuple(strides)})")
        expected *= size
    if not shape or shape[0] <= 1:
        return expected // itemsize
    need(strides[0] >= 0 and strides[0] % itemsize == 0,
         lambda: f"{name}: leading stride {strides[0]} must be a non-negative multiple of "
                 f"{itemsize}")
    return strides[0] // itemsize
