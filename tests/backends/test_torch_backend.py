"""The torch backend against the float64 oracles, op by op, on small seeded inputs."""

from __future__ import annotations

import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from opbench.backends import torch_backend
from opbench.backends.torch_backend import TorchBackend
from opbench.protocol import AttnParams, PagedKV, RopeParams
from opbench.reference import attention as attn_ref
from opbench.reference import copies as copy_ref
from opbench.reference import kv_cache as kv_ref
from opbench.reference import rope as rope_ref

ok, why = TorchBackend.available()
needs_torch = pytest.mark.skipif(not ok, reason=why)


def test_module_imports_and_reports_install_hint_without_torch():
    # a fresh interpreter where `import torch` fails, as on a machine without the extra
    code = ("import sys; sys.modules['torch'] = None\n"
            "from opbench.backends.torch_backend import TorchBackend\n"
            "print(TorchBackend.available())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == str((False, "pip install 'opbench[torch]'"))


def test_known_failures_are_valid_regexes_with_evidence():
    from opbench.backends.torch_known_failures import KNOWN_FAILURES

    for pattern, reason, _may_pass in KNOWN_FAILURES:
        re.compile(pattern)
        assert len(reason) > 40, "a known failure needs its reason and evidence"


@pytest.fixture(scope="module")
def backend():
    if not ok:
        pytest.skip(why)
    b = TorchBackend()
    b.devices(1)
    return b


def run(backend, method, *host_arrays, out_shape=None, out_dtype=None, **kwargs):
    """Upload, call ``method`` with a NaN-poisoned output, download the output."""
    args = [backend.to_device(a) for a in host_arrays]
    out = backend.to_device(np.full(out_shape, np.nan, dtype=out_dtype))
    getattr(backend, method)(*args, out, **kwargs)
    backend.synchronize()
    return backend.to_host(out)


# -- memory ----------------------------------------------------------------------------------

@needs_torch
def test_bf16_round_trips_bit_exactly(backend):
    host = np.random.default_rng(0).standard_normal(37).astype(ml_dtypes.bfloat16)
    back = backend.to_host(backend.to_device(host))
    assert back.dtype == host.dtype
    assert np.array_equal(back.view(np.uint16), host.view(np.uint16))


@needs_torch
def test_view_writes_land_in_the_flat_buffer(backend):
    flat = backend.to_device(np.zeros(10, dtype=np.float32))
    backend.view(flat, 2, (2, 3))[1, 2] = 5.0
    assert backend.to_host(flat)[7] == 5.0


# -- ROPE --------------------------------------------------------------------------------------

ROPE_VARIANTS = [
    dict(mode="normal", n_dims=32),
    dict(mode="neox", n_dims=16),  # partial rotation: dims past n_dims pass through
    dict(mode="neox", n_dims=32, freq_scale=0.25, ext_factor=1.0, attn_factor=0.7),  # YaRN
    dict(mode="normal", n_dims=32, freq_base=1e6, inverse=True),
    dict(mode="mrope", n_dims=32, sections=(4, 6, 4, 2)),
    dict(mode="mrope", n_dims=32, sections=(2, 3, 3, 0)),  # sections cycle over the pairs
]


@needs_torch
@pytest.mark.parametrize("variant", ROPE_VARIANTS, ids=lambda v: ",".join(map(str, v.values())))
@pytest.mark.parametrize("with_ff", [False, True])
def test_rope_matches_oracle(backend, variant, with_ff):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (5, 3, 32)).astype(np.float32)
    rows = 4 if variant["mode"] == "mrope" else 1
    pos = rng.integers(0, 200, (rows, 5)).astype(np.int32)
    pos = pos if rows == 4 else pos[0]
    ff = rng.uniform(0.5, 4.0, variant["n_dims"] // 2).astype(np.float32) if with_ff else None
    p = RopeParams(n_ctx_orig=4096, **variant)
    args = [x, pos] + ([ff] if with_ff else [])
    b_args = [backend.to_device(a) for a in args]
    out = backend.to_device(np.full(x.shape, np.nan, np.float32))
    backend.rope(b_args[0], b_args[1], out, p, freq_factors=b_args[2] if with_ff else None)
    expected = rope_ref.rope(x, pos, n_dims=p.n_dims, mode=p.mode, freq_base=p.freq_base,
                             freq_scale=p.freq_scale, ext_factor=p.ext_factor,
                             attn_factor=p.attn_factor, n_ctx_orig=p.n_ctx_orig,
                             freq_factors=ff, sections=p.sections, inverse=p.inverse)
    np.testing.assert_allclose(backend.to_host(out), expected, atol=2e-5)


@needs_torch
def test_rope_inverse_undoes_forward(backend):
    x = np.random.default_rng(2).uniform(-1, 1, (4, 2, 16)).astype(np.float32)
    pos = np.array([3, 0, 90, 17], dtype=np.int32)
    fwd = run(backend, "rope", x, pos, out_shape=x.shape, out_dtype=np.float32,
              p=RopeParams(n_dims=16, mode="neox"))
    back = run(backend, "rope", fwd, pos, out_shape=x.shape, out_dtype=np.float32,
               p=RopeParams(n_dims=16, mode="neox", inverse=True))
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_yarn_corr_dims_match_ggml_formula():
    # ggml_rope_yarn_corr_dims(128, 4096, 10000, 32, 1): floor(20.94) and ceil(45.03)
    assert torch_backend.yarn_corr_dims(128, 4096, 10000.0, 32.0, 1.0) == (20.0, 46.0)


# -- ATTN --------------------------------------------------------------------------------------

def _qkv(rng, n_q, n_kv, heads=4, kv_heads=2, dk=16, dv=8):
    q = rng.uniform(-1, 1, (n_q, heads, dk)).astype(np.float32)
    k = rng.uniform(-1, 1, (n_kv, kv_heads, dk)).astype(np.float32)
    v = rng.uniform(-1, 1, (n_kv, kv_heads, dv)).astype(np.float32)
    return q, k, v


ATTN_VARIANTS = {
    "plain": dict(),
    "causal-gqa": dict(causal=True),
    "window": dict(causal=True, window=3),
    "softcap": dict(causal=True, softcap=1.0),
    "alibi": dict(causal=True, max_bias=8.0),
    "alibi-noncausal": dict(max_bias=8.0),
}


@needs_torch
@pytest.mark.parametrize("name", list(ATTN_VARIANTS))
@pytest.mark.parametrize("extras", ["", "mask", "sinks", "lse"])
def test_attention_matches_oracle(backend, name, extras):
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 3, 11)
    options = ATTN_VARIANTS[name]
    mask = rng.uniform(-2, 0, (3, 11)).astype(np.float32) if extras == "mask" else None
    sinks = rng.uniform(-2, 2, 4).astype(np.float32) if extras == "sinks" else None
    p = AttnParams(scale=0.3, **options)
    dev = {n: backend.to_device(a) for n, a in
           dict(q=q, k=k, v=v, mask=mask, sinks=sinks).items() if a is not None}
    out = backend.to_device(np.full((3, 4, 8), np.nan, np.float32))
    lse = backend.to_device(np.full((3, 4), np.nan, np.float32)) if extras == "lse" else None
    backend.attention(dev["q"], dev["k"], dev["v"], out, p, mask=dev.get("mask"),
                      sinks=dev.get("sinks"), lse=lse)
    want, want_lse = attn_ref.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True,
                                        **{"scale": 0.3, **options})
    np.testing.assert_allclose(backend.to_host(out), want, atol=1e-5)
    if lse is not None:
        np.testing.assert_allclose(backend.to_host(lse), want_lse, atol=1e-5)


@needs_torch
def test_attention_row_with_no_visible_key_gives_zero_and_minus_inf_lse(backend):
    q, k, v = _qkv(np.random.default_rng(4), 2, 5)
    mask = np.zeros((2, 5), np.float32)
    mask[0] = -np.inf
    for want_lse in (False, True):
        out = backend.to_device(np.full((2, 4, 8), np.nan, np.float32))
        lse = backend.to_device(np.full((2, 4), np.nan, np.float32)) if want_lse else None
        backend.attention(backend.to_device(q), backend.to_device(k), backend.to_device(v), out,
                          AttnParams(scale=0.25), mask=backend.to_device(mask), lse=lse)
        assert np.all(backend.to_host(out)[0] == 0.0)
        assert np.isfinite(backend.to_host(out)[1]).all()
        if want_lse:
            assert np.all(backend.to_host(lse)[0] == -np.inf)


@needs_torch
def test_paged_attention_matches_oracle(backend):
    rng = np.random.default_rng(5)
    block, heads, kv_heads, dk = 4, 4, 2, 16
    k_cache = rng.uniform(-1, 1, (9, block, kv_heads, dk)).astype(np.float32)
    v_cache = rng.uniform(-1, 1, (9, block, kv_heads, dk)).astype(np.float32)
    table = np.array([[7, 2, 5], [0, 8, -1]], dtype=np.int32)
    seq_lens = np.array([11, 6], dtype=np.int32)
    q_lens = np.array([3, 1])
    q = rng.uniform(-1, 1, (4, heads, dk)).astype(np.float32)
    q_start = np.array([0, 3, 4], dtype=np.int32)
    sinks = rng.uniform(-2, 2, heads).astype(np.float32)
    p = AttnParams(scale=0.25, causal=True, window=5, max_bias=8.0)
    d = backend.to_device
    out = d(np.full((4, heads, dk), np.nan, np.float32))
    lse = d(np.full((4, heads), np.nan, np.float32))
    backend.attention(d(q), d(k_cache), d(v_cache), out, p, sinks=d(sinks), lse=lse,
                      paged=PagedKV(d(table), d(seq_lens), d(q_start)))
    want, want_lse = attn_ref.paged_attention(q, k_cache, v_cache, table, seq_lens, q_lens,
                                              scale=0.25, causal=True, window=5, max_bias=8.0,
                                              sinks=sinks, return_lse=True)
    np.testing.assert_allclose(backend.to_host(out), want, atol=1e-5)
    np.testing.assert_allclose(backend.to_host(lse), want_lse, atol=1e-5)


# -- KV_ROTATE and copies -----------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("per_token", [False, True])
def test_kv_rotate_matches_oracle(backend, layout, per_token):
    rng = np.random.default_rng(6)
    cache = rng.uniform(-1, 1, (6, 4, 2, 16)).astype(np.float32)
    blocks = np.array([4, 1], dtype=np.int32)
    deltas = rng.integers(1, 8, (2, 4 if per_token else 1)).astype(np.int32)
    lut = kv_ref.rotation_lut(8, 16, 4, 10000.0)
    dev = backend.to_device(cache)
    backend.kv_rotate(dev, backend.to_device(blocks), backend.to_device(deltas),
                      backend.to_device(lut), layout)
    want = kv_ref.rotate_keys(cache, blocks, deltas, lut, layout=layout)
    np.testing.assert_allclose(backend.to_host(dev), want, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("src_type,dst_type", [("f32", "bf16"), ("bf16", "f16"), ("f16", "f32")])
def test_set_and_get_rows_are_bit_exact(backend, src_type, dst_type):
    from opbench.protocol import numpy_dtype

    rng = np.random.default_rng(7)
    src = (rng.uniform(-1, 1, (5, 2, 8)) * 2.0 ** rng.integers(-10, 10, (5, 2, 8)))
    src = src.astype(numpy_dtype(src_type))
    dst = rng.uniform(-1, 1, (9, 2, 8)).astype(numpy_dtype(dst_type))
    slots = np.array([3, -1, 0, 8, -1], dtype=np.int32)
    dev = backend.to_device(dst)
    backend.set_rows(dev, backend.to_device(src), backend.to_device(slots))
    want = copy_ref.set_rows(dst, src, slots)
    assert np.array_equal(backend.to_host(dev).view(np.uint8), want.view(np.uint8))
    rows = np.array([4, 4, 0], dtype=np.int32)
    got = run(backend, "get_rows", src, rows, out_shape=(3, 2, 8),
              out_dtype=numpy_dtype(dst_type))
    want = copy_ref.get_rows(src, rows, dst_type)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@needs_torch
@pytest.mark.parametrize("perm,step", [((0, 1, 2), 1), ((2, 1, 0), 2), ((1, 0, 2), 2)])
def test_cpy_permuted_strided_rounds_to_nearest_even(backend, perm, step):
    rng = np.random.default_rng(8)
    src = (rng.uniform(-1, 1, (5, 3, 6)) * 2.0 ** rng.integers(-12, 12, (5, 3, 6)))
    src = src.astype(np.float32)
    want = copy_ref.cpy(src, "bf16", perm=perm, step=step)
    got = run(backend, "cpy", src, out_shape=want.shape, out_dtype=ml_dtypes.bfloat16,
              perm=perm, step=step)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


# -- through the harness runner: one case per op from the real tables --------------------------

@needs_torch
@pytest.mark.parametrize("op", ["ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS", "CPY"])
def test_runner_passes_a_quick_case_per_op(backend, op):
    from opbench.harness.ops import SPECS
    from opbench.harness.runner import run_case

    cases = [c for c in SPECS[op].cases() if c.dtype == "f32"]
    case = min(cases, key=SPECS[op].cost)  # the cheapest f32 case keeps this fast
    record = run_case(backend, case)  # no known failures applied: this case must pass outright
    assert record["status"] == "OK", record["reason"]
