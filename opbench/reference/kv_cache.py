"""KV-cache eviction and key re-rotation oracles, OpenVINO GenAI conventions.

Eviction follows OpenVINO GenAI's ``CacheEvictionAlgorithm`` (continuous batching, cache
eviction): the logical cache is split into a *start* area (``start_size`` tokens, never evicted),
an *evictable* middle and a *recent* area (``recent_size`` tokens, never evicted); once the cache
holds at least one whole block past ``max_cache_size`` tokens, the lowest-scoring middle blocks
are evicted so that ``max_cache_size - start_size - recent_size`` tokens of the middle stay.
Kept blocks move towards the front, so their keys — RoPE-rotated at their old positions — must be
re-rotated back by the number of tokens evicted before them (``CacheRotationCalculator``).

The trig LUT is OpenVINO's: row i holds cos(i*B*w_j) for j < D/2, then -sin(i*B*w_j) (negated:
rotation by the inverse angle), w_j = base^(-2j/D); a delta of d tokens is LUT row d/B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AGGREGATIONS = ("SUM", "NORM_SUM")
LAYOUTS = ("rotate_half", "interleaved")


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int")


def rotation_lut(n_rows: int, head_dim: int, block_size: int, base: float, *, dtype=np.float32):
    """Trig LUT ``[n_rows, head_dim]``: row i = [cos(i*B*w_j) for j < D/2] + [-sin(i*B*w_j)].

    w_j = base^(-2j/D) (RoFormer frequencies, as OpenVINO GenAI's ``CacheRotationCalculator``).
    Computed in float64 and returned as ``dtype`` — float32 is the stored LUT backends read;
    float64 gives the exact LUT-equivalent used to check rotations to 1e-12.
    """
    for name, value in (("n_rows", n_rows), ("head_dim", head_dim), ("block_size", block_size)):
        _check_positive_int(value, name)
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even")
    if not np.isfinite(base) or base <= 0:
        raise ValueError(f"base={base!r} must be finite and > 0")
    omega = float(base) ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    angles = (np.arange(n_rows, dtype=np.float64) * block_size)[:, None] * omega[None, :]
    return np.concatenate([np.cos(angles), -np.sin(angles)], axis=1).astype(dtype)


def _pair_views(x: np.ndarray, layout: str):
    """The (a, b) halves of every rotated pair: rotate_half (j, j+D/2) or interleaved (2j, 2j+1)."""
    half = x.shape[-1] // 2
    if layout == "rotate_half":
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def rotate_keys(key_cache, block_indices, deltas, lut, *, layout, dtype=np.float64):
    """Re-rotate cached keys after eviction: the oracle of the in-place KV_ROTATE op.

    key_cache ``[num_blocks, B, Hkv, D]``; block_indices int ``[R]`` (distinct); deltas int
    ``[R, 1]`` (one LUT row per block, broadcast over its tokens) or ``[R, B]`` (per token), in
    LUT rows; lut ``[rows, D]`` as ``rotation_lut``.  Each pair (a, b) of token t in block r
    becomes (a*c - b*s, b*c + a*s) with c = lut[d, j], s = lut[d, D/2 + j], d = deltas[r, t].
    Returns a new array in ``dtype``; blocks not listed are unchanged.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    cache = np.asarray(key_cache)
    if cache.ndim != 4 or cache.shape[-1] % 2:
        raise ValueError(f"key_cache shape {cache.shape} must be [num_blocks, B, Hkv, D], D even")
    num_blocks, block_size, _, head_dim = cache.shape
    blocks = _check_block_indices(block_indices, num_blocks)
    deltas = np.asarray(deltas)
    allowed_shapes = ((len(blocks), 1), (len(blocks), block_size))
    if deltas.dtype.kind not in "iu" or deltas.shape not in allowed_shapes:
        raise ValueError(f"deltas must be int [R, 1] or [R, B] = [{len(blocks)}, {block_size}], "
                         f"got {deltas.dtype} {deltas.shape}")
    lut = np.asarray(lut)
    if lut.ndim != 2 or lut.shape[1] != head_dim:
        raise ValueError(f"lut shape {lut.shape} must be [rows, head_dim={head_dim}]")
    if ((deltas < 0) | (deltas >= lut.shape[0])).any():
        raise ValueError(
            f"deltas must lie in [0, lut rows={lut.shape[0]}), got {deltas.tolist()}"
        )
    rows = lut.astype(dtype)[deltas]  # [R, B or 1, D]
    cos = rows[..., None, : head_dim // 2]  # broadcast over kv heads
    sin = rows[..., None, head_dim // 2 :]
    out = cache.astype(dtype, copy=True)
    a, b = _pair_views(out[blocks], layout)
    rotated = np.empty((len(blocks),) + cache.shape[1:], dtype=dtype)
    new_a, new_b = _pair_views(rotated, layout)
    new_a[...] = a * cos - b * sin
    new_b[...] = b * cos + a * sin
    out[blocks] = rotated
    return out


def _check_block_indices(block_indices, num_blocks: int) -> np.ndarray:
    blocks = np.asarray(block_indices)
    if blocks.ndim != 1 or blocks.dtype.kind not in "iu":
        raise ValueError(
            f"block_indices must be a 1-D int array, got {blocks.dtype} {blocks.shape}"
        )
    if ((blocks < 0) | (blocks >= num_blocks)).any():
        raise ValueError(f"block_indices={blocks.tolist()} must lie in [0, {num_blocks})")
    if len(np.unique(blocks)) != len(blocks):
        # an in-place kernel would rotate a repeated block twice (or race): never meaningful
        raise ValueError(f"block_indices={blocks.tolist()} must be distinct")
    return blocks


def block_scores(token_scores, *, block_size, aggregation="SUM", token_counts=None):
    """Per-block importance ``[ceil(n/B)]`` from accumulated per-token attention scores ``[n]``.

    SUM: sum of the block's token scores.  NORM_SUM (OpenVINO GenAI): each token's accumulated
    score is first divided by its lifetime, the number of generation steps (scored queries) it has
    been in the cache.  token_counts gives those lifetimes; None means OpenVINO's default for a
    prompt, "as if the tokens were added one by one": token t of n has lifetime n - t.  A partial
    last block sums the tokens it has.
    """
    _check_positive_int(block_size, "block_size")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} must be one of {AGGREGATIONS}")
    scores = np.asarray(token_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"token_scores must be 1-D [n_tokens], got shape {scores.shape}")
    n_tokens = len(scores)
    if aggregation == "NORM_SUM":
        scores = scores / _lifetimes(token_counts, n_tokens)
    elif token_counts is not None:
        raise ValueError("token_counts is only used with aggregation='NORM_SUM' (must be None)")
    n_blocks = -(-n_tokens // block_size)
    padded = np.zeros(n_blocks * block_size)
    padded[:n_tokens] = scores
    return padded.reshape(n_blocks, block_size).sum(axis=1)


def _lifetimes(token_counts, n_tokens: int) -> np.ndarray:
    if token_counts is None:
        return np.arange(n_tokens, 0, -1, dtype=np.float64)
    counts = np.asarray(token_counts)
    if counts.shape != (n_tokens,) or (counts <= 0).any():
        raise ValueError(f"token_counts must be [{n_tokens}] and all > 0, got shape {counts.shape}")
    return counts.astype(np.float64)


@dataclass(frozen=True)
class EvictionPlan:
    """What ``evict`` decides, in logical block indices before eviction (sorted, int64).

    deltas[i] is the re-rotation of kept_blocks[i] in tokens: evicted blocks before it times B.
    """

    kept_blocks: np.ndarray
    evicted_blocks: np.ndarray
    deltas: np.ndarray


def evict(
    token_scores,
    *,
    start_size,
    recent_size,
    max_cache_size,
    block_size,
    aggregation="SUM",
    token_counts=None,
) -> EvictionPlan:
    """OpenVINO GenAI ``CacheEvictionAlgorithm`` for one sequence and layer.

    Sizes are in tokens and multiples of B; start_size + recent_size < max_cache_size.  With n
    tokens, nothing is evicted until n >= max_cache_size + B (a whole block past the maximum,
    OpenVINO's ``max_cache_size + block_size - 1`` threshold).  The evictable blocks are
    [start_size/B, n//B - recent_size/B) (a partial last block belongs to the recent area);
    of them, (count - (max_cache_size - start_size - recent_size)/B) blocks with the lowest
    ``block_scores`` go, ties to the lower index.
    """
    _check_sizes(start_size, recent_size, max_cache_size, block_size)
    scores = block_scores(token_scores, block_size=block_size, aggregation=aggregation,
                          token_counts=token_counts)
    n_tokens = len(np.asarray(token_scores))
    n_blocks = len(scores)
    evicted = np.empty(0, dtype=np.int64)
    # OpenVINO's explicit threshold; the count below also gives 0 under it (stated for clarity)
    if n_tokens >= max_cache_size + block_size:
        first = start_size // block_size
        end = n_tokens // block_size - recent_size // block_size
        keep_middle = (max_cache_size - start_size - recent_size) // block_size
        n_evict = max(0, (end - first) - keep_middle)
        order = np.argsort(scores[first:end], kind="stable")  # stable: ties -> lower index
        evicted = np.sort(order[:n_evict]).astype(np.int64) + first
    kept = np.setdiff1d(np.arange(n_blocks, dtype=np.int64), evicted)
    deltas = np.searchsorted(evicted, kept) * block_size  # evicted blocks before each kept one
    return EvictionPlan(kept_blocks=kept, evicted_blocks=evicted, deltas=deltas.astype(np.int64))


def _check_sizes(start_size, recent_size, max_cache_size, block_size) -> None:
    _check_positive_int(block_size, "block_size")
    sizes = (("start_size", start_size), ("recent_size", recent_size),
             ("max_cache_size", max_cache_size))
    for name, value in sizes:
        if not isinstance(value, (int, np.integer)) or value < 0 or value % block_size:
            raise ValueError(f"{name}={value!r} must be an int >= 0 and a multiple of "
                             f"block_size={block_size}")
    if start_size + recent_size >= max_cache_size:
        raise ValueError(f"max_cache_size={max_cache_size} must exceed start_size + recent_size = "
                         f"{start_size + recent_size}")
