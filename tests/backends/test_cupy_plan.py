"""The cupy backend's host-side decisions, tested on the CPU (no cupy, no GPU needed).

Launch geometry for every case of the harness's tables, the split-KV plan, the RoPE cache key,
CPY stride folding, copy_async's stream orchestration, argument checks, and NumPy mirrors of
the kernels' index math and online-softmax algorithm judged against the float64 oracles.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest

from opbench.backends.cupy import CupyBackend, checks, plan
from opbench.harness.ops import SPECS
from opbench.harness.ops.attn import block_size, sequence_lengths
from opbench.protocol import AttnParams, PagedKV, RopeParams
from opbench.reference import attention as attn_ref
from opbench.reference import rope as rope_ref

H100 = {"num_sms": 132, "shared_limit": 227 * 1024}
A100 = {"num_sms": 108, "shared_limit": 163 * 1024}


# -- launch configurations for every case of the harness tables --------------------------------
def _attn_plan_for(case, gpu) -> plan.AttnPlan:
    dk, dv = case["hs"]
    if case["paged"]:
        lengths = sequence_lengths(case)
        n_q = sum(q for _, q in lengths)
        tokens = block_size(case)
        max_blocks = max(math.ceil(kv / tokens) for kv, _ in lengths)
        return plan.attn_plan(n_q, case["nh"], dk, dv, max_blocks * tokens, len(lengths),
                              n_q == len(lengths), **gpu)
    return plan.attn_plan(case["nq"], case["nh"], dk, dv, case["nkv"], 1, case["nq"] == 1,
                          **gpu)


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
def test_every_attn_case_launch_fits_the_device(gpu):
    cases = SPECS["ATTN"].cases()
    assert cases
    for case in cases:
        p = _attn_plan_for(case, gpu)
        plan.check_launch("attn_fwd", p.fwd, gpu["shared_limit"])
        assert p.acc * plan.ATTN_GROUP >= case["hs"][1]
        if case["hs"][0] <= 256 and case["hs"][1] <= 256:
            assert p.fwd.shared_mem <= plan.DEFAULT_SHARED_LIMIT, case.id  # no opt-in needed
        if p.merge is not None:
            plan.check_launch("attn_merge", p.merge)


def test_every_rope_kv_rotate_and_rows_case_launch_fits():
    for case in SPECS["ROPE"].cases():
        head_dim, heads, tokens = case["ne"]
        launch = plan.rope_launch(tokens, heads, head_dim, case["n_dims"])
        plan.check_launch("rope_kernel", launch)
        assert launch.block[0] * 1 >= 32 and launch.block[0] % 32 == 0
    for case in SPECS["KV_ROTATE"].cases():
        plan.check_launch("kv_rotate", plan.kv_rotate_launch(case["nrot"], case["bs"],
                                                             case["nkvh"], case["hs"]))
    for op in ("SET_ROWS", "GET_ROWS"):
        for case in SPECS[op].cases():
            plan.check_launch(op, plan.rows_launch(32, int(np.prod(case["row"]))))


def test_check_launch_rejects_what_cuda_would():
    with pytest.raises(ValueError, match="attn_fwd.*threads per block"):
        plan.check_launch("attn_fwd", plan.Launch((1, 1, 1), (1025, 1, 1)))
    with pytest.raises(ValueError, match="grid"):
        plan.check_launch("k", plan.Launch((1, 65536, 1), (32, 1, 1)))
    with pytest.raises(ValueError, match="shared memory"):
        plan.check_launch("k", plan.Launch((1, 1, 1), (32, 1, 1), 49 * 1024))
    with pytest.raises(ValueError, match="empty"):
        plan.check_launch("k", plan.Launch((0, 1, 1), (32, 1, 1)))


def test_huge_sizes_stay_within_grid_limits():
    plan.check_launch("cpy", plan.grid_stride(2**40))
    plan.check_launch("rows", plan.rows_launch(2**20, 2**30))
    with pytest.raises(ValueError, match="Dv=1024"):
        plan.attn_plan(1, 1, 64, 1024, 10)


# -- split-KV plan ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_kv", [1, 7, 64, 113, 1000, 4096, 65537])
@pytest.mark.parametrize("num_sms", [1, 8, 132])
def test_split_plan_covers_every_key_exactly_once(max_kv, num_sms):
    p = plan.attn_plan(1, 2, 128, 128, max_kv, decode=True, num_sms=num_sms)
    assert p.split_len % p.bk == 0
    for n_keys in {1, max_kv // 2 or 1, max_kv}:
        covered = np.zeros(n_keys, int)
        for lo, hi in p.split_ranges(n_keys):
            covered[lo:hi] += 1
        assert (covered == 1).all(), (p, n_keys)
    assert p.split_ranges(max_kv)[-1][0] < max_kv  # no split is empty at the bound
    assert (p.merge is not None) == (p.n_splits > 1)


def test_split_kv_only_for_decode_and_long_contexts():
    decode = plan.attn_plan(1, 8, 128, 128, 32768, decode=True, num_sms=132)
    assert decode.n_splits > 1
    assert decode.fwd.grid == (decode.n_splits, 8, 1)
    prefill = plan.attn_plan(64, 8, 128, 128, 32768, decode=False, num_sms=132)
    assert prefill.n_splits == 1 and prefill.merge is None
    short = plan.attn_plan(1, 8, 128, 128, 16, decode=True, num_sms=132)
    assert short.n_splits == 1
    busy = plan.attn_plan(4096, 64, 128, 128, 32768, decode=True, num_sms=132)
    assert busy.n_splits == 1  # the natural grid already fills the GPU


def test_long_decode_splits_into_short_key_ranges_while_the_grid_is_small():
    """A decode block walks its split alone: splits of about DECODE_SPLIT_KEYS keys, unless
    the grid already holds DECODE_BLOCKS_PER_SM blocks per SM."""
    # 32 heads on 132 SMs: at most 16 * 132 / 32 = 66 splits, rounded to whole 32-key tiles
    for max_kv, n_splits, split_len in ((4096, 16, 256), (8192, 32, 256), (32768, 64, 512)):
        p = plan.attn_plan(1, 32, 128, 128, max_kv, decode=True, num_sms=132)
        assert (p.n_splits, p.split_len) == (n_splits, split_len), p
    longest = plan.attn_plan(1, 1, 128, 128, 1 << 20, decode=True, num_sms=132)
    assert longest.n_splits == plan.MAX_DECODE_SPLITS
    batch = plan.attn_plan(8, 32, 128, 128, 32768, n_seqs=8, decode=True, num_sms=132)
    unsplit_blocks, target = 32 * 8, plan.DECODE_BLOCKS_PER_SM * 132
    assert (batch.n_splits - 1) * unsplit_blocks < target <= batch.n_splits * unsplit_blocks
    assert batch.split_len > plan.DECODE_SPLIT_KEYS  # the GPU is full before the keys are short


@pytest.mark.parametrize("n_heads, kv_heads, heads_per_block", [
    (32, 8, 4),  # llama-3-8b: a block stages each K/V tile once for the group's four heads
    (64, 8, 8), (28, 4, 7), (32, 1, 16), (48, 1, 16), (40, 40, 1)])
def test_a_decode_block_takes_the_query_heads_of_one_kv_head(n_heads, kv_heads,
                                                             heads_per_block):
    p = plan.attn_plan(1, n_heads, 128, 128, 32768, decode=True, num_sms=132, kv_heads=kv_heads)
    assert p.heads_per_block == heads_per_block
    group = n_heads // kv_heads
    assert group % heads_per_block == 0 and heads_per_block <= plan.ATTN_BQ  # one KV head
    assert p.fwd.grid[1] * heads_per_block == n_heads  # every head in one block's rows
    assert p.fwd.grid[0] == p.n_splits  # one query tile: a row for each of the block's heads


def test_prefill_and_a_default_kv_head_count_keep_one_head_a_block():
    assert plan.attn_plan(512, 32, 128, 128, 512, kv_heads=8).heads_per_block == 1
    assert plan.attn_plan(1, 32, 128, 128, 4096, decode=True).heads_per_block == 1
    batch = plan.attn_plan(6, 32, 128, 128, 4096, n_seqs=6, decode=True, kv_heads=8)
    # 4 heads a block leave 4 rows a head: 6 query rows need 2 tiles (a sequence may hold
    # all of them: q_start lives on the device, the plan knows only the total)
    assert batch.heads_per_block == 4 and batch.fwd.grid[0] == 2 * batch.n_splits


def test_decode_shares_a_heads_keys_among_its_row_groups_where_the_merge_fits():
    decode = plan.attn_plan(1, 32, 128, 128, 32768, decode=True, kv_heads=8)
    assert decode.key_split and plan.attn_key_split_fits(128, 128, decode.bk)
    assert not plan.attn_plan(512, 32, 128, 128, 512, kv_heads=8).key_split  # prefill
    mla = plan.attn_plan(1, 16, 576, 512, 4096, decode=True, kv_heads=1, shared_limit=232448)
    assert mla.acc == 64 and not mla.key_split  # the 512-wide accumulators: no registers left
    # the merge reuses the tiles' shared memory: ATTN_BQ rows of Dv + 2 floats
    assert plan.attn_key_split_fits(64, 64, 8)
    assert 4 * plan.ATTN_BQ * (64 + 2) <= plan.attn_shared_bytes(64, 64, 8)


def test_split_plan_depends_on_shapes_only():
    """Graph replay: the same shapes must give the same plan whatever the lengths are."""
    a = plan.attn_plan(4, 8, 64, 64, 2048, n_seqs=4, decode=True, num_sms=132)
    b = plan.attn_plan(4, 8, 64, 64, 2048, n_seqs=4, decode=True, num_sms=132)
    assert a == b


# -- a NumPy mirror of attention.cu's algorithm, judged by the oracle ---------------------------
def _fwd_block(q_rows, k, v, qpos, plan_, split, *, scale, causal, window, softcap, mask_rows,
               slope):
    """One (q tile, head, split) block of attn_fwd: (acc, m, l) per row, tile by tile."""
    n_rows, seq_len = len(q_rows), len(k)
    k_lo, k_hi = split * plan_.split_len, min(seq_len, (split + 1) * plan_.split_len)
    if causal:
        k_hi = min(k_hi, qpos[0] + n_rows)
    if window > 0:
        k_lo = max(k_lo, qpos[0] - window + 1)
    m = np.full(n_rows, -np.inf)
    l, acc = np.zeros(n_rows), np.zeros((n_rows, v.shape[1]))
    for kt in range(k_lo, k_hi, plan_.bk):
        t = np.arange(kt, min(kt + plan_.bk, k_hi))
        s = scale * q_rows @ k[t].T
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        if mask_rows is not None:
            s = s + mask_rows[:, t]
        s = s + slope * (t[None, :] - qpos[:, None])
        hidden = (causal & (t[None, :] > qpos[:, None])) | (
            (window > 0) & (qpos[:, None] - t[None, :] >= window))
        s = np.where(hidden, -np.inf, s)
        m_new = np.maximum(m, s.max(axis=1))
        base = np.where(m_new == -np.inf, 0.0, m_new)
        alpha, p = np.exp(m - base), np.exp(s - base[:, None])
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + p @ v[t]
        m = m_new
    return acc, m, l


def emulate_attention(q, k, v, p: AttnParams, plan_, mask=None, sinks=None):
    """out, lse of the kernel pair (attn_fwd [+ attn_merge]) for contiguous attention."""
    n_q, n_heads, _ = q.shape
    n_kv, n_kv_heads, dv = v.shape
    slopes = (plan.alibi_slopes(n_heads, p.max_bias) if p.max_bias > 0 else [0.0] * n_heads)
    out, lse = np.zeros((n_q, n_heads, dv)), np.zeros((n_q, n_heads))
    for h in range(n_heads):
        kh, vh = k[:, h // (n_heads // n_kv_heads)], v[:, h // (n_heads // n_kv_heads)]
        for q0 in range(0, n_q, plan.ATTN_BQ):
            rows = np.arange(q0, min(n_q, q0 + plan.ATTN_BQ))
            qpos = n_kv - n_q + rows
            parts = [_fwd_block(q[rows, h], kh, vh, qpos, plan_, sp, scale=p.scale,
                                causal=p.causal, window=p.window, softcap=p.softcap,
                                mask_rows=None if mask is None else mask[rows],
                                slope=slopes[h]) for sp in range(plan_.n_splits)]
            out[rows, h], lse[rows, h] = _finish(parts, None if sinks is None else sinks[h])
    return out, lse


def _finish(parts, sink):
    """attn_fwd's epilogue (one split) or attn_merge (several): normalised partials, then
    one softmax over their lse and the sink."""
    with np.errstate(divide="ignore", invalid="ignore"):
        outs = [np.where(l[:, None] > 0, acc / l[:, None], 0.0) for acc, _, l in parts]
        lses = [np.where(l > 0, m + np.log(l), -np.inf) for _, m, l in parts]
    big = np.max(lses, axis=0)
    if sink is not None:
        big = np.maximum(big, sink)
    base = np.where(big == -np.inf, 0.0, big)
    weights = [np.exp(x - base) for x in lses]
    den = sum(weights) + (np.exp(sink - base) if sink is not None else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den[:, None] > 0, sum(w[:, None] * o for w, o in zip(weights, outs))
                       / den[:, None], 0.0)
        lse = np.where(den > 0, base + np.log(den), -np.inf)
    return out, lse


ATTN_VARIANTS = [
    dict(),
    dict(causal=True),
    dict(causal=True, window=7),
    dict(window=5),
    dict(causal=True, softcap=1.0),
    dict(causal=True, max_bias=8.0),
    dict(causal=True, sinks=True),
    dict(mask=True),
]


@pytest.mark.parametrize("variant", ATTN_VARIANTS, ids=lambda v: ",".join(v) or "plain")
@pytest.mark.parametrize("n_q,n_kv,num_sms", [(1, 1, 132), (1, 300, 132), (1, 300, 20),
                                               (1, 1000, 64), (3, 113, 132), (20, 40, 132),
                                               (5, 3, 132)])
def test_kernel_algorithm_matches_the_oracle(variant, n_q, n_kv, num_sms):
    rng = np.random.default_rng(n_q * 1000 + n_kv)
    n_heads, n_kv_heads, dk, dv = 6, 2, 16, 12
    variant = dict(variant)
    if variant.get("causal") and n_q > n_kv:
        variant["causal"] = False
    q = rng.uniform(-1, 1, (n_q, n_heads, dk))
    k, v = rng.uniform(-1, 1, (n_kv, n_kv_heads, dk)), rng.uniform(-1, 1, (n_kv, n_kv_heads, dv))
    sinks = rng.uniform(-2, 2, n_heads) if variant.pop("sinks", False) else None
    mask = None
    if variant.pop("mask", False):
        mask = np.where(rng.random((n_q, n_kv)) < 0.2, -np.inf, rng.uniform(-2, 0, (n_q, n_kv)))
    p = AttnParams(scale=dk**-0.5, **variant)
    plan_ = plan.attn_plan(n_q, n_heads, dk, dv, n_kv, decode=n_q == 1, num_sms=num_sms)
    out, lse = emulate_attention(q, k, v, p, plan_, mask, sinks)
    want, want_lse = attn_ref.attention(q, k, v, scale=p.scale, causal=p.causal,
                                        window=p.window, mask=mask, softcap=p.softcap,
                                        max_bias=p.max_bias, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_emulated_split_path_is_exercised():
    assert plan.attn_plan(1, 6, 16, 12, 300, decode=True, num_sms=20).n_splits == 2
    assert plan.attn_plan(1, 6, 16, 12, 1000, decode=True, num_sms=64).n_splits > 2


def test_alibi_slopes_match_the_oracle():
    for n_heads in (1, 3, 8, 12):
        np.testing.assert_allclose(plan.alibi_slopes(n_heads, 8.0),
                                   attn_ref.alibi_slopes(n_heads, 8.0), rtol=1e-15)


# -- RoPE: cache key and angle scalars ----------------------------------------------------------
BASE_ROPE = RopeParams(n_dims=64, mode="neox", freq_base=10000.0, freq_scale=0.5,
                       ext_factor=1.0, attn_factor=0.9, n_ctx_orig=4096)
CHANGED = {"n_dims": 32, "mode": "normal", "freq_base": 1e6, "freq_scale": 0.25,
           "ext_factor": 0.5, "attn_factor": 1.0, "beta_fast": 16.0, "beta_slow": 2.0,
           "n_ctx_orig": 8192, "inverse": True}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_rope_cache_key_changes_with_every_parameter(field):
    base = plan.rope_cache_key(0, BASE_ROPE, None, 8192)
    other = dataclasses.replace(BASE_ROPE, **{field: CHANGED[field]})
    assert plan.rope_cache_key(0, other, None, 8192) != base


def test_rope_cache_key_covers_every_field_of_rope_params():
    fields = {f.name for f in dataclasses.fields(RopeParams)} - {"sections"}
    assert fields == set(CHANGED), "a new RopeParams field needs a cache-key test"
    a = dataclasses.replace(BASE_ROPE, mode="mrope", sections=(8, 12, 12, 0))
    b = dataclasses.replace(a, sections=(12, 8, 12, 0))
    assert plan.rope_cache_key(0, a, None, 8) != plan.rope_cache_key(0, b, None, 8)


def test_rope_cache_key_changes_with_freq_factors_device_and_rows():
    ff1 = plan.fingerprint(np.ones(32, np.float32).tobytes())
    ff2 = plan.fingerprint(np.full(32, 2.0, np.float32).tobytes())
    keys = {plan.rope_cache_key(0, BASE_ROPE, None, 8192),
            plan.rope_cache_key(0, BASE_ROPE, ff1, 8192),
            plan.rope_cache_key(0, BASE_ROPE, ff2, 8192),
            plan.rope_cache_key(1, BASE_ROPE, None, 8192),
            plan.rope_cache_key(0, BASE_ROPE, None, 4096)}
    assert len(keys) == 5
    # equal parameters share a table, whichever layer asks: there is no layer in the key
    again = dataclasses.replace(BASE_ROPE)
    assert plan.rope_cache_key(0, again, ff1, 8192) == plan.rope_cache_key(0, BASE_ROPE, ff1,
                                                                           8192)


def _kernel_angles(pos, scalars, freq_factors=None):
    """rope.cu's rope_angle, in NumPy double: (cos, sin) * mscale [n, n_dims/2]."""
    i = np.arange(scalars["n_dims"] // 2, dtype=np.float64)
    omega = np.exp2(-2.0 * i / scalars["n_dims"] * scalars["log2_base"])
    if freq_factors is not None:
        omega = omega / freq_factors.astype(np.float64)
    extrap = pos[:, None].astype(np.float64) * omega
    theta = scalars["freq_scale"] * extrap
    if scalars["ext_factor"] != 0.0:
        y = (i - scalars["corr_low"]) / max(0.001, scalars["corr_high"] - scalars["corr_low"])
        mix = (1.0 - np.clip(y, 0.0, 1.0)) * scalars["ext_factor"]
        theta = theta * (1.0 - mix) + extrap * mix
    return np.cos(theta) * scalars["mscale"], np.sin(theta) * scalars["mscale"]


@pytest.mark.parametrize("ext_factor,freq_scale", [(0.0, 1.0), (0.0, 0.25), (1.0, 0.25),
                                                   (0.5, 0.5)])
@pytest.mark.parametrize("with_ff", [False, True])
def test_rope_angle_scalars_reproduce_the_oracle_angles(ext_factor, freq_scale, with_ff):
    p = RopeParams(n_dims=128, freq_base=5e5, freq_scale=freq_scale, ext_factor=ext_factor,
                   attn_factor=0.7, n_ctx_orig=4096)
    ff = np.linspace(0.5, 4.0, 64).astype(np.float32) if with_ff else None
    pos = np.array([0, 1, 17, 2999, 131071], np.int32)
    cos, sin = _kernel_angles(pos, plan.rope_angle_scalars(p), ff)
    want_cos, want_sin = rope_ref.rope_angles(
        pos, n_dims=128, freq_base=5e5, freq_scale=freq_scale, ext_factor=ext_factor,
        n_ctx_orig=4096, freq_factors=ff, attn_factor=0.7)
    np.testing.assert_allclose(cos, want_cos, atol=1e-9)
    np.testing.assert_allclose(sin, want_sin, atol=1e-9)


def test_rope_use_scalars():
    assert plan.rope_use_scalars(BASE_ROPE)["mode"] == 1
    assert plan.rope_use_scalars(dataclasses.replace(BASE_ROPE, inverse=True))["sin_sign"] == -1
    mrope = dataclasses.replace(BASE_ROPE, mode="mrope", sections=(8, 12, 12, 0))
    assert [plan.rope_use_scalars(mrope)[k] for k in ("s0", "s1", "s2", "s3")] == [8, 12, 12, 0]


def _mrope_section(i, s):
    """rope.cu's mrope_section."""
    sector = i % sum(s)
    return 0 if sector < s[0] else 1 if sector < s[0] + s[1] else 2 if sector < sum(s[:3]) else 3


@pytest.mark.parametrize("sections", [(16, 24, 24, 0), (10, 10, 10, 10), (4, 6, 6, 0)])
def test_mrope_section_rule_matches_the_oracle(sections):
    rows = rope_ref.mrope_pair_rows(sections, 64)
    assert [_mrope_section(i, sections) for i in range(64)] == list(rows)


# -- CPY stride folding: cpy_kernel's indexing mirrored in NumPy --------------------------------
def _emulate_cpy(src, perm, step):
    strides = [s // src.itemsize for s in src.strides]
    shape4, st = plan.cpy_geometry(src.shape, strides, perm, step)
    flat, total = src.reshape(-1), int(np.prod(shape4))
    out = np.empty(total, src.dtype)
    for i in range(total):
        rest = i
        i3 = rest % shape4[3]
        rest //= shape4[3]
        i2 = rest % shape4[2]
        rest //= shape4[2]
        i1, i0 = rest % shape4[1], rest // shape4[1]
        out[i] = flat[i0 * st[0] + i1 * st[1] + i2 * st[2] + i3 * st[3]]
    return out.reshape(np.broadcast_to(0, src.shape).transpose(perm)[::step].shape)


def test_cpy_geometry_for_every_cpy_case():
    for case in SPECS["CPY"].cases():
        src = np.arange(np.prod(case["ne"])).reshape(case["ne"])
        perm, step = tuple(case["perm"]), case["step"]
        np.testing.assert_array_equal(_emulate_cpy(src, perm, step),
                                      src.transpose(perm)[::step], err_msg=case.id)


def test_cpy_geometry_handles_4d_and_strided_sources():
    src = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(_emulate_cpy(src, (3, 1, 0, 2), 2),
                                  src.transpose(3, 1, 0, 2)[::2])
    with pytest.raises(ValueError, match="up to 4 dims"):
        plan.cpy_geometry((1,) * 5, (1,) * 5, range(5), 1)
    with pytest.raises(ValueError, match="perm"):
        plan.cpy_geometry((2, 3), (3, 1), (0, 0), 1)


def test_cpy_paths_contiguous_and_32_bit_indices():
    assert plan.cpy_is_contiguous((4, 8, 16), (128, 16, 1), (0, 1, 2), 1)
    assert plan.cpy_is_contiguous((4, 1, 16), (16, 999, 1), (0, 1, 2), 1)  # extent 1: any stride
    assert not plan.cpy_is_contiguous((4, 8, 16), (128, 16, 1), (1, 0, 2), 1)  # permuted
    assert not plan.cpy_is_contiguous((4, 8, 16), (128, 16, 1), (0, 1, 2), 2)  # stepped
    assert not plan.cpy_is_contiguous((4, 8, 16), (256, 16, 1), (0, 1, 2), 1)  # a strided view
    # the --large CPY case: an f16 [32769, 256, 256] transposed, 2**31 + 65536 elements
    shape4, strides4 = plan.cpy_geometry((32769, 256, 256), (65536, 256, 1), (1, 0, 2), 1)
    assert not plan.cpy_fits_int32(shape4, strides4)
    assert plan.cpy_fits_int32(*plan.cpy_geometry((4096, 8, 128), (1024, 128, 1), (1, 0, 2), 1))
    # few elements, but a source offset past 2**31 (a step over a huge first dim)
    assert not plan.cpy_fits_int32((1, 1, 2, 4), (0, 0, 2**31, 1))
    # under 2**31 elements, but the grid-stride step past the last one would overflow an int
    grid = plan.grid_stride(2**31 - 2)
    assert grid.grid[0] * grid.block[0] + plan.CPY_I32_MAX_ELEMENTS <= plan.INT32_MAX
    assert not plan.cpy_fits_int32((1, 1, 1, 2**31 - 2), (0, 0, 0, 1))


# -- devices, streams, copies, errors, sources ---------------------------------------------------
def test_device_map_is_round_robin():
    assert plan.device_map(5, 2) == [0, 1, 0, 1, 0]
    assert plan.device_map(3, 1) == [0, 0, 0]
    with pytest.raises(ValueError):
        plan.device_map(1, 0)


@pytest.mark.parametrize("on", ["src", "dst"])
def test_copy_async_steps_order_the_copy_between_both_streams(on):
    steps = plan.copy_async_steps(0, 1, on)
    other = "dst" if on == "src" else "src"
    kinds = [(kind, side) for kind, side, _ in steps]
    copy = kinds.index(("copy", on))
    assert kinds.index(("wait", on)) < copy  # the runner waited for the other side first
    assert kinds.index(("wait", other)) > copy  # the other side waits for the copy
    assert steps[copy][2] == "peer"
    assert [s for s in steps if s[0] in ("record", "wait")][-1] == ("wait", other, "copied")
    assert plan.copy_async_steps(0, 0, on)[copy][2] == "device"


def test_decode_errors_names_every_bit():
    assert plan.decode_errors(0) == []
    assert len(plan.decode_errors(2 | 16)) == 2
    assert "unknown" in plan.decode_errors(1024)[-1]


def test_every_kernel_source_inlines_the_common_header():
    kernels = plan.module_kernels()
    for file_name, names in kernels.items():
        source = plan.load_source(file_name)
        assert "#include" not in source and "struct f16_t" in source
        for name in names:
            assert name.split("<")[0] in source, name
    every = [n for names in kernels.values() for n in names]
    assert len(every) == len(set(every))
    for ctype in plan.CTYPES.values():
        assert f"rope_kernel<{ctype}>" in every and f"kv_rotate_kernel<{ctype}>" in every
    assert plan.kernel_name("cpy_kernel", "bf16", "f16") in kernels["copies.cu"]


# -- host-side argument checks ------------------------------------------------------------------
def test_checks_name_the_bad_argument():
    x = np.zeros((3, 2, 64), np.float32)
    with pytest.raises(ValueError, match="n_dims=80 must be even and <= head_dim=64"):
        checks.check_rope(x, np.zeros(3, np.int32), x, RopeParams(n_dims=80), None)
    with pytest.raises(ValueError, match="pos dtype int64 must be int32"):
        checks.check_rope(x, np.zeros(3, np.int64), x, RopeParams(n_dims=64), None)
    q = np.zeros((2, 4, 8), np.float16)
    kv = np.zeros((5, 3, 8), np.float16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        checks.check_attention(q, kv, kv, q, AttnParams(scale=1.0), None, None, None, None)
    cache = np.zeros((4, 16, 1, 8), np.float16)
    paged = PagedKV(np.zeros((1, 2), np.int32), np.zeros(1, np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="mask is not supported with paged"):
        checks.check_attention(q[:, :1], cache, cache, q[:, :1], AttnParams(scale=1.0),
                               np.zeros((2, 5), np.float32), None, None, paged)
    with pytest.raises(ValueError, match=r"deltas shape \(2, 3\)"):
        checks.check_kv_rotate(cache, np.zeros(2, np.int32), np.zeros((2, 3), np.int32),
                               np.zeros((4, 8), np.float32), "rotate_half")
    with pytest.raises(ValueError, match=r"out shape \(3, 2\) must be \(2, 3\)"):
        checks.check_cpy(np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float16), (1, 0), 1)
    with pytest.raises(ValueError, match="slots shape"):
        checks.check_rows("set_rows", np.zeros((9, 4), np.float32), np.zeros((3, 4), np.float16),
                          np.zeros(2, np.int32), "slots", ("dst", "src"))


# -- availability without a GPU ------------------------------------------------------------------
def test_available_explains_why_not_here():
    ok, reason = CupyBackend.available()
    if ok:
        pytest.skip(f"a GPU is present ({reason})")
    assert reason and ("cupy" in reason or "driver" in reason or "device" in reason)
    with pytest.raises(RuntimeError, match="unavailable"):
        CupyBackend().devices(1)


def test_available_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    ok, reason = CupyBackend.available()
    assert not ok and "pip install 'opbench[cupy]'" in reason


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="unknown cupy backend option"):
        CupyBackend(rope_cahce=False)


def test_lead_stride_accepts_views_with_contiguous_rows_only():
    store = np.zeros((6, 2, 3, 4), np.float16)
    k = store[:, 0]
    assert checks.lead_stride("k", k.shape, k.strides, k.itemsize) == 2 * 3 * 4
    blocks = k.reshape(6, 1, 3, 4)
    assert checks.lead_stride("k", blocks.shape, blocks.strides, blocks.itemsize) == 24
    flat = np.zeros((5, 7), np.float32)
    assert checks.lead_stride("x", flat.shape, flat.strides, flat.itemsize) == 7
    one = flat[:1]
    assert checks.lead_stride("x", one.shape, one.strides, one.itemsize) == 7
    with pytest.raises(ValueError, match="each row must be contiguous"):
        t = flat.T
        checks.lead_stride("x", t.shape, t.strides, t.itemsize)


def test_package_imports_without_cupy():
    import os
    import subprocess

    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupy_backends'] = None\n"
            "from opbench.backends.cupy import CupyBackend, nvrtc\n"
            "print(CupyBackend.available()[1]); print(nvrtc.nvrtc_available()[1])")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("pip install 'opbench[cupy]'") == 2
