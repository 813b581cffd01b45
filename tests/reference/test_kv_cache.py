"""Properties of the KV-cache oracles: LUT, key re-rotation, OpenVINO GenAI eviction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opbench.reference.kv_cache import (
    EvictionPlan,
    block_scores,
    evict,
    rotate_keys,
    rotation_lut,
)

LAYOUTS = ["rotate_half", "interleaved"]


def rope_at(keys, positions, *, base, layout):
    """RoPE written independently: pair j of a token at position p turns by p * base^(-2j/D).

    keys ``[..., D]``; positions broadcast against keys[..., 0]."""
    head_dim = keys.shape[-1]
    omega = base ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    theta = np.asarray(positions, dtype=np.float64)[..., None] * omega
    cos, sin = np.cos(theta), np.sin(theta)
    if layout == "rotate_half":
        idx_a = np.arange(head_dim // 2)
        idx_b = idx_a + head_dim // 2
    else:
        idx_a = np.arange(0, head_dim, 2)
        idx_b = idx_a + 1
    a, b = keys[..., idx_a], keys[..., idx_b]
    out = np.empty_like(keys)
    out[..., idx_a] = a * cos - b * sin
    out[..., idx_b] = b * cos + a * sin
    return out


def test_lut_rows_by_formula():
    lut = rotation_lut(5, 8, 4, 10000.0)
    assert lut.dtype == np.float32 and lut.shape == (5, 8)
    for i in range(5):
        for j in range(4):
            angle = i * 4 * 10000.0 ** (-2 * j / 8)
            assert lut[i, j] == np.float32(math.cos(angle))
            assert lut[i, 4 + j] == np.float32(-math.sin(angle))
    np.testing.assert_array_equal(lut, rotation_lut(5, 8, 4, 10000.0, dtype=np.float64)
                                  .astype(np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rerotation_by_delta_equals_rotation_at_p_minus_delta(layout):
    """Exact check with the float64 LUT-equivalent (same formula, no float32 rounding).

    The stored float32 LUT carries ~6e-8 relative error in each cos/sin, so with it the same
    identity only holds to ~1e-7; that is checked separately below."""
    rng = np.random.default_rng(0)
    block_size, base = 4, 10000.0
    raw = rng.uniform(-1, 1, (6, block_size, 2, 16))
    positions = 100 + np.arange(6 * block_size).reshape(6, block_size)[..., None]  # [6, B, 1]
    cache = rope_at(raw, positions, base=base, layout=layout)
    blocks = np.array([4, 1, 3])
    rows = np.array([[2], [0], [7]])  # per-block LUT rows: deltas of 8, 0, 28 tokens
    lut = rotation_lut(8, 16, block_size, base, dtype=np.float64)
    got = rotate_keys(cache, blocks, rows, lut, layout=layout)
    want = rope_at(raw[blocks], positions[blocks] - rows[..., None] * block_size, base=base,
                   layout=layout)
    np.testing.assert_allclose(got[blocks], want, rtol=0, atol=1e-12)
    untouched = [0, 2, 5]
    np.testing.assert_array_equal(got[untouched], cache[untouched])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_token_deltas_rotate_each_token_by_its_own_row(layout):
    rng = np.random.default_rng(1)
    block_size, base = 4, 500.0
    raw = rng.uniform(-1, 1, (3, block_size, 2, 8))
    positions = 50 + rng.integers(0, 40, (3, block_size))[..., None]
    cache = rope_at(raw, positions, base=base, layout=layout)
    rows = rng.integers(0, 6, (2, block_size))
    lut = rotation_lut(6, 8, block_size, base, dtype=np.float64)
    got = rotate_keys(cache, np.array([2, 0]), rows, lut, layout=layout)
    want = rope_at(raw[[2, 0]], positions[[2, 0]] - rows[..., None] * block_size, base=base,
                   layout=layout)
    np.testing.assert_allclose(got[[2, 0]], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_lut_rerotation_is_accurate_to_float32(layout):
    rng = np.random.default_rng(2)
    raw = rng.uniform(-1, 1, (4, 2, 2, 8))
    positions = 20 + np.arange(8).reshape(4, 2)[..., None]
    cache = rope_at(raw, positions, base=10000.0, layout=layout)
    got = rotate_keys(cache, np.array([3]), np.array([[5]]), rotation_lut(8, 8, 2, 10000.0),
                      layout=layout)
    want = rope_at(raw[3], positions[3] - 10, base=10000.0, layout=layout)
    np.testing.assert_allclose(got[3], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_block_deltas_equal_per_token_deltas_with_row_repeated(layout):
    rng = np.random.default_rng(3)
    cache = rng.uniform(-1, 1, (5, 4, 3, 8)).astype(np.float32)
    lut = rotation_lut(9, 8, 4, 10000.0)
    per_block = np.array([[3], [8], [1]], dtype=np.int32)
    blocks = np.array([0, 4, 2], dtype=np.int32)
    a = rotate_keys(cache, blocks, per_block, lut, layout=layout)
    b = rotate_keys(cache, blocks, np.repeat(per_block, 4, axis=1), lut, layout=layout)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[blocks], cache[blocks])


def test_layouts_differ_by_a_fixed_permutation_of_dims():
    rng = np.random.default_rng(4)
    cache = rng.uniform(-1, 1, (2, 2, 1, 8))
    perm = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # interleaved -> rotate_half order
    lut = rotation_lut(4, 8, 2, 100.0)
    inter = rotate_keys(cache, np.array([1]), np.array([[3]]), lut, layout="interleaved")
    half = rotate_keys(cache[..., perm], np.array([1]), np.array([[3]]), lut,
                       layout="rotate_half")
    np.testing.assert_array_equal(inter[..., perm], half)


def test_published_example_base1_head4_block2():
    """4 blocks of 2 tokens, blocks 1 and 2 evicted: block 3 moves back 4 tokens = LUT row 2."""
    plan = evict([5, 5, 0, 0, 0, 0, 9, 9], start_size=2, recent_size=0, max_cache_size=4,
                 block_size=2)
    np.testing.assert_array_equal(plan.evicted_blocks, [1, 2])
    np.testing.assert_array_equal(plan.kept_blocks, [0, 3])
    np.testing.assert_array_equal(plan.deltas, [0, 4])
    lut = rotation_lut(4, 4, 2, 1.0)
    row = lut[plan.deltas[1] // 2]
    np.testing.assert_allclose(row[:2], [-0.6536, -0.6536], atol=1e-4)  # cos 4
    np.testing.assert_allclose(row[2:], [0.7568, 0.7568], atol=1e-4)  # -sin 4
    np.testing.assert_array_equal(row, np.float32([math.cos(4)] * 2 + [-math.sin(4)] * 2))


# B=2, start 1 block, recent 1 block, max 3 blocks: one middle block survives.
SMALL = dict(start_size=2, recent_size=2, max_cache_size=6, block_size=2)


def test_sum_worked_example_with_tie():
    scores = [9, 9, 1, 2, 0.5, 0.5, 3, 0, 7, 7]  # blocks 18, 3, 1, 3, 14
    np.testing.assert_allclose(block_scores(scores, block_size=2), [18, 3, 1, 3, 14])
    plan = evict(scores, **SMALL)
    # middle = blocks 1..3 scoring 3, 1, 3: block 2 goes, then the tie 1 vs 3 -> lower index 1
    np.testing.assert_array_equal(plan.evicted_blocks, [1, 2])
    np.testing.assert_array_equal(plan.kept_blocks, [0, 3, 4])
    np.testing.assert_array_equal(plan.deltas, [0, 4, 4])


def test_no_eviction_until_a_whole_block_past_max():
    for n_tokens in (3, 6, 7):  # 7 = max + B - 1: the extra block is not full yet
        plan = evict(np.arange(n_tokens, dtype=float), **SMALL)
        assert plan.evicted_blocks.size == 0
        np.testing.assert_array_equal(plan.kept_blocks, np.arange(-(-n_tokens // 2)))
        np.testing.assert_array_equal(plan.deltas, 0)
    plan = evict([1, 1, 5, 5, 4, 4, 0, 0], **SMALL)  # 8 tokens: one block goes
    np.testing.assert_array_equal(plan.evicted_blocks, [2])
    np.testing.assert_array_equal(plan.deltas, [0, 0, 2])


def test_recent_area_and_partial_block_are_never_evicted():
    # 11 tokens: blocks 0..5, block 5 partial; recent = block 4 (last full) + the partial one
    plan = evict([9, 9, 5, 5, 6, 6, 7, 7, 0, 0, 0], **SMALL)
    np.testing.assert_array_equal(plan.evicted_blocks, [1, 2])
    np.testing.assert_array_equal(plan.kept_blocks, [0, 3, 4, 5])
    np.testing.assert_array_equal(plan.deltas, [0, 4, 4, 4])


def test_norm_sum_worked_example_divides_by_lifetime():
    scores = [5, 5, 6, 6, 4, 4, 1, 1]  # default lifetimes 8, 7, ..., 1 (token t lived n - t)
    want = [5 / 8 + 5 / 7, 6 / 6 + 6 / 5, 4 / 4 + 4 / 3, 1 / 2 + 1 / 1]
    np.testing.assert_allclose(block_scores(scores, block_size=2, aggregation="NORM_SUM"), want,
                               rtol=1e-15)
    # SUM: middle blocks 12 vs 8 -> block 2 goes; NORM_SUM: 2.2 vs 2.33 -> block 1 goes
    np.testing.assert_array_equal(evict(scores, **SMALL).evicted_blocks, [2])
    plan = evict(scores, aggregation="NORM_SUM", **SMALL)
    np.testing.assert_array_equal(plan.evicted_blocks, [1])
    np.testing.assert_array_equal(plan.deltas, [0, 2, 2])


def test_norm_sum_with_explicit_lifetimes_and_tie():
    scores = [1, 1, 4, 2, 3, 3, 1, 1]
    counts = [1, 1, 2, 1, 3, 1, 1, 1]  # block 1: 2 + 2 = 4; block 2: 1 + 3 = 4 -> tie
    np.testing.assert_allclose(
        block_scores(scores, block_size=2, aggregation="NORM_SUM", token_counts=counts),
        [2, 4, 4, 2])
    plan = evict(scores, aggregation="NORM_SUM", token_counts=counts, **SMALL)
    np.testing.assert_array_equal(plan.evicted_blocks, [1])  # tie -> the lower index


def naive_evict(scores, start, recent, max_size, block):
    """OpenVINO's rule in plain Python: sort middle blocks by (score, index), drop the first k."""
    n = len(scores)
    n_blocks = -(-n // block)
    sums = [sum(scores[b * block : (b + 1) * block]) for b in range(n_blocks)]
    evicted = []
    if n > max_size + block - 1:
        middle = list(range(start // block, n // block - recent // block))
        k = max(0, len(middle) - (max_size - start - recent) // block)
        evicted = sorted(sorted(middle, key=lambda b: (sums[b], b))[:k])
    kept = [b for b in range(n_blocks) if b not in evicted]
    return evicted, kept, [block * sum(e < b for e in evicted) for b in kept]


@pytest.mark.parametrize("seed", range(12))
def test_evict_matches_naive_rule_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    block = int(rng.choice([1, 2, 4]))
    start, recent = block * int(rng.integers(0, 3)), block * int(rng.integers(0, 3))
    max_size = start + recent + block * int(rng.integers(1, 4))
    scores = rng.integers(0, 4, int(rng.integers(1, 40))).astype(float)  # small ints: many ties
    plan = evict(scores, start_size=start, recent_size=recent, max_cache_size=max_size,
                 block_size=block)
    evicted, kept, deltas = naive_evict(scores.tolist(), start, recent, max_size, block)
    assert isinstance(plan, EvictionPlan)
    assert plan.evicted_blocks.tolist() == evicted
    assert plan.kept_blocks.tolist() == kept
    assert plan.deltas.tolist() == deltas


def _cache():
    return np.zeros((3, 2, 1, 4))


KV_ERRORS = [
    ("n_rows", lambda: rotation_lut(0, 4, 2, 10.0)),
    ("head_dim", lambda: rotation_lut(2, 5, 2, 10.0)),
    ("block_size", lambda: rotation_lut(2, 4, 0, 10.0)),
    ("base", lambda: rotation_lut(2, 4, 2, 0.0)),
    ("layout", lambda: rotate_keys(_cache(), [0], [[0]], np.zeros((2, 4)), layout="neox")),
    ("key_cache", lambda: rotate_keys(_cache()[0], [0], [[0]], np.zeros((2, 4)),
                                      layout="interleaved")),
    ("block_indices", lambda: rotate_keys(_cache(), [[0]], [[0]], np.zeros((2, 4)),
                                          layout="interleaved")),
    ("block_indices", lambda: rotate_keys(_cache(), [3], [[0]], np.zeros((2, 4)),
                                          layout="interleaved")),
    ("block_indices", lambda: rotate_keys(_cache(), [1, 1], [[0], [0]], np.zeros((2, 4)),
                                          layout="interleaved")),
    ("deltas", lambda: rotate_keys(_cache(), [0], [[0, 0, 0]], np.zeros((2, 4)),
                                   layout="interleaved")),
    ("deltas", lambda: rotate_keys(_cache(), [0], [[0.0]], np.zeros((2, 4)),
                                   layout="interleaved")),
    ("deltas", lambda: rotate_keys(_cache(), [0], [[2]], np.zeros((2, 4)), layout="interleaved")),
    ("lut", lambda: rotate_keys(_cache(), [0], [[0]], np.zeros((2, 6)), layout="interleaved")),
    ("aggregation", lambda: block_scores([1.0], block_size=1, aggregation="MEAN")),
    ("block_size", lambda: block_scores([1.0], block_size=0)),
    ("token_scores", lambda: block_scores([[1.0]], block_size=1)),
    ("token_counts", lambda: block_scores([1.0], block_size=1, token_counts=[1])),
    ("token_counts", lambda: block_scores([1.0, 2.0], block_size=1, aggregation="NORM_SUM",
                                          token_counts=[1, 0])),
    ("start_size", lambda: evict([1.0], start_size=3, recent_size=2, max_cache_size=8,
                                 block_size=2)),
    ("recent_size", lambda: evict([1.0], start_size=2, recent_size=-2, max_cache_size=8,
                                  block_size=2)),
    ("max_cache_size", lambda: evict([1.0], start_size=2, recent_size=2, max_cache_size=4,
                                     block_size=2)),
]


@pytest.mark.parametrize("match,call", KV_ERRORS, ids=[m for m, _ in KV_ERRORS])
def test_kv_cache_rejects_bad_input(match, call):
    with pytest.raises(ValueError, match=match):
        call()
