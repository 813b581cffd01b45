"""ATTN: flash-attention style forward over contiguous or paged KV, and a split-KV decode path.

``flash_attention_kernel``: one program per (query tile, head, sequence); K/V tiles are streamed
with an online softmax (running max m, running denominator l, rescaled accumulator).  Keys are
addressed through the block table when the KV cache is paged.

``decode_split_kernel`` + ``merge_partials_kernel``: for as many query rows as sequences
(decode), the KV range is cut into splits computed in parallel *without* sinks, each producing
a normalized partial output and its log-sum-exp; the merge is the oracle's ``merge_partials``
(sinks added once, at the end).  A program takes one query row and finds its sequence in the
query starts on the device, so the host never reads them (a read would wait for the GPU on
every call, and cannot be captured in a CUDA graph).

All math is float32; QK^T and PV use ``input_precision="ieee"`` so f32 inputs are not silently
rounded to TF32 on GPUs.
"""

import math

import torch
import triton
import triton.language as tl

from .kernels_common import load_f32, next_pow2, rows_per_program, store_f32

NEG_INF = float("-inf")


@triton.jit
def _tanh(x):
    # tl has no tanh; this form never overflows (exp of a non-positive number)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _biased_scores(s, mask_vals, q_pos, keys, visible, slope, softcap, window,
                   SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, ALIBI: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Protocol score order: softcap, + mask, + ALiBi, then causal/window -> -inf.

    Shapes only need to broadcast: [M, 1] x [1, N] for flash tiles, scalar x [N] for decode."""
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if HAS_MASK:
        s = s + mask_vals
    if ALIBI:
        s = s + slope * (keys - q_pos).to(tl.float32)
    if CAUSAL:
        visible = visible & (keys <= q_pos)
    if WINDOW:
        visible = visible & (q_pos - keys < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _alibi_slope(head, log2_m0, log2_m1, n_head_log2):
    """ggml slopes: m0^(h+1) for h < n_head_log2, else m1^(2(h - n_head_log2) + 1)."""
    below = head < n_head_log2
    exponent = tl.where(below, head + 1, 2 * (head - n_head_log2) + 1).to(tl.float32)
    return tl.exp2(exponent * tl.where(below, log2_m0, log2_m1))


@triton.jit
def _kv_slots(bt_ptr, seq, bt_stride, keys, key_ok, block_size, PAGED: tl.constexpr):
    """(block, row within block) of every key: through the block table when paged; a
    contiguous K/V is one block (its block stride is 0)."""
    if PAGED:
        blocks = tl.load(bt_ptr + seq * bt_stride + keys // block_size, mask=key_ok, other=0)
        return blocks.to(tl.int64), (keys % block_size).to(tl.int64)
    else:
        return tl.zeros_like(keys).to(tl.int64), keys.to(tl.int64)


@triton.jit
def _sequence_bounds(q_start_ptr, seq_lens_ptr, seq, n_q, n_kv, PAGED: tl.constexpr):
    """(first packed query row, query count, key count) of sequence ``seq``."""
    if PAGED:
        q_begin = tl.load(q_start_ptr + seq)
        q_len = tl.load(q_start_ptr + seq + 1) - q_begin
        kv_len = tl.load(seq_lens_ptr + seq)
        return q_begin, q_len, kv_len
    else:
        return 0, n_q, n_kv


@triton.jit
def _row_sequence(q_start_ptr, row, n_seqs, SEARCH_STEPS: tl.constexpr):
    """The sequence of packed query row ``row``: the last s with q_start[s] <= row (binary
    search; a sequence with no rows shares its start with the next, which wins)."""
    lo = row * 0
    hi = n_seqs - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        ahead = tl.load(q_start_ptr + mid) <= row
        lo = tl.where(ahead, mid, lo)
        hi = tl.where(ahead, hi, mid - 1)
    return lo


@triton.jit
def flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, sinks_ptr, bt_ptr, seq_lens_ptr, q_start_ptr,
    n_q, n_kv, group, bt_stride, block_size,
    sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, so_t, so_h, so_d,
    s_lse_t, s_lse_h, s_mask,
    scale, softcap, window, log2_m0, log2_m1, n_head_log2,
    DK: tl.constexpr, DV: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // group
    q_begin, q_len, kv_len = _sequence_bounds(q_start_ptr, seq_lens_ptr, seq, n_q, n_kv, PAGED)
    tile_start = tl.program_id(0) * BLOCK_M
    rows = tile_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = kv_len - q_len + rows  # the new tokens are the last q_len of the sequence
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)

    q_rows = (q_begin + rows).to(tl.int64)
    q = load_f32(q_ptr + q_rows[:, None] * sq_t + head * sq_h + dk[None, :] * sq_d,
                 row_ok[:, None] & (dk < DK)[None, :])
    slope = 0.0
    if ALIBI:
        slope = _alibi_slope(head, log2_m0, log2_m1, n_head_log2)

    # keys no row of this tile can see are skipped: after the last query (causal) and before the
    # first query's window
    lo = 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, kv_len - q_len + tile_start + BLOCK_M)
    if WINDOW:
        lo = tl.maximum(0, kv_len - q_len + tile_start - window + 1) // BLOCK_N * BLOCK_N
    hi = tl.where(tile_start < q_len, hi, 0)  # grid covers the longest sequence: others idle

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < kv_len
        blocks, rows_in_block = _kv_slots(bt_ptr, seq, bt_stride, keys, key_ok, block_size, PAGED)
        k_off = blocks * sk_b + rows_in_block * sk_t
        v_off = blocks * sv_b + rows_in_block * sv_t
        k_t = load_f32(k_ptr + k_off[None, :] + kv_head * sk_h + dk[:, None] * sk_d,
                       key_ok[None, :] & (dk < DK)[:, None])
        s = tl.dot(q, k_t, input_precision="ieee") * scale
        mask_vals = 0.0
        if HAS_MASK:
            mask_vals = tl.load(mask_ptr + q_rows[:, None] * s_mask + keys[None, :],
                                mask=row_ok[:, None] & key_ok[None, :], other=0.0)
        s = _biased_scores(s, mask_vals, q_pos[:, None], keys[None, :], key_ok[None, :], slope,
                           softcap, window, SOFTCAP, HAS_MASK, ALIBI, CAUSAL, WINDOW)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all hidden so far: exp stays 0
        alpha = tl.exp(m_i - m_base)
        p = tl.exp(s - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_f32(v_ptr + v_off[:, None] + kv_head * sv_h + dv[None, :] * sv_d,
                     key_ok[:, None] & (dv < DV)[None, :])
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    if HAS_SINKS:  # one extra logit in the denominator, no value
        sink = tl.load(sinks_ptr + head)
        m_final = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_final)
        l_i = l_i * alpha + tl.exp(sink - m_final)
        acc = acc * alpha[:, None]
        m_i = m_final
    empty = l_i == 0.0  # nothing visible: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    store_f32(out_ptr + q_rows[:, None] * so_t + head * so_h + dv[None, :] * so_d, out,
              row_ok[:, None] & (dv < DV)[None, :])
    if HAS_LSE:
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + q_rows * s_lse_t + head * s_lse_h, lse, mask=row_ok)


@triton.jit
def decode_split_kernel(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, mask_ptr, bt_ptr, seq_lens_ptr, q_start_ptr,
    n_kv, n_seqs, group, bt_stride, block_size, split_len, n_splits,
    sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
    scale, softcap, window, log2_m0, log2_m1, n_head_log2,
    DK: tl.constexpr, DV: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, ALIBI: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    """One query row, one head, keys [split*split_len, (split+1)*split_len): a partial result.
    Paged, the row's sequence is searched for in q_start (a sequence may hold any number of
    the rows: the decode shape is only as many rows as sequences)."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.program_id(2)
    kv_head = head // group
    seq = q_row * 0
    if PAGED:
        seq = _row_sequence(q_start_ptr, q_row, n_seqs, SEARCH_STEPS)
    q_begin, q_len, kv_len = _sequence_bounds(q_start_ptr, seq_lens_ptr, seq, 1, n_kv, PAGED)
    q_pos = kv_len - q_len + (q_row - q_begin)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = load_f32(q_ptr + q_row * sq_t + head * sq_h + dk * sq_d, dk < DK)
    slope = 0.0
    if ALIBI:
        slope = _alibi_slope(head, log2_m0, log2_m1, n_head_log2)

    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    lo = split * split_len
    hi = tl.minimum(kv_len, lo + split_len)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        blocks, rows_in_block = _kv_slots(bt_ptr, seq, bt_stride, keys, key_ok, block_size, PAGED)
        k_off = blocks * sk_b + rows_in_block * sk_t
        v_off = blocks * sv_b + rows_in_block * sv_t
        k = load_f32(k_ptr + k_off[:, None] + kv_head * sk_h + dk[None, :] * sk_d,
                     key_ok[:, None] & (dk < DK)[None, :])
        s = tl.sum(q[None, :] * k, 1) * scale
        mask_vals = 0.0
        if HAS_MASK:
            mask_vals = tl.load(mask_ptr + keys, mask=key_ok, other=0.0)
        s = _biased_scores(s, mask_vals, q_pos, keys, key_ok, slope, softcap, window,
                           SOFTCAP, HAS_MASK, ALIBI, CAUSAL, WINDOW)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_base)
        p = tl.exp(s - m_base)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = load_f32(v_ptr + v_off[:, None] + kv_head * sv_h + dv[None, :] * sv_d,
                     key_ok[:, None] & (dv < DV)[None, :])
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new

    empty = l_i == 0.0
    part = (q_row * tl.num_programs(1) + head) * n_splits + split
    out = acc / tl.where(empty, 1.0, l_i)
    tl.store(part_out_ptr + part.to(tl.int64) * BLOCK_DV + dv, out)
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(part_lse_ptr + part, lse)


@triton.jit
def merge_partials_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, sinks_ptr,
    n_rows, n_heads, n_splits, so_t, so_h, so_d, s_lse_t, s_lse_h,
    DV: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """merge_partials for BLOCK_R (query row, head) rows: M = max(lse_p, sink);
    w_p = exp(lse_p - M); D = sum w_p + exp(sink - M); out = sum_{w_p > 0} w_p out_p / D;
    lse = M + log D (M taken as 0 when not finite)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    q_row = (rows // n_heads).to(tl.int64)
    head = rows % n_heads
    dv = tl.arange(0, BLOCK_DV)
    parts = rows.to(tl.int64) * n_splits  # partial p of row r sits at r * n_splits + p

    total_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for split in range(0, n_splits):
        lse_p = tl.load(part_lse_ptr + parts + split, mask=row_ok, other=float("-inf"))
        total_max = tl.maximum(total_max, lse_p)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0)
        total_max = tl.maximum(total_max, sink)
    total_max = tl.where(total_max == float("-inf"), 0.0, total_max)

    denom = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for split in range(0, n_splits):
        lse_p = tl.load(part_lse_ptr + parts + split, mask=row_ok, other=float("-inf"))
        weight = tl.exp(lse_p - total_max)
        denom += weight
        out_p = tl.load(part_out_ptr + (parts + split)[:, None] * BLOCK_DV + dv[None, :],
                        mask=row_ok[:, None], other=0.0)
        acc += tl.where(weight[:, None] > 0, weight[:, None] * out_p, 0.0)  # NaN-safe
    if HAS_SINKS:
        denom += tl.exp(sink - total_max)
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]

    store_f32(out_ptr + q_row[:, None] * so_t + head[:, None] * so_h + dv[None, :] * so_d, out,
              row_ok[:, None] & (dv < DV)[None, :])
    if HAS_LSE:
        seen = denom > 0.0  # log(0) = -inf, written without a log of 0
        lse = tl.where(seen, total_max + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + q_row * s_lse_t + head * s_lse_h, lse, mask=row_ok)


#: GPU tiles by head size (query/key width): (largest head size, flash block_m, block_n,
#: num_warps, num_stages or None for Triton's default, decode block_n).  The dots are float32
#: FMA (``input_precision="ieee"``), each program holding its tiles in registers; these are
#: the largest tried whose sm_90 code spills no register (Triton's compile read back with
#: cuobjdump; ``test_triton_gpu_compile.py`` checks every head size of the ATTN table).  The
#: 64x64 tiles used before took 32 registers and a 9 KB stack at head size 128 (ptxas gave up
#: on them); 576/512 fits only single-buffered.
GPU_TILES = (
    (64, 64, 32, 8, None, 64),
    (128, 32, 32, 8, None, 32),
    (256, 16, 16, 8, None, 32),
    (1024, 16, 16, 8, 1, 16),
)


def default_tiles(interpreter: bool, head_dim: int, decode: bool = False) -> dict:
    """Tile sizes (and warps): the interpreter pays per tile operation, so big tiles; a GPU
    pays registers per tile element (GPU_TILES).  ``decode``: the split-KV decode kernel's."""
    if interpreter:
        return {"block_n": 128, "split_len": 512} if decode else {"block_m": 64, "block_n": 128}
    _, block_m, block_n, warps, stages, decode_block_n = next(
        row for row in GPU_TILES if head_dim <= row[0] or row is GPU_TILES[-1])
    if decode:
        return {"block_n": decode_block_n, "split_len": 256}
    tiles = {"block_m": block_m, "block_n": block_n, "num_warps": warps}
    return tiles if stages is None else {**tiles, "num_stages": stages}


def _alibi_args(n_heads: int, max_bias: float) -> tuple[float, float, int]:
    """(log2 m0, log2 m1, n_head_log2) of ggml's ALiBi slopes."""
    n_head_log2 = 2 ** int(math.floor(math.log2(n_heads)))
    return -max_bias / n_head_log2, -(max_bias / 2.0) / n_head_log2, n_head_log2


def _options(p, n_heads, mask, sinks, lse, paged):
    """Scalar arguments and compile-time switches shared by the flash and decode kernels."""
    log2_m0, log2_m1, n_head_log2 = _alibi_args(n_heads, p.max_bias)
    scalars = dict(scale=p.scale, softcap=p.softcap, window=p.window, log2_m0=log2_m0,
                   log2_m1=log2_m1, n_head_log2=n_head_log2)
    switches = dict(PAGED=paged is not None, CAUSAL=p.causal, WINDOW=p.window > 0,
                    SOFTCAP=p.softcap > 0, HAS_MASK=mask is not None, ALIBI=p.max_bias > 0)
    return scalars, switches


def _kv_strides(cache, paged):
    """(block, token, head, dim) strides; contiguous K/V have no block dimension."""
    if paged is not None:
        return tuple(cache.stride())
    return (0,) + tuple(cache.stride())


SMALLEST_TILE = 16  # a declared threshold of the backend's tables (TritonBackend.THRESHOLDS)
_FITTED_TILES: dict[tuple, dict] = {}  # (kernel, shapes, dtypes, asked tiles) -> tiles that fit


def launch_fitting(kernel, q, k, v, tiles: dict, launch) -> None:
    """``launch(**tiles)``, with smaller tiles where the GPU cannot hold these: Triton's
    compile raises OutOfResources (shared memory, before anything runs) -- an f32 K/V tile
    of 64 keys at head size 256, double-buffered, needs 344,320 bytes where an H200 has
    232,448.  Shrinks block_n, then block_m, to SMALLEST_TILE, then stops double-buffering
    (``num_stages=1``: MLA's f32 heads of 576/512 need 263,232 bytes in 16-key tiles); what fits
    is remembered per kernel, shapes and dtypes, so the failing compile is not tried again."""
    key = (getattr(kernel, "__name__", id(kernel)), q.shape[-1], v.shape[-1], q.dtype, k.dtype,
           tuple(sorted(tiles.items())))
    fitted = dict(_FITTED_TILES.get(key, tiles))
    while True:
        try:
            launch(**fitted)
        except triton.runtime.errors.OutOfResources:
            smaller = _smaller_tiles(fitted)
            if smaller is None:
                raise
            fitted = smaller
            continue
        _FITTED_TILES[key] = fitted
        return


def _smaller_tiles(tiles: dict) -> dict | None:
    for name in ("block_n", "block_m"):  # the K/V tiles are the big ones
        if tiles.get(name, 0) > SMALLEST_TILE:
            return {**tiles, name: SMALLEST_TILE}
    if "num_stages" not in tiles:  # Triton's default pipelines loads in 2-3 buffers
        return {**tiles, "num_stages": 1}
    return None


def launch_attention(q, k, v, out, p, mask=None, sinks=None, lse=None, paged=None, *,
                     block_m=16, block_n=32, kernel=flash_attention_kernel, **launch_options):
    """Flash-style attention over all query rows; ``paged`` is a PagedKV of torch tensors.
    ``launch_options``: Triton's (``num_warps``, ``num_stages``)."""
    launch_fitting(kernel, q, k, v, dict(block_m=block_m, block_n=block_n, **launch_options),
                   lambda **tiles: _launch_attention(q, k, v, out, p, mask, sinks, lse, paged,
                                                     kernel=kernel, **tiles))


def _launch_attention(q, k, v, out, p, mask, sinks, lse, paged, *, block_m, block_n, kernel,
                      **launch_options):
    n_q, n_heads, dk = q.shape
    dv = v.shape[-1]
    n_seqs = 1 if paged is None else paged.block_table.shape[0]
    if n_q == 0 or n_seqs == 0:
        return
    scalars, switches = _options(p, n_heads, mask, sinks, lse, paged)
    table, seq_lens, q_start = _paged_tensors(paged, q)
    n_kv = 0 if paged is not None else k.shape[0]
    max_q = n_q  # a sequence has at most all the queries; empty tiles exit at once
    grid = (triton.cdiv(max_q, block_m), n_heads, n_seqs)
    kernel[grid](
        q, k, v, out, _or(lse, q), _or(mask, q), _or(sinks, q), table, seq_lens, q_start,
        n_q, n_kv, n_heads // k.shape[-2], table.stride(0), k.shape[1] if paged else 1,
        *q.stride(), *_kv_strides(k, paged), *_kv_strides(v, paged), *out.stride(),
        *(lse.stride() if lse is not None else (0, 0)), mask.stride(0) if mask is not None else 0,
        **scalars, DK=dk, DV=dv, HAS_SINKS=sinks is not None, HAS_LSE=lse is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=next_pow2(max(dk, 16)),
        BLOCK_DV=next_pow2(max(dv, 16)), **switches, **launch_options,
    )


def launch_decode(q, k, v, out, p, mask=None, sinks=None, lse=None, paged=None, *,
                  block_n=32, split_len=256, kernel=decode_split_kernel,
                  merge_kernel=merge_partials_kernel):
    """Split-KV decode: as many query rows as sequences (each row finds its sequence in
    q_start on the device).  Partials live in float32 scratch."""
    launch_fitting(kernel, q, k, v, dict(block_n=block_n),
                   lambda **tiles: _launch_decode(q, k, v, out, p, mask, sinks, lse, paged,
                                                  split_len=split_len, kernel=kernel,
                                                  merge_kernel=merge_kernel, **tiles))


def _launch_decode(q, k, v, out, p, mask, sinks, lse, paged, *, block_n, split_len, kernel,
                   merge_kernel, **launch_options):
    n_q, n_heads, dk = q.shape
    dv = v.shape[-1]
    n_seqs = 1 if paged is None else paged.block_table.shape[0]
    if n_q == 0 or n_seqs == 0:
        return
    if n_q != n_seqs:
        raise ValueError(f"split-KV decode takes as many query rows as sequences, got {n_q} "
                         f"rows for {n_seqs}")
    scalars, switches = _options(p, n_heads, mask, sinks, lse, paged)
    table, seq_lens, q_start = _paged_tensors(paged, q)
    if paged is None:
        max_kv = k.shape[0]
    else:
        max_kv = table.shape[1] * k.shape[1]  # table capacity: no device -> host read
    split_len = max(block_n, triton.cdiv(min(split_len, max(max_kv, 1)), block_n) * block_n)
    n_splits = max(1, triton.cdiv(max_kv, split_len))
    block_dv = next_pow2(max(dv, 16))
    part_out = q.new_empty((n_q, n_heads, n_splits, block_dv), dtype=torch.float32)
    part_lse = q.new_empty((n_q, n_heads, n_splits), dtype=torch.float32)
    kernel[(n_splits, n_heads, n_q)](
        q, k, v, part_out, part_lse, _or(mask, q), table, seq_lens, q_start,
        0 if paged is not None else k.shape[0], n_seqs, n_heads // k.shape[-2], table.stride(0),
        k.shape[1] if paged else 1, split_len, n_splits,
        *q.stride(), *_kv_strides(k, paged), *_kv_strides(v, paged),
        **scalars, DK=dk, DV=dv, BLOCK_N=block_n, BLOCK_DK=next_pow2(max(dk, 16)),
        BLOCK_DV=block_dv, SEARCH_STEPS=max(1, (n_seqs - 1).bit_length()), **switches,
        **launch_options,
    )
    n_rows = n_q * n_heads
    block_r = rows_per_program(merge_kernel, n_rows, block_dv)
    merge_kernel[(triton.cdiv(n_rows, block_r),)](
        part_out, part_lse, out, _or(lse, q), _or(sinks, q), n_rows, n_heads, n_splits,
        *out.stride(), *(lse.stride() if lse is not None else (0, 0)),
        DV=dv, HAS_SINKS=sinks is not None, HAS_LSE=lse is not None,
        BLOCK_R=block_r, BLOCK_DV=block_dv,
    )


def _or(tensor, fallback):
    """Triton needs a pointer for every pointer argument; unused ones get any tensor."""
    return fallback if tensor is None else tensor


def _paged_tensors(paged, q):
    """(block_table, seq_lens, q_start); dummies (never read) for contiguous attention."""
    if paged is None:
        dummy = q.new_zeros((1, 1), dtype=torch.int32)
        return dummy, dummy, dummy
    return paged.block_table, paged.seq_lens, paged.q_start


@triton.jit
def attn_merge_kernel(
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, n_rows, n_heads,
    so_t, so_h, so_d, s_lse_t, s_lse_h, sp_t, sp_h, sp_d, s_plse_t, s_plse_h,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """In place (out, lse) <- merge of (out, lse) and (part_out, part_lse): two attentions over
    disjoint keys (ring attention's step), for BLOCK_R (query, head) rows.  A side with lse
    -inf contributes nothing."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    query = (rows // n_heads).to(tl.int64)
    head = rows % n_heads
    dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (dv < DV)[None, :]
    lse_ptrs = lse_ptr + query * s_lse_t + head * s_lse_h
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    part_lse = tl.load(part_lse_ptr + query * s_plse_t + head * s_plse_h, mask=row_ok,
                       other=float("-inf"))
    m = tl.maximum(lse, part_lse)
    m = tl.where(m == float("-inf"), 0.0, m)
    w_old = tl.exp(lse - m)[:, None]
    w_new = tl.exp(part_lse - m)[:, None]
    out_ptrs = out_ptr + query[:, None] * so_t + head[:, None] * so_h + dv[None, :] * so_d
    old = load_f32(out_ptrs, mask)
    new = load_f32(part_out_ptr + query[:, None] * sp_t + head[:, None] * sp_h
                   + dv[None, :] * sp_d, mask)
    # a side that saw nothing may hold NaN: select, never multiply it by 0
    merged = tl.where(w_old > 0, w_old * old, 0.0) + tl.where(w_new > 0, w_new * new, 0.0)
    total = w_old + w_new
    store_f32(out_ptrs, merged / tl.where(total > 0, total, 1.0), mask)
    total = tl.sum(total, 1)  # [BLOCK_R, 1] -> [BLOCK_R]
    new_lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptrs, new_lse, mask=row_ok)


def launch_attn_merge(out, lse, part_out, part_lse, *, kernel=attn_merge_kernel, block_r=None):
    n_q, n_heads, dv = out.shape
    n_rows = n_q * n_heads
    if n_rows == 0:
        return
    block_dv = next_pow2(dv)
    block_r = block_r or rows_per_program(kernel, n_rows, block_dv)
    kernel[(triton.cdiv(n_rows, block_r),)](
        out, lse, part_out, part_lse, n_rows, n_heads, *out.stride(), *lse.stride(),
        *part_out.stride(), *part_lse.stride(), DV=dv, BLOCK_R=block_r, BLOCK_DV=block_dv)
