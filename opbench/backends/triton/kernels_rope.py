"""ROPE: ggml rope_ext / rope_multi (normal, neox, mrope), YaRN, freq_factors, inverse.

One program rotates a tile of (token, head) rows.  Angles are computed in-kernel (no sin/cos
cache): theta = p * omega_i with omega_i = theta_scale^i / ff_i, YaRN-mixed (float64, rounded
once to float32), then cos/sin in float32 times mscale.
"""

import math

import triton
import triton.language as tl

from ..common.yarn import yarn_corr_dims
from .kernels_common import load_f32, next_pow2, rows_per_program, store_f32


@triton.jit
def rope_kernel(
    x_ptr, pos_ptr, out_ptr, ff_ptr,
    n_rows, n_heads, pos_stride,
    sx_t, sx_h, sx_d, so_t, so_h, so_d,
    freq_base, freq_scale, ext_factor, mscale, corr_low, corr_high,
    sect0, sect1, sect2, sect_sum,
    N_DIMS: tl.constexpr, HEAD_DIM: tl.constexpr, NEOX: tl.constexpr, MROPE: tl.constexpr,
    HAS_FF: tl.constexpr, YARN: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_PAIRS: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One program rotates BLOCK_R (token, head) rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    token = rows // n_heads
    head = rows % n_heads
    pairs = tl.arange(0, BLOCK_PAIRS)
    pair_ok = pairs < N_DIMS // 2
    mask = row_ok[:, None] & pair_ok[None, :]

    pos = _pair_positions(pos_ptr, token, row_ok, pos_stride, pairs, sect0, sect1, sect2,
                          sect_sum, MROPE)
    omega = _pair_frequencies(pairs, pair_ok, ff_ptr, freq_base, freq_scale, ext_factor,
                              corr_low, corr_high, N_DIMS, HAS_FF, YARN)
    theta = pos * omega[None, :]
    cos = tl.cos(theta) * mscale
    sin = tl.sin(theta) * mscale
    if INVERSE:
        sin = -sin

    # pair (a, b): normal (2i, 2i+1); neox and mrope (i, i + n_dims/2)
    if NEOX:
        dim_a = pairs
        dim_b = pairs + N_DIMS // 2
    else:
        dim_a = 2 * pairs
        dim_b = 2 * pairs + 1
    x_row = x_ptr + token.to(tl.int64)[:, None] * sx_t + head[:, None] * sx_h
    o_row = out_ptr + token.to(tl.int64)[:, None] * so_t + head[:, None] * so_h
    a = load_f32(x_row + dim_a[None, :] * sx_d, mask)
    b = load_f32(x_row + dim_b[None, :] * sx_d, mask)
    store_f32(o_row + dim_a[None, :] * so_d, a * cos - b * sin, mask)
    store_f32(o_row + dim_b[None, :] * so_d, a * sin + b * cos, mask)

    if HEAD_DIM > N_DIMS:  # dims past n_dims pass through unchanged
        rest = N_DIMS + tl.arange(0, BLOCK_PASS)
        rest_mask = row_ok[:, None] & (rest < HEAD_DIM)[None, :]
        vals = tl.load(x_row + rest[None, :] * sx_d, mask=rest_mask)
        tl.store(o_row + rest[None, :] * so_d, vals, mask=rest_mask)


@triton.jit
def _pair_frequencies(pairs, pair_ok, ff_ptr, freq_base, freq_scale, ext_factor, corr_low,
                      corr_high, N_DIMS: tl.constexpr, HAS_FF: tl.constexpr, YARN: tl.constexpr):
    """float32 angular frequency of every pair, theta = p * omega (ggml rope_yarn, folded):
    omega_i = base^(-2i/n_dims) / ff_i * (freq_scale * (1 - mix_i) + mix_i).

    Computed in float64 and rounded once: a float32 base^(-2i/n_dims) is off by up to ~15 ulp
    for large i, and at positions of a few thousand one ulp of theta is already 1e-4 rad.  It is
    one small vector per program, so the float64 cost is negligible even on GPUs."""
    pair = pairs.to(tl.float64)
    zero = tl.zeros_like(pair)  # lifts the float32 scalar arguments to float64 vectors
    omega = tl.exp2(pair * (-2.0 / N_DIMS) * tl.log2(zero + freq_base))
    if HAS_FF:
        omega = omega / tl.load(ff_ptr + pairs, mask=pair_ok, other=1.0).to(tl.float64)
    scale = zero + freq_scale
    if YARN:
        # ggml rope_yarn_ramp(low, high, i0) with i0 = 2 * pair: a function of the pair index
        ramp = (pair - corr_low) / tl.maximum(0.001, corr_high - corr_low)
        mix = (1.0 - tl.minimum(1.0, tl.maximum(0.0, ramp))) * ext_factor
        scale = scale * (1.0 - mix) + mix
    return (omega * scale).to(tl.float32)


@triton.jit
def _pair_positions(pos_ptr, token, row_ok, pos_stride, pairs, sect0, sect1, sect2, sect_sum,
                    MROPE: tl.constexpr):
    """float32 position of every (row, pair): the token's position, broadcast over pairs, or
    (mrope) the position row of the pair's section."""
    if MROPE:
        sector = pairs % sect_sum
        section = tl.where(sector < sect0 + sect1 + sect2, 2, 3)
        section = tl.where(sector < sect0 + sect1, 1, section)
        section = tl.where(sector < sect0, 0, section)
        ptrs = pos_ptr + section[None, :] * pos_stride + token[:, None]
        return tl.load(ptrs, mask=row_ok[:, None] & (pairs >= 0)[None, :], other=0).to(tl.float32)
    else:
        return tl.load(pos_ptr + token, mask=row_ok, other=0).to(tl.float32)[:, None]


def launch_rope(x, pos, out, p, freq_factors=None, *, kernel=rope_kernel, block_r=None):
    """Rotate x [T, H, D] into out.  ``p`` is a RopeParams; tensors are torch tensors."""
    n_tokens, n_heads, head_dim = x.shape
    pos = pos.contiguous()
    if n_tokens == 0 or n_heads == 0:
        return
    yarn = p.ext_factor != 0
    low, high = (0.0, 0.0)
    mscale = p.attn_factor
    if yarn:
        low, high = yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow)
        mscale = p.attn_factor * (1.0 + 0.1 * math.log(1.0 / p.freq_scale))
    sections = p.sections or (0, 0, 0, 0)
    n_rows = n_tokens * n_heads
    block_r = block_r or rows_per_program(kernel, n_rows, head_dim)
    kernel[(triton.cdiv(n_rows, block_r),)](
        x, pos, out, freq_factors if freq_factors is not None else x,
        n_rows, n_heads, pos.stride(0) if pos.dim() == 2 else 0,
        *x.stride(), *out.stride(),
        p.freq_base, p.freq_scale, p.ext_factor, mscale, low, high,
        sections[0], sections[1], sections[2], max(1, sum(sections)),
        N_DIMS=p.n_dims, HEAD_DIM=head_dim, NEOX=p.mode != "normal", MROPE=p.mode == "mrope",
        HAS_FF=freq_factors is not None, YARN=yarn, INVERSE=p.inverse,
        BLOCK_R=block_r, BLOCK_PAIRS=next_pow2(p.n_dims // 2),
        BLOCK_PASS=next_pow2(head_dim - p.n_dims),
    )
