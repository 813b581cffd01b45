"""The cpu backend's kernels: vectorized NumPy, float32 math, one rounding to the output dtype.

Kernels run on the device's worker thread and take plain ndarrays; shapes and dtypes were
validated on the host before the work was queued.  Data-dependent checks (indices in range)
happen here and surface at the next synchronize.
"""

from __future__ import annotations

import math

import numpy as np

from opbench.protocol import AttnParams, RopeParams, numpy_dtype

from . import jit, parallel
from .rope_cache import RopeCache, direct_cos_sin

F32 = np.float32
ATTN_TILE = 256  # keys per online-softmax tile: scores stay in L2 for typical head counts
#: query-key multiply-adds (n_q x n_kv x heads x head_dim) a thread's share of the heads must
#: reach: scenario-sized calls (tens of queries and keys) ran 12% slower split (the results
#: do not depend on it: each head is computed alone either way)
ATTN_SPLIT_MIN_WORK = 1 << 22
#: causal/window: queries per block, so each block skips its hidden tiles.  A 512-query causal
#: prefill computes 56% of the square with blocks of 64 (62.5% with 128): 32/8 heads, D=128,
#: cold, alternating in one process: one thread 61.6-66.4 ms against 69.8-91.6 ms with 128,
#: two threads 38.2-40.6 against 40.5-44.5 (32 queries: level with 64)
ATTN_Q_BLOCK = 64
#: query-key multiply-adds (n_q x heads x head_dim x n_kv) up to which attention runs the numba
#: online-softmax loop: it has no per-tile NumPy calls to pay for, so it wins on small calls
#: (scenario attention: a few heads, tens of queries and keys); BLAS wins on large ones
ATTN_JIT_MAX_WORK = 1 << 18
#: ... and, whatever the keys, up to this many query rows per kv head (n_q x heads per kv head):
#: a decode's few rows make BLAS's GEMMs matrix-vector products, and the numba loop reads
#: float16 keys without first converting a tile (a 4k-key f16 decode, one thread: 5.0 ms
#: against 12.5; at 16 rows BLAS is ahead again, 2x on f32)
ATTN_JIT_MAX_ROWS = 8
ATTN_JIT_Q_BLOCK = 16  # numba loop: queries per unit of work (a unit's rows share a K/V tile)
#: numba loop: keys per unit of work, so a decode splits over the cores (fixed: the bits depend
#: on the chunks, never on the thread count)
ATTN_JIT_KEY_CHUNK = 512


JIT_CONVERT_ELEMS = 4096  # from this size on f16 <-> f32 conversions use the numba loops


def as_f32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float16 and a.size >= JIT_CONVERT_ELEMS and jit.available():
        return jit.f16_to_f32(a)  # NumPy's f16 -> f32 cast is scalar and ~10x slower
    return a.astype(F32, copy=False)


def store(out: np.ndarray, values: np.ndarray) -> None:
    """out[...] = values (float32), the single rounding to out's storage dtype."""
    if (out.dtype == np.float16 and values.dtype == F32 and out.flags.c_contiguous
            and values.shape == out.shape and out.size >= JIT_CONVERT_ELEMS and jit.available()):
        jit.f32_to_f16(np.ascontiguousarray(values), out)
    else:
        out[...] = values


# -- ROPE ------------------------------------------------------------------------------------
ROPE_CHUNK_BYTES = 1 << 20  # tokens per pass sized so a chunk's temporaries stay in L2


def rope(x, pos, out, p: RopeParams, freq_factors, cache: RopeCache | None,
         use_jit: bool = False) -> None:
    n_tokens, n_heads, head_dim = x.shape
    if np.may_share_memory(x, out):
        x = x.copy()  # the rotation reads both halves after writing the first
    rotated_x, rotated_out = x[..., : p.n_dims], out[..., : p.n_dims]
    # f32 normal mode too: with two threads the numba loop over adjacent pairs took 0.7-0.8x
    # the time of NumPy's complex multiply on [512 tokens, 32 heads, 128] (interleaved, the
    # cos/sin lookup in both), as the halves loop does for neox against ggml
    if use_jit and jit.handles(x, out):
        cos, sin, rows = _rope_rows(pos, p, freq_factors, cache)
        jit.rope(rotated_x, cos, sin, rows, rotated_out, adjacent=p.mode == "normal")
        _pass_through(x, out, p.n_dims)
        return
    cos, sin = _rope_cos_sin(pos, p, freq_factors, cache)  # [n_tokens, n_pairs] float32
    # NumPy passes over L2-sized chunks of tokens, the chunks split over the cores
    rotate = _rotate_adjacent if p.mode == "normal" else _rotate_halves
    step = max(1, ROPE_CHUNK_BYTES // (n_heads * head_dim * 4))
    chunks = [slice(start, start + step) for start in range(0, n_tokens, step)]

    def rotate_chunks(lo: int, hi: int) -> None:  # NumPy releases the GIL: parts run in parallel
        for rows in chunks[lo:hi]:
            rotate(rotated_x[rows], cos[rows], sin[rows], rotated_out[rows])

    parallel.run_split(rotate_chunks, len(chunks))
    _pass_through(x, out, p.n_dims)


def _pass_through(x, out, n_dims: int) -> None:
    """Dims past n_dims are copied unchanged."""
    if n_dims < x.shape[-1]:
        out[..., n_dims:] = x[..., n_dims:]


def _rope_cos_sin(pos, p: RopeParams, freq_factors, cache: RopeCache | None):
    positions = pos.astype(np.int64)
    if p.mode != "mrope":
        return _cos_sin_for(positions, p, freq_factors, cache)
    # mrope: each pair index reads the position row of its section (ggml sector rule)
    n_pairs = p.n_dims // 2
    sector = np.arange(n_pairs) % sum(p.sections)
    row_of_pair = np.searchsorted(np.cumsum(p.sections[:3]), sector, side="right")
    cos = np.empty((positions.shape[1], n_pairs), F32)
    sin = np.empty_like(cos)
    for row in np.unique(row_of_pair):
        cols = row_of_pair == row
        c, s = _cos_sin_for(positions[row], p, freq_factors, cache)
        cos[:, cols], sin[:, cols] = c[:, cols], s[:, cols]
    return cos, sin


def _rope_rows(pos, p: RopeParams, freq_factors, cache: RopeCache | None):
    """(cos, sin, rows) for a kernel reading row rows[t] of cos and sin for token t: the
    cached table itself where it holds every position, else computed rows."""
    if cache is not None and p.mode != "mrope":
        return cache.lookup_rows(cache.table(p, freq_factors), pos.astype(np.int64))
    cos, sin = _rope_cos_sin(pos, p, freq_factors, cache)
    return cos, sin, np.arange(len(cos))


def _cos_sin_for(positions, p, freq_factors, cache):
    if cache is None:
        return direct_cos_sin(p, freq_factors, positions)
    return cache.lookup(cache.table(p, freq_factors), positions)


def _rotate_adjacent(x, cos, sin, out) -> None:
    """normal mode, pairs (2i, 2i+1): (a + ib)(c + is) as four float32 products and two sums,
    the numba loop's operations in its order, so jit on and off give the same bits (NumPy's
    complex multiply fuses them and differs in the last bit)."""
    xf = as_f32(x)
    a, b = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    direct = out.dtype == F32
    target = out if direct else np.empty(x.shape, F32)
    target[..., 0::2] = a * c - b * s
    target[..., 1::2] = a * s + b * c
    if not direct:
        store(out, target)  # the single rounding to the storage dtype


def _rotate_halves(x, cos, sin, out) -> None:
    """neox/mrope, pairs (i, i + n_dims/2): out = x*(c|c) + (x_hi|x_lo)*(-s|s).  Full-width
    passes keep NumPy's inner loops long (twice the speed of working on the strided halves)."""
    half = x.shape[-1] // 2
    xf = as_f32(x)
    direct = out.dtype == F32
    target = out if direct else np.empty(x.shape, F32)
    np.multiply(xf, np.concatenate([cos, cos], axis=1)[:, None, :], out=target)
    swapped = np.empty(x.shape, F32)
    np.multiply(xf[..., half:], -sin[:, None, :], out=swapped[..., :half])
    np.multiply(xf[..., :half], sin[:, None, :], out=swapped[..., half:])
    target += swapped
    if not direct:
        store(out, target)  # the single rounding to the storage dtype


def rotate_pairs(a, b, cos, sin, out_a, out_b) -> None:
    """(a, b) -> (a*c - b*s, b*c + a*s) in float32 with one scratch buffer.
    out_a / out_b must not alias a / b."""
    np.multiply(a, cos, out=out_a)
    scratch = np.multiply(b, sin)
    np.subtract(out_a, scratch, out=out_a)
    np.multiply(b, cos, out=out_b)
    np.multiply(a, sin, out=scratch)
    np.add(out_b, scratch, out=out_b)


# -- ATTN ------------------------------------------------------------------------------------
def alibi_slopes(n_heads: int, max_bias: float) -> np.ndarray:
    """ggml ``ggml_soft_max_ext`` slopes: geometric in the head index, two interleaved series
    when the head count is not a power of two."""
    if max_bias <= 0.0:
        return np.ones(n_heads, F32)
    n_log2 = 2 ** int(math.floor(math.log2(n_heads)))
    m0 = 2.0 ** (-max_bias / n_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_log2)
    h = np.arange(n_heads)
    return np.where(h < n_log2, m0 ** (h + 1), m1 ** (2 * (h - n_log2) + 1)).astype(F32)


def attention(q, k, v, out, p: AttnParams, mask=None, sinks=None, lse=None,
              use_jit: bool = True) -> None:
    n_q, n_kv = q.shape[0], k.shape[0]
    q_pos = np.arange(n_kv - n_q, n_kv)
    if _small_for_jit(use_jit, q, n_kv, k, v):  # one block of n_kv keys: table [0]
        _attend_jit(q, k[None], v[None], np.zeros(1, np.int64), q_pos, n_kv, p,
                    (mask, sinks), out, lse)
        return
    o, l_se = attend_heads(q, k, v, p, q_pos, mask, sinks)
    out[...] = o
    if lse is not None:
        lse[...] = l_se


def paged_attention(q, k_cache, v_cache, out, p: AttnParams, block_table, seq_lens, q_start,
                    sinks=None, lse=None, use_jit: bool = True) -> None:
    _check_paged_tables(q.shape[0], k_cache.shape, block_table, seq_lens, q_start)
    block_size = k_cache.shape[1]
    for s in range(len(seq_lens)):
        rows = slice(int(q_start[s]), int(q_start[s + 1]))
        n_q, n_kv = rows.stop - rows.start, int(seq_lens[s])
        if n_q == 0:
            continue
        if _small_for_jit(use_jit, q[rows], n_kv, k_cache, v_cache):  # blocks read in place
            _attend_jit(q[rows], k_cache, v_cache, block_table[s], np.arange(n_kv - n_q, n_kv),
                        n_kv, p, (None, sinks), out[rows], None if lse is None else lse[rows])
            continue
        blocks = block_table[s, : -(-n_kv // block_size)]
        # key tiles read straight from the cache (a prefill's query blocks each convert the
        # tiles they see again: a few percent of their matmuls)
        k, v = _gather_blocks(k_cache, blocks, n_kv), _gather_blocks(v_cache, blocks, n_kv)
        o, l_se = attend_heads(q[rows], k, v, p, np.arange(n_kv - n_q, n_kv), None, sinks)
        out[rows] = o
        if lse is not None:
            lse[rows] = l_se


def _small_for_jit(use_jit: bool, q, n_kv: int, k, v) -> bool:
    """The numba loop for calls of at most ATTN_JIT_MAX_WORK multiply-adds or at most
    ATTN_JIT_MAX_ROWS query rows per kv head, BLAS otherwise."""
    rows_per_kv_head = q.shape[0] * (q.shape[1] // k.shape[-2])
    return (use_jit and (q.size * n_kv <= ATTN_JIT_MAX_WORK
                         or rows_per_kv_head <= ATTN_JIT_MAX_ROWS) and jit.handles(k, v))


def _attend_jit(q, k_cache, v_cache, table, q_pos, n_kv, p: AttnParams, optional, out, lse):
    """The numba kernel over caches [blocks, block_size, Hkv, D]; float32 results, then the
    one rounding to out's dtype."""
    mask, sinks = optional
    n_q, n_heads = q.shape[:2]
    hi = np.minimum(n_kv, q_pos + 1) if p.causal else np.full(n_q, n_kv)
    lo = np.maximum(0, q_pos - p.window + 1) if p.window > 0 else np.zeros(n_q, np.int64)
    key_range = (lo.astype(np.int64), np.maximum(lo, hi).astype(np.int64))
    scal = (F32(p.scale), F32(p.softcap), F32(1.0 / p.softcap if p.softcap > 0 else 0.0),
            bool(p.causal), int(p.window))
    empty = np.empty(0, F32)
    extras = (np.ascontiguousarray(as_f32(mask)) if mask is not None else np.empty((0, 0), F32),
              alibi_slopes(n_heads, p.max_bias) if p.max_bias > 0.0 else empty,
              np.ascontiguousarray(as_f32(sinks)).reshape(-1) if sinks is not None else empty)
    out32 = out if out.dtype == F32 and out.flags.c_contiguous else np.empty(out.shape, F32)
    lse32 = np.empty((n_q, n_heads), F32)
    jit.attend(np.ascontiguousarray(as_f32(q)), k_cache, v_cache, table, q_pos, key_range,
               n_kv, scal, extras, out32, lse32, ATTN_JIT_Q_BLOCK, ATTN_JIT_KEY_CHUNK)
    if out32 is not out:
        store(out, out32)
    if lse is not None:
        lse[...] = lse32


def attend_heads(q, k, v, p: AttnParams, q_pos, mask, sinks):
    """``attend`` with the kv heads split over the cores.  Every head is computed alone by
    the same operations (a batched matmul is one GEMM per head), so the bits do not depend on
    the split."""
    n_kv_heads = k.shape[1]
    group = q.shape[1] // n_kv_heads
    out = np.empty(q.shape[:2] + v.shape[2:], F32)
    lse = np.empty(q.shape[:2], F32)
    slopes = alibi_slopes(q.shape[1], p.max_bias)

    def heads_part(lo: int, hi: int) -> None:
        heads = slice(lo * group, hi * group)
        out[:, heads], lse[:, heads] = attend(
            q[:, heads], k[:, lo:hi], v[:, lo:hi], p, q_pos, mask,
            None if sinks is None else sinks[heads], slopes[heads])

    work_per_kv_head = q.shape[0] * k.shape[0] * group * q.shape[2]
    parallel.run_split(heads_part, n_kv_heads, calls_blas=True,
                       min_per_part=-(-ATTN_SPLIT_MIN_WORK // max(1, work_per_kv_head)))
    return out, lse


class PagedRows:
    """A sequence's keys (or values) in a paged cache, seen as rows ``[n_kv, Hkv, D]``:
    ``[start:stop]`` gathers just the blocks holding those rows, in float32, and ``[:, lo:hi]``
    narrows the kv heads.  A decode thus reads each key tile once, straight from the cache,
    instead of first copying the whole sequence to float32 (at 32k keys that copy moved the
    cache three times).  The values are the same float32 numbers as a whole-sequence gather's,
    so the same bits result."""

    def __init__(self, cache: np.ndarray, blocks: np.ndarray, n_kv: int,
                 heads: range | None = None) -> None:
        self.cache, self.blocks, self.n_kv = cache, blocks, n_kv
        self.heads = range(cache.shape[2]) if heads is None else heads
        self.shape = (n_kv, len(self.heads), cache.shape[3])

    def __getitem__(self, index):
        if isinstance(index, tuple):  # [:, lo:hi]
            rows, heads = index
            if rows != slice(None):
                raise IndexError("PagedRows takes [start:stop] or [:, heads]")
            return PagedRows(self.cache, self.blocks, self.n_kv, self.heads[heads])
        start, stop, step = index.indices(self.n_kv)
        if step != 1:
            raise IndexError("PagedRows takes contiguous rows")
        size = self.cache.shape[1]
        first, last = start // size, -(-stop // size)
        heads = slice(self.heads.start, self.heads.stop)
        tile = self.cache[self.blocks[first:last], :, heads]  # [blocks, size, heads, D] copy
        tile = tile.reshape((-1,) + tile.shape[2:])[start - first * size : stop - first * size]
        return as_f32(tile)


def _gather_blocks(cache, blocks, n_kv) -> PagedRows:
    """The sequence's keys (or values) [n_kv, Hkv, D] in float32, read a tile at a time."""
    return PagedRows(cache, blocks, n_kv)


def _check_paged_tables(total_q, cache_shape, block_table, seq_lens, q_start) -> None:
    num_blocks, block_size = cache_shape[:2]
    if q_start[0] != 0 or q_start[-1] != total_q or np.any(np.diff(q_start) < 0):
        raise ValueError(
            f"q_start={q_start.tolist()} must rise from 0 to n_q={total_q} (n_seqs + 1 entries)"
        )
    if np.any(seq_lens < 0) or np.any(seq_lens > block_table.shape[1] * block_size):
        raise ValueError(
            f"seq_lens={seq_lens.tolist()} must lie in [0, max_blocks*block_size="
            f"{block_table.shape[1] * block_size}]"
        )
    if np.any(np.diff(q_start) > seq_lens):
        raise ValueError(f"query counts {np.diff(q_start).tolist()} must not exceed "
                         f"seq_lens={seq_lens.tolist()}")
    for s, n_kv in enumerate(seq_lens):
        used = block_table[s, : -(-int(n_kv) // block_size)]
        if np.any((used < 0) | (used >= num_blocks)):
            raise ValueError(
                f"block_table[{s}] holds {used.tolist()}: used entries must lie in "
                f"[0, num_blocks={num_blocks})"
            )


def attend(q, k, v, p: AttnParams, q_pos, mask, sinks, slopes=None):
    """Attention of one sequence -> (out [n_q, H, Dv], lse [n_q, H]).  With causal or window
    masking, queries go in blocks: an early block of a prefill skips the keys after it."""
    if slopes is None:
        slopes = alibi_slopes(q.shape[1], p.max_bias)
    if not (p.causal or p.window > 0) or len(q) <= ATTN_Q_BLOCK:
        return _attend_block(q, k, v, p, q_pos, mask, sinks, slopes)
    parts = [
        _attend_block(q[rows], k, v, p, q_pos[rows], None if mask is None else mask[rows], sinks,
                      slopes)
        for rows in (slice(i, i + ATTN_Q_BLOCK) for i in range(0, len(q), ATTN_Q_BLOCK))
    ]
    return np.concatenate([o for o, _ in parts]), np.concatenate([lse for _, lse in parts])


def _attend_block(q, k, v, p: AttnParams, q_pos, mask, sinks, slopes):
    """Blocked online-softmax attention of a block of queries.

    Query heads are grouped per kv head (GQA) so each tile is one batched matmul
    [Hkv, G*n_q, Dk] x [Hkv, Dk, tile]; rows are ordered (head-in-group, query)."""
    n_q, n_heads, _ = q.shape
    n_kv, n_kv_heads, d_v = v.shape
    group = n_heads // n_kv_heads
    qg = as_f32(q).reshape(n_q, n_kv_heads, group, -1).transpose(1, 2, 0, 3)
    qg = qg.reshape(n_kv_heads, group * n_q, -1)
    state = _SoftmaxState(n_kv_heads, group, n_q, d_v, sinks)
    slopes = slopes.reshape(n_kv_heads, group, 1, 1)  # ALiBi slopes of these heads
    lo, hi = _visible_key_range(p, q_pos, n_kv)
    for start in range(lo, hi, ATTN_TILE):
        keys = np.arange(start, min(hi, start + ATTN_TILE))
        scores = _tile_scores(qg, k, keys, p, q_pos, mask, slopes, group)
        state.update(scores, as_f32(v[keys[0] : keys[-1] + 1]))
    return state.finish()


def _visible_key_range(p: AttnParams, q_pos, n_kv) -> tuple[int, int]:
    """Keys outside [lo, hi) are invisible to every query: skip their tiles."""
    if len(q_pos) == 0:
        return 0, 0
    hi = min(n_kv, int(q_pos.max()) + 1) if p.causal else n_kv
    lo = max(0, int(q_pos.min()) - p.window + 1) if p.window > 0 else 0
    return lo, max(lo, hi)


def _tile_scores(qg, k, keys, p: AttnParams, q_pos, mask, slopes, group):
    n_kv_heads = qg.shape[0]
    kt = as_f32(k[keys[0] : keys[-1] + 1]).transpose(1, 2, 0)  # [Hkv, Dk, tile]
    scores = np.matmul(qg, kt)
    scores *= F32(p.scale)
    if p.softcap > 0.0:
        scores *= F32(1.0 / p.softcap)
        np.tanh(scores, out=scores)
        scores *= F32(p.softcap)
    s4 = scores.reshape(n_kv_heads, group, len(q_pos), len(keys))
    rel = keys[None, :] - q_pos[:, None]  # k_pos - q_pos [n_q, tile]
    bias = _static_bias(rel, p, None if mask is None else mask[:, keys[0] : keys[-1] + 1])
    if bias is not None:
        s4 += bias
    if p.max_bias > 0.0:
        s4 += slopes * rel.astype(F32)
    return scores


def _static_bias(rel, p: AttnParams, mask_tile):
    """mask + (-inf where causal/window hides the key), shared by every head; None if empty."""
    hidden = np.zeros(rel.shape, bool)
    if p.causal:
        hidden |= rel > 0
    if p.window > 0:
        hidden |= -rel >= p.window
    if mask_tile is None and not hidden.any():
        return None
    bias = np.zeros(rel.shape, F32) if mask_tile is None else as_f32(mask_tile).copy()
    bias[hidden] = -np.inf
    return bias


class _SoftmaxState:
    """Running max m, denominator l and unnormalized output acc per (kv head, row).

    A sink is one extra logit with no value: starting from m = sink, l = 1 puts it in the
    denominator exactly once."""

    def __init__(self, n_kv_heads, group, n_q, d_v, sinks) -> None:
        self.shape = (n_kv_heads, group, n_q)
        rows = (n_kv_heads, group * n_q)
        self.acc = np.zeros(rows + (d_v,), F32)
        if sinks is None:
            self.m = np.full(rows, -np.inf, F32)
            self.l = np.zeros(rows, F32)
        else:
            sink = as_f32(sinks).reshape(n_kv_heads, group, 1)
            self.m = np.repeat(sink, n_q, axis=2).reshape(rows).copy()
            self.l = np.ones(rows, F32)

    def update(self, scores, v_tile) -> None:
        m_new = np.maximum(self.m, scores.max(axis=-1))
        m_safe = np.where(np.isneginf(m_new), F32(0), m_new)  # all-hidden rows: exp(-inf) = 0
        alpha = np.exp(self.m - m_safe)
        scores -= m_safe[..., None]
        np.exp(scores, out=scores)
        self.l = self.l * alpha + scores.sum(axis=-1)
        self.acc *= alpha[..., None]
        self.acc += np.matmul(scores, v_tile.transpose(1, 0, 2))
        self.m = m_new

    def finish(self):
        seen = self.l > 0
        with np.errstate(divide="ignore"):
            out = self.acc / np.where(seen, self.l, F32(1))[..., None]
            lse = np.where(seen, self.m + np.log(np.where(seen, self.l, F32(1))), -np.inf)
        n_kv_heads, group, n_q = self.shape
        out = out.reshape(n_kv_heads, group, n_q, -1).transpose(2, 0, 1, 3)
        lse = lse.reshape(n_kv_heads, group, n_q).transpose(2, 0, 1)
        return out.reshape(n_q, n_kv_heads * group, -1), lse.reshape(n_q, -1).astype(F32)


# -- KV_ROTATE -------------------------------------------------------------------------------
def kv_rotate(key_cache, block_indices, deltas, lut, layout: str) -> None:
    """Re-rotate whole blocks in place: gather them in float32, rotate by LUT rows, store."""
    num_blocks, block_size, _, d = key_cache.shape
    _check_rotate_indices(block_indices, deltas, num_blocks, len(lut))
    if jit.handles(key_cache) and lut.dtype == F32 and key_cache.flags.c_contiguous:
        jit.kv_rotate(key_cache, block_indices, deltas.reshape(len(block_indices), -1),
                      np.ascontiguousarray(lut), layout != "rotate_half")
        return
    rows = np.broadcast_to(deltas, (len(block_indices), block_size))
    cos = lut[rows, None, : d // 2]  # [R, B, 1, D/2]
    sin = lut[rows, None, d // 2 :]
    keys = as_f32(key_cache[block_indices])
    rotated = np.empty(keys.shape, F32)
    if layout == "rotate_half":
        a, b, out_a, out_b = keys[..., : d // 2], keys[..., d // 2 :], rotated[..., : d // 2], \
            rotated[..., d // 2 :]
    else:
        a, b, out_a, out_b = keys[..., 0::2], keys[..., 1::2], rotated[..., 0::2], \
            rotated[..., 1::2]
    rotate_pairs(a, b, cos, sin, out_a, out_b)
    key_cache[block_indices] = rotated


def _check_rotate_indices(block_indices, deltas, num_blocks, lut_rows) -> None:
    if np.any((block_indices < 0) | (block_indices >= num_blocks)):
        raise ValueError(
            f"block_indices={block_indices.tolist()} must lie in [0, num_blocks={num_blocks})"
        )
    if len(np.unique(block_indices)) != len(block_indices):
        raise ValueError(f"block_indices={block_indices.tolist()} must not repeat a block")
    if np.any((deltas < 0) | (deltas >= lut_rows)):
        raise ValueError(f"deltas must lie in [0, lut rows={lut_rows}); got min "
                         f"{deltas.min()} max {deltas.max()}")


# -- SET_ROWS / GET_ROWS / CPY -----------------------------------------------------------------
def set_rows(dst, src, slots) -> None:
    if np.any((slots < -1) | (slots >= len(dst))):
        raise ValueError(f"slots must lie in [-1, {len(dst)}); got {slots.tolist()[:16]}")
    keep = slots >= 0
    if len(np.unique(slots[keep])) != int(keep.sum()):
        # two rows racing for one slot have no defined result in a parallel kernel
        raise ValueError(f"slots must be distinct apart from -1; got {slots.tolist()[:16]}")
    if jit.handles(dst, src) and dst.flags.c_contiguous:
        jit.scatter_rows(dst, np.ascontiguousarray(src), slots)
    else:
        dst[slots[keep]] = convert(src[keep], dst.dtype)


def get_rows(src, rows, out) -> None:
    if np.any((rows < 0) | (rows >= len(src))):
        raise ValueError(f"rows must lie in [0, {len(src)}); got {rows.tolist()[:16]}")
    if jit.handles(src, out) and out.flags.c_contiguous:
        jit.gather_rows(np.ascontiguousarray(src), rows, out)
    else:
        out[...] = convert(src[rows], out.dtype)


def cpy(src, out, perm, step: int, use_jit: bool = True) -> None:
    view = src.transpose(perm)[::step]
    if use_jit and _rows_in_source_order(src, out, perm, view):
        jit.copy_permuted_rows(src, out, perm, step)
        return
    if use_jit and view.flags.c_contiguous and _numba_copies(view, out):
        jit.convert(view, out)  # split over the cores in claimed chunks (``jit.convert``)
        return
    if out.nbytes < PARALLEL_COPY_BYTES or out.ndim == 0:
        _cpy_rows(view, out, use_jit)
        return
    # NumPy's copies and the numba loops release the GIL: large copies use every core, as
    # ggml does; parts are rows of out, so the bits do not depend on the split
    parallel.run_split(lambda lo, hi: _cpy_rows(view[lo:hi], out[lo:hi], use_jit), len(out))


PARALLEL_COPY_BYTES = 1 << 20  # below this a second thread's wake-up costs more than it saves


def _rows_in_source_order(src, out, perm, view) -> bool:
    """A permuted copy that keeps the last axis last, between contiguous arrays: the numba
    loop reads the source row by row in its own order.  NumPy's copy follows out's order and
    reads the source's rows a page apart ([4096, 8, 128] f32, perm [1, 0, 2]: 4.7 ms on two
    threads against 2.1 ms on one)."""
    return (out.ndim >= 2 and out.size > 0 and not view.flags.c_contiguous
            and perm[-1] == out.ndim - 1 and src.flags.c_contiguous and out.flags.c_contiguous
            and jit.handles(src, out))


def _cpy_rows(view, out, use_jit: bool) -> None:
    if use_jit and _numba_copies(view, out):
        jit.convert(np.ascontiguousarray(view), out)
    elif view.dtype == out.dtype or view.dtype == F32:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to +-inf: correct
            np.copyto(out, view, casting="unsafe")  # f32 -> f16/bf16 rounds to nearest even
        if view.dtype != out.dtype:
            quiet_nans(out)
    else:
        out[...] = convert(view, out.dtype)


def _numba_copies(view, out) -> bool:
    """Conversions (NumPy's f16 casts: ~1 GB/s) and same-type copies between contiguous
    arrays take the numba loop.  Same type, split over two threads, interleaved medians:
    [4096, 8, 128] f32 NumPy's copy (glibc memcpy) 1.7-2.4 ms, the numba loop 1.5-2.0, torch's
    copy_ 1.6-1.9; [16384, 8, 128] 10.0-10.5, 8.9-9.8, 9.2-9.9."""
    if not (out.flags.c_contiguous and jit.handles(view, out)):
        return False
    return view.dtype != out.dtype or view.flags.c_contiguous


def convert(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round once to dtype: f16 <-> bf16 goes through f32, which holds both exactly."""
    if values.dtype == dtype:
        return values
    if values.dtype != F32 and dtype != F32:
        values = values.astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to +-inf rounds correctly
        return quiet_nans(values.astype(dtype))


_QUIET_BIT = {np.dtype(np.float16): 0x0200, numpy_dtype("bf16"): 0x0040, np.dtype(F32): 1 << 22}


def quiet_nans(converted: np.ndarray) -> np.ndarray:
    """Set the quiet bit of every NaN, in place (README "The NaN rule": a conversion never
    gives a signalling NaN; NumPy's f16 and f32 casts keep signalling NaNs signalling)."""
    nan = np.isnan(converted)
    if nan.any():
        raw = converted.view(np.uint16 if converted.itemsize == 2 else np.uint32)
        raw[nan] |= _QUIET_BIT[converted.dtype]
    return converted
