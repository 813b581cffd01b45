"""Helpers shared by every kernel: exact dtype conversion at load and store.

Kernels do their math in float32 and convert only at the memory boundary.  bfloat16 is converted
by hand on its bit pattern: Triton's interpreter truncates float32 -> bfloat16 casts while GPUs
round to nearest even, so an explicit round-to-nearest-even keeps both modes bit-identical (and
bit-identical to ml_dtypes, which the copy oracles use).
"""

import triton
import triton.language as tl


@triton.jit
def load_f32(ptrs, mask):
    """Load any float storage dtype as float32 (masked lanes read 0)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptrs.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0).to(tl.float32)


@triton.jit
def store_f32(ptrs, x, mask):
    """Store float32 ``x`` into the pointers' dtype, rounding to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a quiet NaN
        tl.store(ptrs.to(tl.pointer_type(tl.uint16)), rounded.to(tl.uint16), mask=mask)
    else:
        if ptrs.dtype.element_ty == tl.float16:
            x = tl.where(x != x, float("nan"), x)  # NaN -> a quiet NaN, as cvt.rn.f16.f32 gives
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def copy_elements(src_ptrs, dst_ptrs, mask):
    """dst = src rounded to dst's dtype; a move (same dtype) copies the bits, so NaN payloads
    and signalling NaNs stay as they are (README "The NaN rule")."""
    if src_ptrs.dtype.element_ty != dst_ptrs.dtype.element_ty:
        store_f32(dst_ptrs, load_f32(src_ptrs, mask), mask)
    elif src_ptrs.dtype.element_ty == tl.float32:
        words = tl.load(src_ptrs.to(tl.pointer_type(tl.uint32)), mask=mask)
        tl.store(dst_ptrs.to(tl.pointer_type(tl.uint32)), words, mask=mask)
    else:
        words = tl.load(src_ptrs.to(tl.pointer_type(tl.uint16)), mask=mask)
        tl.store(dst_ptrs.to(tl.pointer_type(tl.uint16)), words, mask=mask)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's interpreter (decided when it was decorated)."""
    return type(kernel).__name__ == "InterpretedFunction"


def rows_per_program(kernel, n_rows: int, row_block: int) -> int:
    """Rows one program handles, a power of two (``tl.arange`` takes no other length: on an
    H200, 4096 // 80 = 51 rows failed to compile every RoPE of head size 80 and 96, which the
    interpreter accepts).  The interpreter pays per program and per operation, not per
    element, so it gets tiles of up to 64K elements; a GPU gets up to 4K (registers)."""
    budget = (1 << 16) if interpreted(kernel) else (1 << 12)
    rows = max(1, min(next_pow2(n_rows), budget // max(1, row_block)))
    return 1 << (rows.bit_length() - 1)  # the largest power of two not above it
