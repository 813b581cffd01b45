"""SET_ROWS, GET_ROWS and CPY: data movement with dtype conversion (round to nearest even).

A row is everything after the first dim (up to 3 dims, any strides).  CPY walks the output in flat
order and reads the source through permuted strides (up to 4 dims), so transposes and strided
slices need no copy.
"""

import math

import triton
import triton.language as tl

from opbench.backends.common.strides import is_dense, last_offset

from .kernels_common import copy_elements, next_pow2, rows_per_program

MAX_CPY_DIMS = 4


@triton.jit
def rows_kernel(
    src_ptr, dst_ptr, index_ptr, n_rows, row_len, n2, n3,
    s_src, s_src1, s_src2, s_src3, s_dst, s_dst1, s_dst2, s_dst3,
    SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """SCATTER: dst[index[i]] = src[i] (index -1 skips); else dst[i] = src[index[i]].

    A program moves a tile of rows; a row is up to 3 trailing dims [n1, n2, n3] with their own
    strides (views welcome)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    index = tl.load(index_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    if SCATTER:
        src_row = rows.to(tl.int64)
        dst_row = index
    else:
        src_row = index
        dst_row = rows.to(tl.int64)
    mask = (index >= 0)[:, None] & (cols < row_len)[None, :]  # -1 (and rows past the end) skip
    c1 = cols // (n2 * n3)
    c2 = (cols // n3) % n2
    c3 = cols % n3
    src_off = src_row[:, None] * s_src + (c1 * s_src1 + c2 * s_src2 + c3 * s_src3)[None, :]
    dst_off = dst_row[:, None] * s_dst + (c1 * s_dst1 + c2 * s_dst2 + c3 * s_dst3)[None, :]
    copy_elements(src_ptr + src_off, dst_ptr + dst_off, mask)


@triton.jit
def cpy_kernel(
    src_ptr, out_ptr, n,
    n1, n2, n3, ss0, ss1, ss2, ss3, so0, so1, so2, so3,
    BLOCK: tl.constexpr, CONTIGUOUS: tl.constexpr, WIDE: tl.constexpr,
):
    """out[i0, i1, i2, i3] = src[i0*ss0 + i1*ss1 + i2*ss2 + i3*ss3] for flat output index i.

    CONTIGUOUS: source and output both dense in flat order, so i is the offset on both sides
    (no index math).  WIDE: indices and offsets in 64 bits, else in 32 (``cpy_index_plan``): a
    64-bit division is a long instruction sequence on a GPU, six of them per element."""
    if WIDE:
        flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    if CONTIGUOUS:
        src_off = flat
        out_off = flat
    else:
        i3 = flat % n3
        i2 = (flat // n3) % n2
        i1 = (flat // (n3 * n2)) % n1
        i0 = flat // (n3 * n2 * n1)
        src_off = i0 * ss0 + i1 * ss1 + i2 * ss2 + i3 * ss3
        out_off = i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3
    copy_elements(src_ptr + src_off, out_ptr + out_off, mask)


INT32_LIMIT = 1 << 31


def cpy_index_plan(shape, src_strides, out_strides) -> dict:
    """CONTIGUOUS and WIDE for cpy_kernel (padded 4-dim shape, element strides): 32-bit index
    math when n and the largest offset on either side are below 2**31 (blocks are powers of
    two, so the last block, which runs past n, ends at or before 2**31 too)."""
    largest = max(math.prod(shape), last_offset(shape, src_strides),
                  last_offset(shape, out_strides))
    return {"CONTIGUOUS": is_dense(shape, src_strides) and is_dense(shape, out_strides),
            "WIDE": largest >= INT32_LIMIT}


def _row_layout(t) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(trailing shape, strides) of a row, padded in front to 3 dims."""
    if t.dim() > 4:
        raise ValueError(f"rows of up to 3 dims are supported, got shape {tuple(t.shape)}")
    pad = 4 - t.dim()
    return (1,) * pad + tuple(t.shape[1:]), (0,) * pad + tuple(t.stride()[1:])


def _launch_rows(src, dst, index, scatter, block, kernel):
    n_rows = index.shape[0]
    row_shape, src_strides = _row_layout(src)
    _, dst_strides = _row_layout(dst)
    row_len = row_shape[0] * row_shape[1] * row_shape[2]
    if n_rows == 0 or row_len == 0:
        return
    block = block or min(next_pow2(row_len), 1024)
    block_r = rows_per_program(kernel, n_rows, block)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(row_len, block))
    kernel[grid](src, dst, index, n_rows, row_len, row_shape[1], row_shape[2],
                 src.stride(0), *src_strides, dst.stride(0), *dst_strides,
                 SCATTER=scatter, BLOCK_R=block_r, BLOCK_C=block)


def launch_set_rows(dst, src, slots, *, block=None, kernel=rows_kernel):
    _launch_rows(src, dst, slots, True, block, kernel)


def launch_get_rows(src, rows, out, *, block=None, kernel=rows_kernel):
    _launch_rows(src, out, rows, False, block, kernel)


def launch_cpy(src, out, perm, step=1, *, block=None, kernel=cpy_kernel):
    view = src.permute(*perm)[::step] if src.dim() else src
    if view.dim() > MAX_CPY_DIMS:
        raise ValueError(f"cpy supports up to {MAX_CPY_DIMS} dims, got {view.dim()}")
    pad = MAX_CPY_DIMS - view.dim()
    shape = (1,) * pad + tuple(view.shape)
    src_strides = (0,) * pad + tuple(view.stride())
    out_strides = (0,) * pad + tuple(out.stride())
    n = view.numel()
    if n == 0:
        return
    block = block or min(next_pow2(n), 1024)
    kernel[(triton.cdiv(n, block),)](src, out, n, *shape[1:], *src_strides, *out_strides,
                                     BLOCK=block,
                                     **cpy_index_plan(shape, src_strides, out_strides))
