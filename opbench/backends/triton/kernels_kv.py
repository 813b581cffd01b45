"""KV_ROTATE: re-rotate cached keys in place after eviction, angles read from a float32 LUT.

One program rotates a tile of tokens of one kv head in one listed block.  The LUT row of a
token is its block's delta (``deltas [R, 1]``, broadcast) or its own (``deltas [R, B]``).
"""

import triton
import triton.language as tl

from .kernels_common import load_f32, next_pow2, store_f32


@triton.jit
def kv_rotate_kernel(
    cache_ptr, blocks_ptr, deltas_ptr, lut_ptr,
    block_size, s_blk, s_tok, s_head, s_dim, s_delta, s_lut,
    HEAD_DIM: tl.constexpr, PER_TOKEN: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    r = tl.program_id(0)
    kv_head = tl.program_id(1)
    tokens = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < block_size
    pairs = tl.arange(0, BLOCK_HALF)
    pair_ok = pairs < HEAD_DIM // 2
    mask = token_ok[:, None] & pair_ok[None, :]

    block = tl.load(blocks_ptr + r).to(tl.int64)
    if PER_TOKEN:
        delta = tl.load(deltas_ptr + r * s_delta + tokens, mask=token_ok, other=0)
    else:
        delta = tl.load(deltas_ptr + r * s_delta + 0 * tokens)  # one row for the whole block
    lut_row = lut_ptr + delta.to(tl.int64)[:, None] * s_lut + pairs[None, :]
    cos = tl.load(lut_row, mask=mask, other=0.0)
    sin = tl.load(lut_row + HEAD_DIM // 2, mask=mask, other=0.0)

    if INTERLEAVED:
        dim_a = 2 * pairs
        dim_b = 2 * pairs + 1
    else:  # rotate_half
        dim_a = pairs
        dim_b = pairs + HEAD_DIM // 2
    row = cache_ptr + block * s_blk + tokens.to(tl.int64)[:, None] * s_tok + kv_head * s_head
    a = load_f32(row + dim_a[None, :] * s_dim, mask)
    b = load_f32(row + dim_b[None, :] * s_dim, mask)
    store_f32(row + dim_a[None, :] * s_dim, a * cos - b * sin, mask)
    store_f32(row + dim_b[None, :] * s_dim, b * cos + a * sin, mask)


def launch_kv_rotate(key_cache, block_indices, deltas, lut, layout, *, block_t=None,
                     kernel=kv_rotate_kernel):
    n_rot = block_indices.shape[0]
    _, block_size, n_kv_heads, head_dim = key_cache.shape
    if n_rot == 0:
        return
    block_t = block_t or min(next_pow2(block_size), 32)
    grid = (n_rot, n_kv_heads, triton.cdiv(block_size, block_t))
    kernel[grid](
        key_cache, block_indices, deltas, lut,
        block_size, *key_cache.stride(), deltas.stride(0), lut.stride(0),
        HEAD_DIM=head_dim, PER_TOKEN=deltas.shape[1] != 1 or block_size == 1,
        INTERLEAVED=layout == "interleaved", BLOCK_T=block_t,
        BLOCK_HALF=next_pow2(head_dim // 2),
    )
