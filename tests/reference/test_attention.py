"""Properties of the attention oracles: a naive loop, causality, GQA, paging, partial merges."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opbench.reference.attention import alibi_slopes, attention, merge_partials, paged_attention


def ggml_slope(h: int, n_heads: int, max_bias: float) -> float:
    """ggml's ALiBi slope of head h, written out scalar by scalar."""
    n_head_log2 = 1 << (n_heads.bit_length() - 1)
    m0 = 2.0 ** (-max_bias / n_head_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    return m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1)


def naive_attention(q, k, v, *, scale=None, causal=False, window=0, mask=None, softcap=0.0,
                    max_bias=0.0, sinks=None, q_pos=None, k_pos=None):
    """One query, one head, one key at a time, in plain Python floats."""
    n_q, n_heads, head_dim = q.shape
    n_kv, n_kv_heads, dim_v = v.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q_pos = [n_kv - n_q + i for i in range(n_q)] if q_pos is None else list(q_pos)
    k_pos = list(range(n_kv)) if k_pos is None else list(k_pos)
    out = np.zeros((n_q, n_heads, dim_v))
    lse = np.full((n_q, n_heads), -np.inf)
    for i in range(n_q):
        for h in range(n_heads):
            kvh = h // (n_heads // n_kv_heads)
            logits, values = [], []
            for j in range(n_kv):
                if causal and k_pos[j] > q_pos[i]:
                    continue
                if window > 0 and q_pos[i] - k_pos[j] >= window:
                    continue
                s = scale * sum(float(q[i, h, d]) * float(k[j, kvh, d]) for d in range(head_dim))
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                if mask is not None:
                    s += float(mask[i, j])
                if max_bias > 0:
                    s += ggml_slope(h, n_heads, max_bias) * (k_pos[j] - q_pos[i])
                if s != -math.inf:
                    logits.append(s)
                    values.append(v[j, kvh])
            extra = [] if sinks is None else [float(sinks[h])]
            if not logits and not extra:
                continue
            top = max(logits + extra)
            weights = [math.exp(s - top) for s in logits]
            denom = sum(weights) + sum(math.exp(s - top) for s in extra)
            for w, val in zip(weights, values):
                out[i, h] += w * val / denom
            lse[i, h] = top + math.log(denom)
    return out, lse


def random_qkv(rng, n_q, n_kv, n_heads, n_kv_heads, head_dim, dim_v=None):
    q = rng.uniform(-1, 1, (n_q, n_heads, head_dim))
    k = rng.uniform(-1, 1, (n_kv, n_kv_heads, head_dim))
    v = rng.uniform(-1, 1, (n_kv, n_kv_heads, dim_v or head_dim))
    return q, k, v


def masked(rng, n_q, n_kv):
    """An additive mask with random -inf entries and one row fully hidden."""
    mask = rng.uniform(-2, 2, (n_q, n_kv))
    mask[rng.random((n_q, n_kv)) < 0.3] = -np.inf
    mask[1, :] = -np.inf
    return mask


VARIANTS = {
    "mha": dict(shape=(5, 7, 4, 4, 8), opts={}),
    "gqa": dict(shape=(5, 9, 6, 2, 8), opts={}),
    "mqa": dict(shape=(4, 6, 4, 1, 8), opts={}),
    "dv_differs": dict(shape=(3, 6, 4, 2, 8, 5), opts={"scale": 0.7}),
    "causal": dict(shape=(6, 9, 4, 2, 8), opts={"causal": True}),
    "causal_more_q_than_kv": dict(shape=(6, 4, 2, 1, 8), opts={"causal": True}),
    "causal_window": dict(shape=(6, 11, 4, 2, 8), opts={"causal": True, "window": 3}),
    "window_only": dict(shape=(4, 9, 2, 2, 8), opts={"window": 2}),
    "mask": dict(shape=(5, 8, 4, 2, 8), opts={"mask": "random"}),
    "softcap": dict(shape=(5, 8, 4, 2, 8), opts={"softcap": 0.5, "scale": 3.0}),
    "alibi": dict(shape=(5, 8, 6, 3, 8), opts={"max_bias": 8.0, "causal": True}),
    "sinks": dict(shape=(5, 8, 4, 2, 8), opts={"sinks": "random"}),
    "sinks_mask": dict(shape=(5, 8, 4, 2, 8), opts={"sinks": "random", "mask": "random"}),
    "positions": dict(shape=(5, 8, 4, 2, 8), opts={"positions": True, "causal": True}),
    "everything": dict(shape=(5, 10, 6, 2, 8), opts={
        "positions": True, "causal": True, "window": 4, "mask": "random", "softcap": 1.5,
        "max_bias": 4.0, "sinks": "random"}),
}


def make_case(name, seed):
    rng = np.random.default_rng(seed)
    spec = VARIANTS[name]
    q, k, v = random_qkv(rng, *spec["shape"])
    opts = dict(spec["opts"])
    n_q, n_kv, n_heads = q.shape[0], k.shape[0], q.shape[1]
    if opts.get("mask") == "random":
        opts["mask"] = masked(rng, n_q, n_kv)
    if opts.get("sinks") == "random":
        opts["sinks"] = rng.uniform(-1, 2, n_heads)
    if opts.pop("positions", False):
        # ring / zigzag splits hand out arbitrary, unordered positions
        opts["k_pos"] = rng.permutation(n_kv) + 3
        opts["q_pos"] = rng.integers(0, n_kv + 5, n_q)
    return q, k, v, opts


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attention_equals_naive_loop(name, seed):
    q, k, v, opts = make_case(name, seed)
    out, lse = attention(q, k, v, return_lse=True, **opts)
    want_out, want_lse = naive_attention(q, k, v, **opts)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(out, attention(q, k, v, **opts))


def test_fully_hidden_row_gives_zero_and_minus_inf():
    q, k, v, opts = make_case("mask", 3)
    out, lse = attention(q, k, v, return_lse=True, **opts)
    assert np.all(out[1] == 0) and np.all(lse[1] == -np.inf)
    assert np.isfinite(out).all()


def test_sink_alone_gives_zero_output_and_sink_lse():
    q, k, v, opts = make_case("sinks_mask", 4)
    out, lse = attention(q, k, v, return_lse=True, **opts)
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(lse[1], opts["sinks"], rtol=1e-15)


def test_alibi_slopes_by_hand():
    np.testing.assert_allclose(alibi_slopes(8, 8.0), [2.0**-i for i in range(1, 9)], rtol=1e-15)
    # 12 heads: 8 from m0 = 2^-1, then m1 = 2^-0.5 to the odd powers 1, 3, 5, 7
    want = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(alibi_slopes(12, 8.0), want, rtol=1e-15)
    np.testing.assert_array_equal(alibi_slopes(4, 0.0), np.ones(4))


def test_causal_output_ignores_future_keys():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 8, 8, 4, 2, 8)
    cut = 5  # keys 5.. are the future of queries 0..4
    k2, v2 = k.copy(), v.copy()
    k2[cut:] = rng.uniform(-3, 3, k2[cut:].shape)
    v2[cut:] = rng.uniform(-3, 3, v2[cut:].shape)
    before = attention(q, k, v, causal=True)
    after = attention(q, k2, v2, causal=True)
    np.testing.assert_array_equal(before[:cut], after[:cut])
    assert not np.allclose(before[cut:], after[cut:])  # the later queries do see them


def test_gqa_with_hkv_equal_h_is_plain_multi_head():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 5, 7, 4, 4, 8)
    out = attention(q, k, v, causal=True)
    for h in range(4):
        one = attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], causal=True)
        np.testing.assert_allclose(out[:, h : h + 1], one, rtol=1e-13, atol=1e-15)


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 5, 7, 6, 2, 8)
    sinks = rng.uniform(-1, 1, 6)
    out = attention(q, k, v, causal=True, max_bias=2.0, sinks=sinks)
    # query head h reads kv head h // 3: repeat each kv head 3 times in place
    want = attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), causal=True,
                     max_bias=2.0, sinks=sinks)
    np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-15)


def build_paged(rng, seq_lens, q_lens, *, block_size, n_heads, n_kv_heads, head_dim):
    """Random caches with spare blocks, and block tables pointing at shuffled physical blocks."""
    n_blocks = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(n_blocks) + 1
    num_physical = sum(n_blocks) + 3
    physical = rng.permutation(num_physical)
    table = np.full((len(seq_lens), max_blocks), -1, dtype=np.int32)
    used = 0
    for s, count in enumerate(n_blocks):
        table[s, :count] = physical[used : used + count]
        used += count
    shape = (num_physical, block_size, n_kv_heads, head_dim)
    k_cache, v_cache = rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape)
    q = rng.uniform(-1, 1, (sum(q_lens), n_heads, head_dim))
    return q, k_cache, v_cache, table


def gather_sequence(cache, table_row, n_tokens):
    """Token t of the sequence is at slot table_row[t // B] * B + t % B, one token at a time."""
    block_size = cache.shape[1]
    flat = cache.reshape(-1, *cache.shape[2:])
    return np.stack([flat[table_row[t // block_size] * block_size + t % block_size]
                     for t in range(n_tokens)])


PAGED_OPTIONS = [
    {},
    {"causal": True},
    {"causal": True, "window": 5, "softcap": 2.0},
    {"causal": True, "max_bias": 4.0, "sinks": "random"},
]


@pytest.mark.parametrize("opts", PAGED_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_paged_equals_contiguous_after_gathering(opts):
    rng = np.random.default_rng(8)
    seq_lens, q_lens = [9, 3, 16, 5], [3, 1, 16, 0]
    q, k_cache, v_cache, table = build_paged(rng, seq_lens, q_lens, block_size=4, n_heads=4,
                                             n_kv_heads=2, head_dim=8)
    opts = dict(opts)
    if opts.get("sinks") == "random":
        opts["sinks"] = rng.uniform(-1, 1, 4)
    out, lse = paged_attention(q, k_cache, v_cache, table, np.array(seq_lens), np.array(q_lens),
                               return_lse=True, **opts)
    assert out.shape == (sum(q_lens), 4, 8) and lse.shape == (sum(q_lens), 4)
    start = 0
    for s, (n_kv, n_q) in enumerate(zip(seq_lens, q_lens)):
        k = gather_sequence(k_cache, table[s], n_kv)
        v = gather_sequence(v_cache, table[s], n_kv)
        want, want_lse = attention(q[start : start + n_q], k, v, return_lse=True, **opts)
        np.testing.assert_allclose(out[start : start + n_q], want, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(lse[start : start + n_q], want_lse, rtol=1e-13)
        start += n_q


def random_split(rng, n_kv, n_parts):
    """Cut points 0 = c0 <= c1 <= ... <= cP = n_kv (empty parts allowed)."""
    inner = np.sort(rng.integers(0, n_kv + 1, n_parts - 1))
    return [0, *inner.tolist(), n_kv]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["nosink", "sinks"])
@pytest.mark.parametrize("n_parts", range(2, 9))
def test_merge_partials_over_any_split_equals_unsplit(n_parts, with_sinks, causal):
    rng = np.random.default_rng(100 + n_parts)
    q, k, v = random_qkv(rng, 6, 13, 4, 2, 8)
    sinks = rng.uniform(-1, 2, 4) if with_sinks else None
    opts = dict(causal=causal, window=0, max_bias=2.0, softcap=3.0)
    want, want_lse = attention(q, k, v, sinks=sinks, return_lse=True, **opts)
    q_pos = np.arange(13 - 6, 13)
    cuts = random_split(rng, 13, n_parts)
    outs, lses = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        out, lse = attention(q, k[lo:hi], v[lo:hi], q_pos=q_pos, k_pos=np.arange(lo, hi),
                             return_lse=True, **opts)
        outs.append(out)
        lses.append(lse)
    out, lse = merge_partials(outs, lses, sinks=sinks)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_merge_ignores_parts_that_saw_nothing_even_if_nan():
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, 3, 6, 2, 2, 4)
    want, want_lse = attention(q, k, v, return_lse=True)
    nothing_out = np.full_like(want, np.nan)
    nothing_lse = np.full_like(want_lse, -np.inf)
    out, lse = merge_partials([nothing_out, want], [nothing_lse, want_lse])
    np.testing.assert_allclose(out, want, rtol=1e-15)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-15)
    out, lse = merge_partials([nothing_out], [nothing_lse])
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_float32_compute_dtype_is_returned():
    q, k, v, opts = make_case("everything", 0)
    out, lse = attention(q, k, v, return_lse=True, dtype=np.float32, **opts)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, attention(q, k, v, **opts), atol=1e-5)


def _qkv():
    return random_qkv(np.random.default_rng(0), 3, 5, 4, 2, 8)


ATTENTION_ERRORS = [
    ("q must be 3-D", lambda q, k, v: attention(q[0], k, v)),
    ("head_dim", lambda q, k, v: attention(q[..., :4], k, v)),
    ("k shape", lambda q, k, v: attention(q, k, v[:4])),
    ("multiple of Hkv", lambda q, k, v: attention(q[:, :3], k, v)),
    ("scale", lambda q, k, v: attention(q, k, v, scale=np.inf)),
    ("window", lambda q, k, v: attention(q, k, v, window=-1)),
    ("window", lambda q, k, v: attention(q, k, v, window=1.5)),
    ("softcap", lambda q, k, v: attention(q, k, v, softcap=-1.0)),
    ("max_bias", lambda q, k, v: attention(q, k, v, max_bias=-1.0)),
    ("q_pos", lambda q, k, v: attention(q, k, v, q_pos=np.arange(2))),
    ("q_pos", lambda q, k, v: attention(q, k, v, q_pos=np.arange(3.0))),
    ("k_pos", lambda q, k, v: attention(q, k, v, k_pos=np.arange(4))),
    ("mask", lambda q, k, v: attention(q, k, v, mask=np.zeros((3, 4)))),
    ("sinks", lambda q, k, v: attention(q, k, v, sinks=np.zeros(2))),
    ("n_heads", lambda q, k, v: alibi_slopes(0, 1.0)),
    ("max_bias", lambda q, k, v: alibi_slopes(4, -1.0)),
]


@pytest.mark.parametrize("match,call", ATTENTION_ERRORS, ids=[m for m, _ in ATTENTION_ERRORS])
def test_attention_rejects_bad_input(match, call):
    with pytest.raises(ValueError, match=match):
        call(*_qkv())


def _paged_args():
    rng = np.random.default_rng(1)
    q, k_cache, v_cache, table = build_paged(rng, [5, 3], [2, 1], block_size=2, n_heads=4,
                                             n_kv_heads=2, head_dim=4)
    return [q, k_cache, v_cache, table, np.array([5, 3]), np.array([2, 1])]


def _with(index, value):
    args = _paged_args()
    args[index] = value(args[index])
    return args


PAGED_ERRORS = [
    ("mask", lambda: paged_attention(*_paged_args(), mask=np.zeros((3, 5)))),
    ("k_cache", lambda: paged_attention(*_with(1, lambda c: c[0]))),
    ("block_table", lambda: paged_attention(*_with(3, lambda t: t[0]))),
    ("block_table", lambda: paged_attention(*_with(3, lambda t: t.astype(float)))),
    ("seq_lens", lambda: paged_attention(*_with(4, lambda s: s[:1]))),
    ("seq_lens", lambda: paged_attention(*_with(4, lambda s: s * 10))),
    ("q_lens", lambda: paged_attention(*_with(5, lambda s: np.array([2, 4])))),
    ("q shape", lambda: paged_attention(*_with(0, lambda q: q[:2]))),
    ("block_table", lambda: paged_attention(*_with(3, lambda t: t + 100))),
    ("outs and lses", lambda: merge_partials([], [])),
    ("outs and lses", lambda: merge_partials([np.zeros((2, 3, 4))], [])),
    ("each out", lambda: merge_partials([np.zeros((2, 3, 4))], [np.zeros((2, 4))])),
    ("sinks", lambda: merge_partials([np.zeros((2, 3, 4))], [np.zeros((2, 3))], np.zeros(2))),
]


@pytest.mark.parametrize("match,call", PAGED_ERRORS, ids=[m for m, _ in PAGED_ERRORS])
def test_paged_and_merge_reject_bad_input(match, call):
    with pytest.raises(ValueError, match=match):
        call()
