"""The cpu backend's kernels against the float64 oracles of opbench.reference.

Inputs are seeded, rounded to the storage dtype first (the oracle sees exactly what the kernel
got); outputs start poisoned with NaN.  Tolerances: f32 ~1e-5 relative (float32 math), f16 /
bf16 one rounding to the storage dtype.  Data movement is bit-exact.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from opbench.backends.cpu import CpuBackend
from opbench.backends.cpu import jit as cpu_jit
from opbench.backends.cpu import kernels as cpu_kernels
from opbench.backends.cpu.rope_cache import RopeCache
from opbench.protocol import AttnParams, PagedKV, RopeParams, numpy_dtype
from opbench.reference import attention as ref_attn
from opbench.reference import copies as ref_copies
from opbench.reference import kv_cache as ref_kv
from opbench.reference import rope as ref_rope

# (rtol, atol) against the float64 oracle, per storage dtype
TOL = {"f32": (2e-5, 2e-6), "f16": (1e-3, 1e-3), "bf16": (8e-3, 8e-3)}


@pytest.fixture(scope="module")
def backend():
    with CpuBackend() as be:
        be.devices(1)
        yield be


def stored(rng, shape, dtype: str, low=-1.0, high=1.0) -> np.ndarray:
    """Seeded uniform values already rounded to the storage dtype."""
    return rng.uniform(low, high, shape).astype(numpy_dtype(dtype))


def assert_close(got, want, dtype: str, what: str = "") -> None:
    rtol, atol = TOL[dtype]
    assert not np.isnan(got.astype(np.float64)).any(), f"{what}: NaN in output"
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, err_msg=what)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


# -- ROPE ------------------------------------------------------------------------------------
ROPE_CASES = [
    # mode, n_dims, head_dim, extra params, freq_factors
    ("normal", 64, 64, {}, False),
    ("neox", 64, 64, {}, False),
    ("normal", 32, 80, {"freq_scale": 0.5}, False),  # partial: tail copied unchanged
    ("neox", 48, 64, {"ext_factor": 1.0, "n_ctx_orig": 4096, "freq_scale": 0.25}, False),
    ("neox", 64, 64, {"attn_factor": 0.7, "freq_base": 500000.0}, True),
    ("normal", 64, 64, {"inverse": True, "ext_factor": 0.5, "n_ctx_orig": 2048}, True),
    ("mrope", 64, 80, {"sections": (8, 12, 12, 0)}, False),
    ("mrope", 32, 32, {"sections": (2, 3, 3, 8), "inverse": True}, True),
]


def rope_inputs(rng, mode, n_dims, head_dim, dtype, n_tokens=19, n_heads=3):
    x = stored(rng, (n_tokens, n_heads, head_dim), dtype)
    shape = (4, n_tokens) if mode == "mrope" else (n_tokens,)
    pos = rng.integers(-40, 70000, shape).astype(np.int32)  # negative and large positions
    ff = rng.uniform(1.0, 8.0, n_dims // 2).astype(np.float32)
    return x, pos, ff


def run_rope(be, x, pos, p, ff=None) -> np.ndarray:
    out = be.empty(x.shape, x.dtype)
    dev_ff = None if ff is None else be.to_device(ff)
    be.rope(be.to_device(x), be.to_device(pos), out, p, freq_factors=dev_ff)
    return be.to_host(out)


def oracle_rope(x, pos, p, ff=None) -> np.ndarray:
    fields = {k: v for k, v in vars(p).items() if k not in ("mode", "sections")}
    sections = p.sections if p.mode == "mrope" else None
    return ref_rope.rope(x, pos, mode=p.mode, sections=sections, freq_factors=ff, **fields)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("mode,n_dims,head_dim,extra,use_ff", ROPE_CASES)
def test_rope_matches_oracle(backend, dtype, mode, n_dims, head_dim, extra, use_ff):
    rng = np.random.default_rng(zlib.crc32(repr((mode, n_dims, head_dim, dtype)).encode()))
    x, pos, ff = rope_inputs(rng, mode, n_dims, head_dim, dtype)
    p = RopeParams(n_dims=n_dims, mode=mode, **extra)
    got = run_rope(backend, x, pos, p, ff if use_ff else None)
    want = oracle_rope(x, pos, p, ff if use_ff else None)
    assert_close(got, want, dtype, f"{p}")
    assert np.array_equal(bits(got[..., n_dims:]), bits(x[..., n_dims:])), "tail must be copied"


@pytest.mark.parametrize("mode,n_dims,head_dim,extra,use_ff", ROPE_CASES)
def test_rope_cache_on_equals_cache_off(mode, n_dims, head_dim, extra, use_ff):
    rng = np.random.default_rng(7)
    x, pos, ff = rope_inputs(rng, mode, n_dims, head_dim, "f32")
    p = RopeParams(n_dims=n_dims, mode=mode, **extra)
    with CpuBackend(rope_cache=True) as on, CpuBackend(rope_cache=False) as off:
        on.devices(1)
        on._caches[0].max_rows = 4096  # positions past the cap take the direct path
        for _ in range(2):  # second call: a cache hit
            a = run_rope(on, x, pos, p, ff if use_ff else None)
            b = run_rope(off, x, pos, p, ff if use_ff else None)
            assert np.array_equal(bits(a), bits(b))
        assert on._caches[0].misses == 1, "the second call must hit the cache"


@pytest.mark.parametrize("mode,n_dims,head_dim,extra,use_ff", ROPE_CASES)
def test_rope_numba_and_numpy_paths_agree(mode, n_dims, head_dim, extra, use_ff):
    """jit=True runs neox/mrope f32 through numba (when installed), jit=False through NumPy;
    same float32 operations in the same order, so the same bits."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(13)
    x, pos, ff = rope_inputs(rng, mode, n_dims, head_dim, "f32")
    p = RopeParams(n_dims=n_dims, mode=mode, **extra)
    with CpuBackend(jit=True) as fast, CpuBackend(jit=False) as plain_numpy:
        a = run_rope(fast, x, pos, p, ff if use_ff else None)
        b = run_rope(plain_numpy, x, pos, p, ff if use_ff else None)
        assert fast.info()["jit"] and not plain_numpy.info()["jit"]
    assert np.array_equal(bits(a), bits(b))


def test_rope_without_numba_uses_numpy(monkeypatch):
    monkeypatch.setattr(cpu_jit, "_kernels", {})  # as if numba were missing
    assert not cpu_jit.available()
    rng = np.random.default_rng(19)
    x, pos, ff = rope_inputs(rng, "neox", 48, 64, "f32")
    p = RopeParams(n_dims=48, mode="neox", freq_scale=0.5)
    with CpuBackend(jit=True) as be:
        assert_close(run_rope(be, x, pos, p, ff), oracle_rope(x, pos, p, ff), "f32")


def check_cache_separates(be, x, pos, variants) -> None:
    """Each (params, freq_factors) variant, called back to back on one backend, must match
    its own oracle: a cache key that leaves a parameter out hands one the other's angles."""
    for p, ff in variants + variants:
        got = run_rope(be, x, pos, p, ff)
        np.testing.assert_allclose(got, oracle_rope(x, pos, p, ff), rtol=2e-5, atol=2e-6,
                                   err_msg=f"{p} ff={ff is not None}")


def cache_variants(rng, n_dims):
    ff_a = rng.uniform(1.0, 4.0, n_dims // 2).astype(np.float32)
    ff_b = ff_a.copy()
    ff_b[3] *= 2.0  # same shape, same dtype, different contents
    base = RopeParams(n_dims=n_dims, mode="neox")
    return [
        (base, None),
        (RopeParams(n_dims=n_dims, mode="neox", freq_base=1e6), None),  # Gemma-3 global layer
        (base, ff_a),
        (base, ff_b),
        (RopeParams(n_dims=n_dims, mode="neox", inverse=True), None),
        (RopeParams(n_dims=n_dims, mode="neox", ext_factor=1.0, n_ctx_orig=512), None),
    ]


def test_rope_cache_key_covers_every_parameter(backend):
    rng = np.random.default_rng(3)
    x, pos, _ = rope_inputs(rng, "neox", 32, 32, "f32")
    check_cache_separates(backend, x, pos, cache_variants(rng, 32))


def test_rope_params_key_is_every_field_in_order():
    """The key is read from the instance's dict: it must hold the fields and nothing else,
    however the params were made (replace, a pickle round trip)."""
    import dataclasses
    import pickle

    made = [RopeParams(n_dims=8), RopeParams(4, "mrope", sections=(1, 1, 0, 0), inverse=True),
            dataclasses.replace(RopeParams(n_dims=8), freq_base=500.0, ext_factor=1.0),
            pickle.loads(pickle.dumps(RopeParams(n_dims=6, mode="neox", freq_scale=0.5)))]
    for p in made:
        assert p.key() == tuple(getattr(p, f.name) for f in dataclasses.fields(p))


def test_rope_cache_with_a_bad_key_is_caught(monkeypatch):
    """The check above must fail for a cache whose key ignores freq_base and freq_factors."""
    monkeypatch.setattr(RopeCache, "key", staticmethod(lambda p, ff: (p.n_dims, p.mode)))
    rng = np.random.default_rng(3)
    x, pos, _ = rope_inputs(rng, "neox", 32, 32, "f32")
    with CpuBackend() as be, pytest.raises(AssertionError):
        check_cache_separates(be, x, pos, cache_variants(rng, 32))


def test_rope_cache_grows_on_demand(backend):
    rng = np.random.default_rng(5)
    p = RopeParams(n_dims=16, mode="normal", freq_base=777.0)
    for top in (4, 300, 20000):  # each call needs more table rows than the last
        x = stored(rng, (9, 2, 16), "f32")
        pos = rng.integers(0, top, 9).astype(np.int32)
        pos[0] = top - 1
        assert_close(run_rope(backend, x, pos, p), oracle_rope(x, pos, p), "f32")


@pytest.mark.parametrize("mode", ["normal", "neox", "mrope"])
def test_rope_cache_consecutive_positions_equal_cache_off(mode):
    """Positions p..p+n-1 (prefill, decode) take the table's rows as a slice, growing it on
    the way; the bits must be those of the cache-off path, run after run."""
    rng = np.random.default_rng(29)
    extra = {"sections": (2, 3, 3, 0)} if mode == "mrope" else {}
    p = RopeParams(n_dims=16, mode=mode, freq_base=4321.0, **extra)
    with CpuBackend(rope_cache=True) as on, CpuBackend(rope_cache=False) as off:
        for first, n in ((0, 40), (30, 270), (299, 1), (5000, 7)):  # the last two grow it
            x = stored(rng, (n, 2, 16), "f32")
            pos = np.arange(first, first + n, dtype=np.int32)
            pos = np.stack([pos, pos + 1, pos + 2, pos]) if mode == "mrope" else pos
            a, b = run_rope(on, x, pos, p), run_rope(off, x, pos, p)
            assert np.array_equal(bits(a), bits(b)), f"positions {first}..{first + n - 1}"


def test_rope_cache_hands_out_consecutive_rows_without_a_gather():
    p = RopeParams(n_dims=16, mode="neox", freq_base=321.0)
    cache = RopeCache()
    table = cache.table(p, None)
    for first, n in ((0, 40), (37, 9), (300, 1)):
        cos, sin = cache.lookup(table, np.arange(first, first + n))
        assert np.shares_memory(cos, table.cos) and np.shares_memory(sin, table.sin)
        assert np.array_equal(cos, table.cos[first:first + n])
    cos, _ = cache.lookup(table, np.array([3, 4, 6]))  # not consecutive: gathered
    assert not np.shares_memory(cos, table.cos)
    assert np.array_equal(cos, table.cos[[3, 4, 6]])


def test_rope_cache_lets_a_kernel_read_the_table_in_place():
    """lookup_rows hands out the table itself and each token's row (a gather apart from the
    kernel read a table the kernel had evicted); rows the table cannot hold come computed,
    with their own indices.  Both give lookup's rows."""
    p = RopeParams(n_dims=16, mode="neox", freq_base=321.0)
    cache = RopeCache()
    table = cache.table(p, None)
    positions = np.array([40, 3, 17, 3, 250])
    cos, sin, rows = cache.lookup_rows(table, positions)
    assert cos is table.cos and sin is table.sin and np.array_equal(rows, positions)
    want_cos, want_sin = cache.lookup(table, positions)
    assert np.array_equal(cos[rows], want_cos) and np.array_equal(sin[rows], want_sin)
    mixed = np.array([-5, 2, 1 << 20])  # no table rows for the negative and the huge one
    cos, sin, rows = cache.lookup_rows(table, mixed)
    assert cos is not table.cos and np.array_equal(rows, np.arange(3))
    want_cos, want_sin = cache.lookup(table, mixed)
    assert np.array_equal(cos[rows], want_cos) and np.array_equal(sin[rows], want_sin)


def test_rope_cache_computes_few_far_positions_directly():
    """A few tokens far out must not fill the table up to there; the rows computed directly
    are bit-identical to the cache-off path."""
    rng = np.random.default_rng(23)
    p = RopeParams(n_dims=16, mode="neox", freq_base=555.0)
    x = stored(rng, (6, 2, 16), "f32")
    pos = np.array([0, 1, 2, 3, 150_000, 200_000], np.int32)
    with CpuBackend(rope_cache=True) as on, CpuBackend(rope_cache=False) as off:
        a, b = run_rope(on, x, pos, p), run_rope(off, x, pos, p)
        (table,) = on._caches[0]._tables.values()
        assert len(table.cos) == 4, "the table grew towards the far positions"
    assert np.array_equal(bits(a), bits(b))


def test_rope_in_place(backend):
    rng = np.random.default_rng(11)
    x, pos, _ = rope_inputs(rng, "neox", 64, 64, "f32")
    p = RopeParams(n_dims=64, mode="neox")
    arr = backend.to_device(x)
    backend.rope(arr, backend.to_device(pos), arr, p)
    assert_close(backend.to_host(arr), oracle_rope(x, pos, p), "f32")


def test_rope_rejects_bad_arguments(backend):
    x = backend.to_device(np.ones((4, 2, 64), np.float32))
    out = backend.empty((4, 2, 64), np.float32)
    pos = backend.to_device(np.arange(4, dtype=np.int32))
    with pytest.raises(ValueError, match="n_dims=128"):
        backend.rope(x, pos, out, RopeParams(n_dims=128))
    with pytest.raises(ValueError, match="pos dtype"):
        backend.rope(x, backend.to_device(np.arange(4.0)), out, RopeParams(n_dims=64))
    with pytest.raises(ValueError, match="freq_factors"):
        backend.rope(x, pos, out, RopeParams(n_dims=64), backend.to_device(np.ones(5, np.float32)))
    with pytest.raises(ValueError, match="n_ctx_orig"):
        backend.rope(x, pos, out, RopeParams(n_dims=64, ext_factor=1.0))


# -- ATTN ------------------------------------------------------------------------------------
ATTN_CASES = [
    # n_q, n_kv, H, Hkv, Dk, Dv, params
    (1, 700, 8, 2, 64, 64, dict(causal=True)),  # decode over 3 tiles, GQA 4
    (5, 300, 4, 4, 32, 48, dict(causal=True, window=120)),  # Dk != Dv, window trims tiles
    (7, 513, 6, 3, 32, 32, dict(softcap=5.0, max_bias=8.0)),  # ALiBi, non power-of-two heads
    (3, 40, 8, 1, 16, 16, dict(causal=True, sinks=True, lse=True)),  # MQA, sinks
    (4, 260, 4, 2, 32, 32, dict(mask=True, lse=True)),
    (2, 20, 2, 1, 16, 16, dict(window=3, lse=True, sinks=True, max_bias=1.0)),
    (300, 300, 2, 1, 16, 16, dict(causal=True, mask=True, lse=True)),  # prefill: query blocks
]


def attn_inputs(rng, n_q, n_kv, h, hkv, dk, dv, dtype):
    q = stored(rng, (n_q, h, dk), dtype)
    k = stored(rng, (n_kv, hkv, dk), dtype)
    v = stored(rng, (n_kv, hkv, dv), dtype)
    return q, k, v


def attn_options(rng, n_q, n_kv, h, params):
    opts = {k: v for k, v in params.items() if k not in ("sinks", "lse", "mask")}
    sinks = rng.uniform(-1, 2, h).astype(np.float32) if params.get("sinks") else None
    mask = None
    if params.get("mask"):
        mask = rng.uniform(-2, 2, (n_q, n_kv)).astype(np.float32)
        mask[rng.random((n_q, n_kv)) < 0.3] = -np.inf
        mask[1, :] = -np.inf  # a row with nothing visible: out 0, lse -inf
    return opts, sinks, mask


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n_q,n_kv,h,hkv,dk,dv,params", ATTN_CASES)
def test_attention_matches_oracle(backend, dtype, n_q, n_kv, h, hkv, dk, dv, params):
    rng = np.random.default_rng(n_q * 1000 + n_kv)
    q, k, v = attn_inputs(rng, n_q, n_kv, h, hkv, dk, dv, dtype)
    opts, sinks, mask = attn_options(rng, n_q, n_kv, h, params)
    scale = 1.0 / np.sqrt(dk)
    be = backend
    out = be.empty((n_q, h, dv), q.dtype)
    lse = be.empty((n_q, h), np.float32) if params.get("lse") else None
    dev = [None if a is None else be.to_device(a) for a in (q, k, v, mask, sinks)]
    be.attention(*dev[:3], out, AttnParams(scale=scale, **opts), mask=dev[3], sinks=dev[4],
                 lse=lse)
    want, want_lse = ref_attn.attention(q, k, v, scale=scale, mask=mask, sinks=sinks,
                                        return_lse=True, **opts)
    assert_close(be.to_host(out), want, dtype, "out")
    if lse is not None:
        got_lse = be.to_host(lse)
        assert np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))
        finite = np.isfinite(want_lse)
        np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=1e-5, atol=1e-5)


def paged_layout(rng, seq_lens, q_lens, block_size, num_blocks):
    """A shuffled block table (blocks of different sequences interleave); unused entries -1."""
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    order = rng.permutation(num_blocks)
    table = np.full((len(seq_lens), max_blocks), -1, np.int32)
    used = 0
    for s, n in enumerate(seq_lens):
        nb = -(-n // block_size)
        table[s, :nb] = order[used : used + nb]
        used += nb
    q_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return table, np.array(seq_lens, np.int32), q_start


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("params", [dict(causal=True), dict(causal=True, window=50, softcap=4.0),
                                    dict(max_bias=4.0, sinks=True)])
def test_paged_attention_matches_oracle(backend, dtype, params):
    rng = np.random.default_rng(42)
    seq_lens, q_lens, block_size, h, hkv, d = [37, 300, 1, 129], [3, 1, 1, 0], 16, 4, 2, 32
    table, lens, q_start = paged_layout(rng, seq_lens, q_lens, block_size, num_blocks=40)
    kc = stored(rng, (40, block_size, hkv, d), dtype)
    vc = stored(rng, (40, block_size, hkv, d), dtype)
    q = stored(rng, (sum(q_lens), h, d), dtype)
    opts, sinks, _ = attn_options(rng, 0, 0, h, params)
    be = backend
    out = be.empty(q.shape, q.dtype)
    lse = be.empty((len(q), h), np.float32)
    paged = PagedKV(*(be.to_device(a) for a in (table, lens, q_start)))
    be.attention(be.to_device(q), be.to_device(kc), be.to_device(vc), out,
                 AttnParams(scale=0.2, **opts), sinks=None if sinks is None else
                 be.to_device(sinks), lse=lse, paged=paged)
    want, want_lse = ref_attn.paged_attention(q, kc, vc, table, lens, np.array(q_lens),
                                              scale=0.2, sinks=sinks, return_lse=True, **opts)
    assert_close(be.to_host(out), want, dtype, "paged out")
    np.testing.assert_allclose(be.to_host(lse), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_paged_decode_reads_tiles_with_the_bits_of_the_full_gather(dtype):
    """Paged attention reads the cache a key tile at a time (PagedRows); the result must be the
    same bits as converting the whole sequence first, for every kv-head split."""
    rng = np.random.default_rng(8)
    n_kv, block_size, hkv, d = 700, 16, 4, 32  # tiles of 256 keys cross block boundaries
    blocks = rng.permutation(64)[: -(-n_kv // block_size)].astype(np.int32)
    kc, vc = (stored(rng, (64, block_size, hkv, d), dtype) for _ in range(2))
    q = stored(rng, (1, 8, d), dtype)
    p, q_pos = AttnParams(scale=0.3, causal=True, softcap=5.0), np.array([n_kv - 1])
    tiled = [cpu_kernels.PagedRows(c, blocks, n_kv) for c in (kc, vc)]
    whole = [c[blocks].astype(np.float32).reshape(-1, hkv, d)[:n_kv] for c in (kc, vc)]
    assert np.array_equal(tiled[0][250:520], whole[0][250:520])
    assert np.array_equal(tiled[1][:, 1:3][3:300], whole[1][:, 1:3][3:300])
    with pytest.raises(IndexError):
        tiled[0][::2]
    with pytest.raises(IndexError):
        tiled[0][1:, 1:3]
    for heads in (slice(0, 4), slice(1, 3)):
        got = cpu_kernels.attend(q[:, 2 * heads.start : 2 * heads.stop], tiled[0][:, heads],
                                 tiled[1][:, heads], p, q_pos, None, None)
        want = cpu_kernels.attend(q[:, 2 * heads.start : 2 * heads.stop], whole[0][:, heads],
                                  whole[1][:, heads], p, q_pos, None, None)
        assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(got, want))


def test_paged_attention_bad_block_table_surfaces_at_synchronize(backend):
    rng = np.random.default_rng(1)
    kc = backend.to_device(stored(rng, (4, 8, 1, 16), "f32"))
    q = backend.to_device(stored(rng, (1, 1, 16), "f32"))
    table = np.array([[0, 9]], np.int32)  # block 9 does not exist
    paged = PagedKV(*(backend.to_device(a) for a in
                      (table, np.array([12], np.int32), np.array([0, 1], np.int32))))
    out = backend.empty((1, 1, 16), np.float32)
    backend.attention(q, kc, kc, out, AttnParams(scale=1.0), paged=paged)
    with pytest.raises(ValueError, match="block_table"):
        backend.synchronize()


def test_attention_rejects_bad_shapes(backend):
    q = backend.to_device(np.ones((2, 6, 16), np.float32))
    k = backend.to_device(np.ones((5, 4, 16), np.float32))
    out = backend.empty((2, 6, 16), np.float32)
    with pytest.raises(ValueError, match="H=6 must be a multiple of Hkv=4"):
        backend.attention(q, k, k, out, AttnParams(scale=1.0))


def test_alibi_slopes_match_oracle():
    for n_heads, max_bias in ((8, 8.0), (6, 8.0), (12, 4.0)):
        np.testing.assert_allclose(cpu_kernels.alibi_slopes(n_heads, max_bias),
                                   ref_attn.alibi_slopes(n_heads, max_bias), rtol=1e-6)


# -- KV_ROTATE -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("per_token", [False, True])
def test_kv_rotate_matches_oracle(backend, dtype, layout, per_token):
    rng = np.random.default_rng(17)
    num_blocks, block_size, hkv, d = 12, 8, 2, 32
    cache = stored(rng, (num_blocks, block_size, hkv, d), dtype)
    blocks = rng.choice(num_blocks, 5, replace=False).astype(np.int32)
    lut = ref_kv.rotation_lut(64, d, block_size, 10000.0)
    deltas = rng.integers(0, 64, (5, block_size if per_token else 1)).astype(np.int32)
    arr = backend.to_device(cache)
    backend.kv_rotate(arr, backend.to_device(blocks), backend.to_device(deltas),
                      backend.to_device(lut), layout)
    got = backend.to_host(arr)
    want = ref_kv.rotate_keys(cache, blocks, deltas, lut, layout=layout)
    assert_close(got, want, dtype, f"{layout} per_token={per_token}")
    untouched = np.setdiff1d(np.arange(num_blocks), blocks)
    assert np.array_equal(bits(got[untouched]), bits(cache[untouched]))


def test_kv_rotate_rejects_bad_arguments(backend):
    cache = backend.to_device(np.ones((4, 8, 1, 16), np.float32))
    lut = backend.to_device(np.ones((3, 16), np.float32))
    blocks = backend.to_device(np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="deltas shape"):
        backend.kv_rotate(cache, blocks, backend.to_device(np.zeros((2, 3), np.int32)), lut,
                          "rotate_half")
    with pytest.raises(ValueError, match="layout"):
        backend.kv_rotate(cache, blocks, backend.to_device(np.zeros((2, 1), np.int32)), lut,
                          "sideways")
    backend.kv_rotate(cache, blocks, backend.to_device(np.full((2, 1), 5, np.int32)), lut,
                      "rotate_half")
    with pytest.raises(ValueError, match="deltas must lie"):
        backend.synchronize()


# -- SET_ROWS / GET_ROWS / CPY -------------------------------------------------------------------
PAIRS = [(a, b) for a in ("f32", "f16", "bf16") for b in ("f32", "f16", "bf16")]


def wide_values(rng, shape, dtype):
    """Values that need rounding, plus f16 overflow and subnormals and exact ties."""
    x = rng.uniform(-1, 1, shape) * np.exp2(rng.integers(-26, 18, shape))
    x.flat[:3] = [1 + 2.0**-11, 1 + 3 * 2.0**-11, 70000.0]  # f16 ties to even, overflow
    with np.errstate(over="ignore"):
        return x.astype(numpy_dtype(dtype))


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
def test_set_rows_and_get_rows_match_oracle(backend, src_dtype, dst_dtype):
    rng = np.random.default_rng(23)
    dst = stored(rng, (20, 3, 8), dst_dtype)
    src = wide_values(rng, (6, 3, 8), src_dtype)
    slots = np.array([4, -1, 19, 0, -1, 7], np.int32)
    arr = backend.to_device(dst)
    backend.set_rows(arr, backend.to_device(src), backend.to_device(slots))
    got = backend.to_host(arr)
    assert np.array_equal(bits(got), bits(ref_copies.set_rows(dst, src, slots)))
    rows = np.array([19, 4, 4, 0], np.int32)
    out = backend.empty((4, 3, 8), numpy_dtype(src_dtype))
    backend.get_rows(arr, backend.to_device(rows), out)
    want = ref_copies.get_rows(got, rows, src_dtype)
    assert np.array_equal(bits(backend.to_host(out)), bits(want))


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
@pytest.mark.parametrize("perm,step", [((0, 1, 2), 1), ((1, 0, 2), 1), ((2, 0, 1), 3),
                                       ((0, 2, 1), 2)])
def test_cpy_matches_oracle(backend, src_dtype, dst_dtype, perm, step):
    rng = np.random.default_rng(29)
    src = wide_values(rng, (7, 5, 6), src_dtype)
    want = ref_copies.cpy(src, dst_dtype, perm=perm, step=step)
    out = backend.empty(want.shape, numpy_dtype(dst_dtype))
    backend.cpy(backend.to_device(src), out, perm, step)
    assert np.array_equal(bits(backend.to_host(out)), bits(want))


@pytest.mark.skipif(not cpu_jit.installed(), reason="numba not installed")
@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
@pytest.mark.parametrize("perm,step", [((2, 0, 1, 3), 2), ((1, 3, 0, 2), 1),
                                       ((3, 2, 1, 0), 1)])
def test_permuted_cpy_reads_the_source_in_its_own_order(monkeypatch, backend, src_dtype,
                                                        dst_dtype, perm, step):
    """Permutations that keep the last axis last go through the numba row loop (the source
    row by row, each to its row of out, every step-th index of out's first axis kept); the
    others through NumPy.  Both give the oracle's bits."""
    taken = []
    real = cpu_jit.copy_permuted_rows
    monkeypatch.setattr(cpu_jit, "copy_permuted_rows", lambda *a: taken.append(a) or real(*a))
    rng = np.random.default_rng(31)
    src = wide_values(rng, (5, 3, 4, 6), src_dtype)
    want = ref_copies.cpy(src, dst_dtype, perm=perm, step=step)
    out = backend.empty(want.shape, numpy_dtype(dst_dtype))
    backend.cpy(backend.to_device(src), out, perm, step)
    backend.synchronize()
    assert np.array_equal(bits(backend.to_host(out)), bits(want))
    assert bool(taken) == (perm[-1] == 3 and numpy_dtype(src_dtype) != numpy_dtype("bf16")
                           and numpy_dtype(dst_dtype) != numpy_dtype("bf16"))


@pytest.mark.skipif(not cpu_jit.installed(), reason="numba not installed")
@pytest.mark.parametrize("dtype,nan_bits", [("f32", (0x7F800001, 0xFFBFFFFF, 0x7FC00001)),
                                            ("f16", (0x7C01, 0xFDFF, 0x7E01))])
@pytest.mark.parametrize("rows", [7, 1 << 13])  # one call, and split over the cores (>= 1 MiB)
def test_same_type_copy_keeps_every_bit_through_the_numba_loop(monkeypatch, backend, dtype,
                                                                 nan_bits, rows):
    """A contiguous copy within one type is data movement: the numba loop (taken for it) must
    hand over signalling NaNs, payloads, -0 and subnormals unchanged."""
    taken = []
    real = cpu_jit.convert
    monkeypatch.setattr(cpu_jit, "convert", lambda *a: taken.append(a) or real(*a))
    rng = np.random.default_rng(37)
    src = wide_values(rng, (rows, 4, 16), dtype)
    raw = src.view(np.uint32 if dtype == "f32" else np.uint16).reshape(-1)
    raw[3:3 + len(nan_bits)] = nan_bits
    raw[-2:] = [1 << (raw.itemsize * 8 - 1), 1]  # -0 and the smallest subnormal
    out = backend.empty(src.shape, numpy_dtype(dtype))
    backend.cpy(backend.to_device(src), out, (0, 1, 2), 1)
    backend.synchronize()
    assert np.array_equal(bits(backend.to_host(out)), bits(src))
    assert taken


def test_copies_reject_bad_arguments(backend):
    src = backend.to_device(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="perm"):
        backend.cpy(src, backend.empty((3, 4), np.float32), (1, 1))
    with pytest.raises(ValueError, match="out shape"):
        backend.cpy(src, backend.empty((4, 3), np.float32), (1, 0))
    with pytest.raises(ValueError, match="step"):
        backend.cpy(src, backend.empty((4, 3), np.float32), (0, 1), 0)
    dst = backend.empty((5, 3), np.float32)
    backend.set_rows(dst, src, backend.to_device(np.array([0, 1, 9, -1], np.int32)))
    with pytest.raises(ValueError, match="slots"):
        backend.synchronize()


def test_a_numba_that_cannot_load_the_kernels_is_said_aloud(monkeypatch):
    """Installed numba, kernels that fail to load (a stale cache raised ModuleNotFoundError):
    a warning names the error, the NumPy path runs, and info() says jit is off and why."""
    pytest.importorskip("numba")

    def stale_cache(kernels):
        raise ModuleNotFoundError("No module named 'opbench.backends.base_cpu'")
    monkeypatch.setattr(cpu_jit, "_kernels", None)
    monkeypatch.setattr(cpu_jit, "_load_error", None)
    monkeypatch.setattr(cpu_jit, "_warm_up", stale_cache)
    with pytest.warns(RuntimeWarning, match="did not load .*base_cpu.*NumPy path"):
        assert not cpu_jit.available()
    assert "ModuleNotFoundError" in cpu_jit.load_error()
    rng = np.random.default_rng(23)
    x, pos, ff = rope_inputs(rng, "neox", 48, 64, "f32")
    p = RopeParams(n_dims=48, mode="neox")
    with CpuBackend(jit=True) as be:
        info = be.info()
        assert info["jit"] is False and "base_cpu" in info["jit_error"]
        assert_close(run_rope(be, x, pos, p, ff), oracle_rope(x, pos, p, ff), "f32")
