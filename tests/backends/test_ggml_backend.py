"""The ggml backend (ggml's CPU kernels via ggml-python) against the float64 oracles."""

from __future__ import annotations

import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from opbench.backends.ggml_backend import GgmlBackend, _permute_axes, attention_mask
from opbench.harness.cases import Case
from opbench.protocol import AttnParams, PagedKV, RopeParams, numpy_dtype
from opbench.reference import attention as attn_ref
from opbench.reference import copies as copy_ref
from opbench.reference import rope as rope_ref

ok, why = GgmlBackend.available()
needs_ggml = pytest.mark.skipif(not ok, reason=why)


def test_module_imports_and_reports_install_hint_without_ggml():
    code = ("import sys; sys.modules['ggml'] = None\n"
            "from opbench.backends.ggml_backend import GgmlBackend\n"
            "print(GgmlBackend.available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == str((False, "pip install 'opbench[ggml]'"))


def test_known_failures_are_valid_regexes_with_evidence():
    from opbench.backends.ggml_known_failures import KNOWN_FAILURES

    assert KNOWN_FAILURES
    for pattern, reason, _may_pass in KNOWN_FAILURES:
        re.compile(pattern)
        assert re.search(r"\d", reason), "a known failure needs measured evidence"


@pytest.mark.parametrize("perm", [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0)])
def test_permute_axes_reproduce_numpy_transpose(perm):
    # ggml_permute puts source dim i at axes[i]; ggml dims are NumPy dims reversed
    shape = (2, 3, 5)
    ggml_ne = list(reversed(shape)) + [1]
    permuted = [0] * 4
    for i, axis in enumerate(_permute_axes(perm)):
        permuted[axis] = ggml_ne[i]
    assert tuple(reversed(permuted[:3])) == np.empty(shape).transpose(perm).shape


def test_alibi_mask_holds_key_minus_query_position_and_minus_inf():
    # ggml multiplies the mask by the slope, so the mask must carry (kpos - qpos) itself
    rel = np.arange(2, 4)[:, None] - np.arange(4)[None, :]  # n_q=2, n_kv=4
    mask = attention_mask(rel, AttnParams(scale=1.0, causal=True, max_bias=8.0))
    assert mask.dtype == np.float16
    assert mask.tolist() == [[-2, -1, 0, -np.inf], [-3, -2, -1, 0]]
    assert attention_mask(rel, AttnParams(scale=1.0)) is None  # nothing to mask: no tensor


def test_supports_declares_what_ggml_cannot_do_with_reasons():
    backend = GgmlBackend()
    attn_lse = Case.make("ATTN", type="f32", lse=1)
    mask_alibi = Case.make("ATTN", type="f32", mask=1, mb=8.0, lse=0)
    kv_rotate = Case.make("KV_ROTATE", type="f32")
    assert "log-sum-exp" in backend.supports(attn_lse)
    assert "slope" in backend.supports(mask_alibi)
    assert "K-shift" in backend.supports(kv_rotate)
    assert backend.supports(Case.make("ATTN", type="f16", mask=1, mb=0.0, lse=0)) is True


@pytest.fixture(scope="module")
def backend():
    if not ok:
        pytest.skip(why)
    b = GgmlBackend()
    b.devices(1)
    return b


# -- ROPE --------------------------------------------------------------------------------------

ROPE_VARIANTS = [
    dict(mode="normal", n_dims=32),
    dict(mode="neox", n_dims=16),
    dict(mode="neox", n_dims=32, freq_scale=0.25, ext_factor=1.0, attn_factor=0.7),
    dict(mode="normal", n_dims=32, freq_base=1e6, inverse=True),
    dict(mode="mrope", n_dims=32, sections=(4, 6, 4, 2)),
    dict(mode="mrope", n_dims=32, sections=(2, 3, 3, 0), inverse=True),
]


@needs_ggml
@pytest.mark.parametrize("variant", ROPE_VARIANTS, ids=lambda v: ",".join(map(str, v.values())))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_rope_matches_oracle(backend, variant, dtype):
    rng = np.random.default_rng(11)
    x = rng.uniform(-1, 1, (5, 3, 32)).astype(numpy_dtype(dtype))
    rows = 4 if variant["mode"] == "mrope" else 1
    pos = rng.integers(0, 200, (rows, 5)).astype(np.int32)
    pos = pos if rows == 4 else pos[0]
    ff = rng.uniform(0.5, 4.0, variant["n_dims"] // 2).astype(np.float32)
    p = RopeParams(n_ctx_orig=4096, **variant)
    out = np.full_like(x, np.nan)
    backend.rope(x, pos, out, p, freq_factors=ff)
    expected = rope_ref.rope(x, pos, n_dims=p.n_dims, mode=p.mode, freq_base=p.freq_base,
                             freq_scale=p.freq_scale, ext_factor=p.ext_factor,
                             attn_factor=p.attn_factor, n_ctx_orig=p.n_ctx_orig,
                             freq_factors=ff, sections=p.sections, inverse=p.inverse)
    atol = {"f32": 2e-5, "f16": 2e-3, "bf16": 1.6e-2}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=atol)


# -- ATTN --------------------------------------------------------------------------------------

def _qkv(rng, n_q, n_kv, dtype="f32", heads=4, kv_heads=2, dk=16, dv=8):
    t = numpy_dtype(dtype)
    return (rng.uniform(-1, 1, (n_q, heads, dk)).astype(t),
            rng.uniform(-1, 1, (n_kv, kv_heads, dk)).astype(t),
            rng.uniform(-1, 1, (n_kv, kv_heads, dv)).astype(t))


ATTN_VARIANTS = {
    "plain": dict(),
    "causal-gqa": dict(causal=True),
    "window": dict(causal=True, window=3),
    "softcap": dict(causal=True, softcap=1.0),
    "alibi": dict(causal=True, max_bias=8.0),
    "alibi-noncausal": dict(max_bias=8.0),
}


@needs_ggml
@pytest.mark.parametrize("name", list(ATTN_VARIANTS))
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_matches_oracle(backend, name, with_sinks):
    rng = np.random.default_rng(12)
    q, k, v = _qkv(rng, 3, 11)
    sinks = rng.uniform(-2, 2, 4).astype(np.float32) if with_sinks else None
    options = ATTN_VARIANTS[name]
    out = np.full((3, 4, 8), np.nan, np.float32)
    backend.attention(q, k, v, out, AttnParams(scale=0.3, **options), sinks=sinks)
    want = attn_ref.attention(q, k, v, scale=0.3, sinks=sinks, **options)
    np.testing.assert_allclose(out, want, atol=1e-5)


@needs_ggml
def test_attention_with_f16_representable_mask_matches_oracle(backend):
    # masks go to ggml as f16; one whose values f16 holds exactly must then match tightly
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, 3, 11)
    mask = np.round(rng.uniform(-2, 0, (3, 11)) * 64) / 64
    mask[0, :4] = -np.inf
    mask = mask.astype(np.float32)
    out = np.full((3, 4, 8), np.nan, np.float32)
    backend.attention(q, k, v, out, AttnParams(scale=0.3), mask=mask)
    np.testing.assert_allclose(out, attn_ref.attention(q, k, v, scale=0.3, mask=mask),
                               atol=1e-5)


@needs_ggml
def test_attention_bf16_output_is_rounded_from_f32_result(backend):
    rng = np.random.default_rng(14)
    q, k, v = _qkv(rng, 2, 9, dtype="bf16")
    out = np.full((2, 4, 8), np.nan, ml_dtypes.bfloat16)
    backend.attention(q, k, v, out, AttnParams(scale=0.25, causal=True))
    want = attn_ref.attention(q, k, v, scale=0.25, causal=True)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=8e-3)


@needs_ggml
def test_paged_attention_over_unified_cache_matches_oracle(backend):
    rng = np.random.default_rng(15)
    block, heads, kv_heads, dk = 4, 4, 2, 16
    k_cache = rng.uniform(-1, 1, (9, block, kv_heads, dk)).astype(np.float32)
    v_cache = rng.uniform(-1, 1, (9, block, kv_heads, dk)).astype(np.float32)
    table = np.array([[7, 2, 5], [0, 8, -1]], dtype=np.int32)
    seq_lens = np.array([11, 6], dtype=np.int32)
    q = rng.uniform(-1, 1, (4, heads, dk)).astype(np.float32)
    q_start = np.array([0, 3, 4], dtype=np.int32)
    sinks = rng.uniform(-2, 2, heads).astype(np.float32)
    p = AttnParams(scale=0.25, causal=True, window=5, max_bias=8.0)
    out = np.full((4, heads, dk), np.nan, np.float32)
    backend.attention(q, k_cache, v_cache, out, p, sinks=sinks,
                      paged=PagedKV(table, seq_lens, q_start))
    want = attn_ref.paged_attention(q, k_cache, v_cache, table, seq_lens, np.array([3, 1]),
                                    scale=0.25, causal=True, window=5, max_bias=8.0,
                                    sinks=sinks)
    np.testing.assert_allclose(out, want, atol=1e-5)


# -- copies --------------------------------------------------------------------------------------

def _wide(rng, shape, dtype):
    values = rng.uniform(-1, 1, shape) * 2.0 ** rng.integers(-12, 12, shape)
    return values.astype(numpy_dtype(dtype))


@needs_ggml
@pytest.mark.parametrize("src_type,dst_type", [("f32", "bf16"), ("bf16", "f16"), ("f16", "f32"),
                                               ("f16", "f16")])
def test_set_rows_skips_minus_one_and_converts_bit_exactly(backend, src_type, dst_type):
    rng = np.random.default_rng(16)
    src = _wide(rng, (5, 2, 8), src_type)
    dst = rng.uniform(-1, 1, (9, 2, 8)).astype(numpy_dtype(dst_type))
    slots = np.array([3, -1, 0, 8, -1], dtype=np.int32)
    want = copy_ref.set_rows(dst, src, slots)
    backend.set_rows(dst, src, slots)
    assert np.array_equal(dst.view(np.uint8), want.view(np.uint8))


@needs_ggml
@pytest.mark.parametrize("src_type,dst_type", [("bf16", "f32"), ("f32", "f16"), ("f16", "bf16")])
def test_get_rows_bit_exact(backend, src_type, dst_type):
    rng = np.random.default_rng(17)
    src = _wide(rng, (6, 3, 4), src_type)
    rows = np.array([5, 0, 5, 2], dtype=np.int32)
    out = np.full((4, 3, 4), np.nan, numpy_dtype(dst_type))
    backend.get_rows(src, rows, out)
    want = copy_ref.get_rows(src, rows, dst_type)
    assert np.array_equal(out.view(np.uint8), want.view(np.uint8))


@needs_ggml
@pytest.mark.parametrize("perm", [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1)])
@pytest.mark.parametrize("step", [1, 2])
def test_cpy_permuted_strided_bit_exact(backend, perm, step):
    # (2, 1, 0) with step 2 strides the source's fastest dim: the ggml_cont path
    rng = np.random.default_rng(18)
    src = _wide(rng, (5, 3, 6), "f32")
    want = copy_ref.cpy(src, "f16", perm=perm, step=step)
    out = np.full(want.shape, np.nan, np.float16)
    backend.cpy(src, out, perm, step)
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


# -- through the harness runner ---------------------------------------------------------------

@needs_ggml
@pytest.mark.parametrize("op", ["ROPE", "ATTN", "SET_ROWS", "GET_ROWS", "CPY"])
def test_runner_passes_a_quick_case_per_op(backend, op):
    from opbench.harness.ops import SPECS
    from opbench.harness.runner import run_case

    cases = [c for c in SPECS[op].cases() if c.dtype == "f32" and backend.supports(c) is True]
    case = min(cases, key=SPECS[op].cost)
    record = run_case(backend, case)  # no known failures applied: this case must pass outright
    assert record["status"] == "OK", record["reason"]
