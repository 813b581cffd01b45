"""Attention oracles: softmax(scale*QK^T + bias) V in float64, contiguous and paged.

Conventions: shapes are token-major, q ``[n_q, H, Dk]``, k ``[n_kv, Hkv, Dk]``, v
``[n_kv, Hkv, Dv]``.  GQA follows ggml / Hugging Face: query head h reads kv head
``h // (H // Hkv)``.  Score order follows the backend protocol (``opbench.protocol``):
``s = scale*q.k``, softcap ``c*tanh(s/c)``, ``+ mask``, ``+ slope_h*(k_pos - q_pos)`` (ALiBi,
ggml slopes), then causal / sliding-window masking to -inf.  Attention sinks (gpt-oss style)
add one logit per head to the softmax denominator and contribute no value.

The work is vectorized per kv head: the G = H // Hkv query heads that share a kv head are
stacked into one ``[n_q*G, Dk]`` matrix, so the two matrix products (QK^T and PV) are single
GEMMs and dominate the time.
"""

from __future__ import annotations

import numpy as np

_INT_KINDS = "iu"


def alibi_slopes(n_heads: int, max_bias: float) -> np.ndarray:
    """ALiBi slopes, ggml convention (``ggml_soft_max_ext`` with max_bias).

    n_head_log2 = 2^floor(log2 H); m0 = 2^(-max_bias/n_head_log2);
    m1 = 2^(-(max_bias/2)/n_head_log2); slope_h = m0^(h+1) for h < n_head_log2, else
    m1^(2(h-n_head_log2)+1).  Returns float64 ``[n_heads]``.
    """
    if not isinstance(n_heads, (int, np.integer)) or n_heads <= 0:
        raise ValueError(f"n_heads={n_heads!r} must be a positive int")
    if not np.isfinite(max_bias) or max_bias < 0:
        raise ValueError(f"max_bias={max_bias!r} must be finite and >= 0")
    n_head_log2 = 2 ** int(np.floor(np.log2(n_heads)))
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    h = np.arange(n_heads, dtype=np.float64)
    return np.where(h < n_head_log2, m0 ** (h + 1), m1 ** (2 * (h - n_head_log2) + 1))


def _check_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim != 3:
            raise ValueError(f"{name} must be 3-D [tokens, heads, dim], got shape {arr.shape}")
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim={q.shape[2]} must equal k head_dim={k.shape[2]}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"k shape {k.shape[:2]} and v shape {v.shape[:2]} must agree in [n_kv, Hkv]"
        )
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ValueError(f"H={n_heads} must be a multiple of Hkv={n_kv_heads} (GQA)")


def _check_options(scale, window, softcap, max_bias) -> None:
    if scale is not None and not np.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite float or None")
    if not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window={window!r} must be an int >= 0 (0: no sliding window)")
    if not np.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap={softcap!r} must be finite and >= 0 (0: off)")
    if not np.isfinite(max_bias) or max_bias < 0:
        raise ValueError(f"max_bias={max_bias!r} must be finite and >= 0 (0: no ALiBi)")


def _positions(pos, n: int, default_start: int, name: str) -> np.ndarray:
    """Explicit int positions ``[n]``, or default_start + arange(n)."""
    if pos is None:
        return default_start + np.arange(n, dtype=np.int64)
    pos = np.asarray(pos)
    if pos.dtype.kind not in _INT_KINDS or pos.shape != (n,):
        raise ValueError(
            f"{name} must be an int array of shape ({n},), got {pos.dtype} {pos.shape}"
        )
    return pos.astype(np.int64)


def _static_bias(q_pos, k_pos, *, causal, window, mask, dtype) -> np.ndarray | None:
    """The head-independent additive term ``[n_q, n_kv]``: mask, plus -inf where not visible."""
    rel = q_pos[:, None] - k_pos[None, :]  # how far in the past key j is for query i
    hidden = np.zeros(rel.shape, dtype=bool)
    if causal:
        hidden |= rel < 0
    if window > 0:
        hidden |= rel >= window
    if mask is None and not hidden.any():
        return None
    bias = np.zeros(rel.shape, dtype=dtype) if mask is None else mask.astype(dtype, copy=True)
    bias[hidden] = -np.inf
    return bias


def attention(
    q,
    k,
    v,
    *,
    scale=None,
    causal=False,
    window=0,
    mask=None,
    softcap=0.0,
    max_bias=0.0,
    sinks=None,
    q_pos=None,
    k_pos=None,
    return_lse=False,
    dtype=np.float64,
):
    """Scaled dot-product attention, ``out[i, h] = sum_j softmax_j(l[i, h, :]) v[j, h // G]``.

    Logits: l = scale*q.k (scale None: 1/sqrt(Dk)); softcap c*tanh(l/c) if c > 0; + mask[i, j];
    + slope_h*(k_pos[j] - q_pos[i]) if max_bias > 0 (ggml slopes); -inf where causal and
    k_pos > q_pos, or where window > 0 and q_pos - k_pos >= window.  Positions default to
    q_pos = n_kv - n_q + i, k_pos = j (the new tokens are the last n_q of the sequence).
    sinks ``[H]``: denominator = sum_j exp(l_ij) + exp(sink_h).  lse = log(denominator).
    A row with nothing visible and no sink gives out 0 and lse -inf.

    Returns out ``[n_q, H, Dv]`` in ``dtype``, or ``(out, lse [n_q, H])`` if return_lse.
    """
    q, k, v = (np.asarray(a) for a in (q, k, v))
    _check_qkv(q, k, v)
    _check_options(scale, window, softcap, max_bias)
    # one contiguous conversion each; the per-head strided views below go to BLAS as they are
    q, k, v = (a.astype(dtype, copy=False) for a in (q, k, v))
    n_q, n_heads, head_dim = q.shape
    n_kv, n_kv_heads = k.shape[:2]
    qp = _positions(q_pos, n_q, n_kv - n_q, "q_pos")
    kp = _positions(k_pos, n_kv, 0, "k_pos")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (n_q, n_kv):
            raise ValueError(f"mask shape {mask.shape} must be (n_q, n_kv) = {(n_q, n_kv)}")
    sink_logits = _sink_logits(sinks, n_heads, dtype)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    bias = _static_bias(qp, kp, causal=causal, window=window, mask=mask, dtype=dtype)
    slopes = alibi_slopes(n_heads, max_bias).astype(dtype) if max_bias > 0 else None
    rel_k = (kp[None, :] - qp[:, None]).astype(dtype) if slopes is not None else None

    group = n_heads // n_kv_heads
    out = np.empty((n_q, n_heads, v.shape[2]), dtype=dtype)
    lse = np.empty((n_q, n_heads), dtype=dtype)
    for kvh in range(n_kv_heads):
        heads = slice(kvh * group, (kvh + 1) * group)
        logits = _group_logits(q[:, heads], k[:, kvh], scale, softcap)  # [n_q, G, n_kv]
        if bias is not None:
            logits += bias[:, None, :]
        if slopes is not None:
            logits += slopes[heads][None, :, None] * rel_k[:, None, :]
        sinks_g = None if sink_logits is None else sink_logits[heads]
        out[:, heads], lse[:, heads] = _softmax_pv(logits, v[:, kvh], sinks_g)
    return (out, lse) if return_lse else out


def _sink_logits(sinks, n_heads: int, dtype) -> np.ndarray | None:
    if sinks is None:
        return None
    sinks = np.asarray(sinks)
    if sinks.shape != (n_heads,):
        raise ValueError(f"sinks shape {sinks.shape} must be (H,) = ({n_heads},)")
    return sinks.astype(dtype)


def _group_logits(q_group, k_head, scale, softcap) -> np.ndarray:
    """scale*q.k, then softcap, for the G query heads of one kv head: ``[n_q, G, n_kv]``."""
    n_q, group, head_dim = q_group.shape
    q_mat = q_group.reshape(n_q * group, head_dim)
    logits = q_mat @ k_head.T
    logits *= scale
    if softcap > 0:
        logits /= softcap
        np.tanh(logits, out=logits)
        logits *= softcap
    return logits.reshape(n_q, group, k_head.shape[0])


def _softmax_pv(logits, v_head, sinks_g):
    """softmax over the last axis (sinks in the denominator) times V: ``([n_q, G, Dv], [n_q, G])``.

    Works in place on ``logits``.  The row max is shifted to 0 where a row has nothing visible so
    exp stays 0 there (out 0, lse -inf) instead of NaN."""
    n_q, group, n_kv = logits.shape
    row_max = logits.max(axis=-1) if n_kv else np.full((n_q, group), -np.inf, logits.dtype)
    if sinks_g is not None:
        row_max = np.maximum(row_max, sinks_g[None, :])
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    logits -= row_max[..., None]
    np.exp(logits, out=logits)
    denom = logits.sum(axis=-1)
    if sinks_g is not None:
        denom += np.exp(sinks_g[None, :] - row_max)
    weighted = (logits.reshape(n_q * group, n_kv) @ v_head).reshape(n_q, group, v_head.shape[1])
    empty = denom == 0
    safe_denom = np.where(empty, 1.0, denom)
    out = weighted / safe_denom[..., None]
    with np.errstate(divide="ignore"):
        lse = row_max + np.log(denom)
    return out, lse


def paged_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    q_lens,
    *,
    scale=None,
    causal=False,
    window=0,
    mask=None,
    softcap=0.0,
    max_bias=0.0,
    sinks=None,
    return_lse=False,
    dtype=np.float64,
):
    """Attention over a paged KV cache (vLLM / OpenVINO PagedAttention layout), several sequences.

    q ``[sum(q_lens), H, Dk]`` packs the queries of every sequence in order; caches are
    ``[num_blocks, B, Hkv, D]``.  Sequence s has seq_lens[s] keys; key t lives at cache slot
    ``block_table[s, t // B]*B + t % B``; its local query i sits at position
    ``seq_lens[s] - q_lens[s] + i`` (so q_lens[s] <= seq_lens[s]).  Each sequence is then exactly
    ``attention`` of its queries over its gathered keys.  ``mask`` is not supported (ValueError).
    Table entries past a sequence's last block are never read (may hold -1).
    """
    if mask is not None:
        raise ValueError("mask is not supported by paged_attention (must be None)")
    q, k_cache, v_cache = (np.asarray(a) for a in (q, k_cache, v_cache))
    table, seq_lens, q_lens = _check_paged(q, k_cache, v_cache, block_table, seq_lens, q_lens)
    options = dict(scale=scale, causal=causal, window=window, softcap=softcap,
                   max_bias=max_bias, sinks=sinks, return_lse=True, dtype=dtype)
    outs, lses = [], []
    q_start = np.concatenate([[0], np.cumsum(q_lens)])
    for s in range(len(seq_lens)):
        k_seq = _gather_blocks(k_cache, table[s], int(seq_lens[s]))
        v_seq = _gather_blocks(v_cache, table[s], int(seq_lens[s]))
        out, lse = attention(q[q_start[s] : q_start[s + 1]], k_seq, v_seq, **options)
        outs.append(out)
        lses.append(lse)
    if not outs:  # no sequences
        outs = [np.empty((0, q.shape[1], v_cache.shape[3]))]
        lses = [np.empty((0, q.shape[1]))]
    out = np.concatenate(outs, axis=0)
    lse = np.concatenate(lses, axis=0)
    return (out.astype(dtype), lse.astype(dtype)) if return_lse else out.astype(dtype)


def _gather_blocks(cache: np.ndarray, table_row: np.ndarray, n_tokens: int) -> np.ndarray:
    """The first n_tokens token rows of one sequence, ``[n_tokens, Hkv, D]``, in logical order."""
    block_size = cache.shape[1]
    n_blocks = -(-n_tokens // block_size)
    rows = cache[table_row[:n_blocks]].reshape((-1,) + cache.shape[2:])
    return rows[:n_tokens]


def _check_paged(q, k_cache, v_cache, block_table, seq_lens, q_lens):
    if k_cache.ndim != 4 or v_cache.ndim != 4 or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(
            f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must be 4-D "
            "[num_blocks, block_size, Hkv, D] with equal first three dims")
    table = np.asarray(block_table)
    seq_lens, q_lens = np.asarray(seq_lens), np.asarray(q_lens)
    if table.ndim != 2 or table.dtype.kind not in _INT_KINDS:
        raise ValueError(
            f"block_table must be a 2-D int array [n_seqs, max_blocks], got {table.shape}"
        )
    n_seqs = table.shape[0]
    for name, arr in (("seq_lens", seq_lens), ("q_lens", q_lens)):
        if arr.shape != (n_seqs,) or arr.dtype.kind not in _INT_KINDS:
            raise ValueError(f"{name} must be an int array of shape ({n_seqs},), got {arr.shape}")
    num_blocks, block_size = k_cache.shape[:2]
    if (seq_lens < 0).any() or (seq_lens > table.shape[1] * block_size).any():
        raise ValueError(f"seq_lens={seq_lens.tolist()} must lie in [0, max_blocks*block_size="
                         f"{table.shape[1] * block_size}]")
    if (q_lens < 0).any() or (q_lens > seq_lens).any():
        raise ValueError(f"q_lens={q_lens.tolist()} must lie in [0, seq_lens[s]]")
    if q.ndim != 3 or q.shape[0] != q_lens.sum():
        raise ValueError(f"q shape {q.shape} must be [sum(q_lens)={q_lens.sum()}, H, Dk]")
    for s in range(n_seqs):
        used = table[s, : -(-int(seq_lens[s]) // block_size)]
        if ((used < 0) | (used >= num_blocks)).any():
            raise ValueError(
                f"block_table[{s}] uses blocks {used.tolist()}, allowed 0..{num_blocks - 1}"
            )
    return table, seq_lens, q_lens


def merge_partials(outs, lses, sinks=None, *, dtype=np.float64):
    """Online-softmax merge of attention over disjoint KV ranges (FlashAttention / ring attention).

    Each part p was computed *without* sinks, with out_p ``[n_q, H, Dv]`` and lse_p ``[n_q, H]``.
    M = max(max_p lse_p, sink); w_p = exp(lse_p - M); D = sum_p w_p + exp(sink - M);
    out = sum_p w_p out_p / D; lse = M + log D.  Parts with lse -inf contribute nothing (their
    out is ignored, even if NaN); if nothing contributes, out 0 and lse -inf.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"outs and lses must be equally long and non-empty, got {len(outs)}, {len(lses)}"
        )
    outs = np.stack([np.asarray(o, dtype=dtype) for o in outs])
    lses = np.stack([np.asarray(x, dtype=dtype) for x in lses])
    if outs.ndim != 4 or lses.shape != outs.shape[:3]:
        raise ValueError(
            f"each out must be [n_q, H, Dv] and each lse [n_q, H], "
            f"got {outs.shape[1:]} and {lses.shape[1:]}"
        )
    total_max = lses.max(axis=0)
    sink = None
    if sinks is not None:
        sink = np.asarray(sinks, dtype=dtype)
        if sink.shape != (lses.shape[2],):
            raise ValueError(f"sinks shape {sink.shape} must be (H,) = ({lses.shape[2]},)")
        total_max = np.maximum(total_max, sink[None, :])
    total_max = np.where(np.isfinite(total_max), total_max, 0.0)
    weights = np.exp(lses - total_max)  # [P, n_q, H]; 0 for parts that saw nothing
    denom = weights.sum(axis=0) + (0.0 if sink is None else np.exp(sink[None, :] - total_max))
    contrib = np.where(weights[..., None] > 0, weights[..., None] * outs, 0.0).sum(axis=0)
    out = contrib / np.where(denom == 0, 1.0, denom)[..., None]
    with np.errstate(divide="ignore"):
        lse = total_max + np.log(denom)
    return out, lse
