"""Properties of the RoPE oracles (issue 2) that a wrong oracle would fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opbench.reference.rope import (
    hf_inv_freq,
    hf_to_ggml,
    mrope_pair_rows,
    rope,
    rope_angles,
    rope_frequencies,
    rope_inv_freq,
    yarn_corr_dims,
)

YARN = dict(freq_scale=0.25, ext_factor=1.0, n_ctx_orig=4096, beta_fast=32.0, beta_slow=1.0)
SECTIONS = (2, 1, 1, 0)
#: (mode, extra rope kwargs) covering every mode, freq_factors and YaRN
VARIANTS = [
    ("normal", {}),
    ("neox", {}),
    ("mrope", {"sections": SECTIONS}),
    ("normal", {"freq_factors": np.linspace(1.0, 4.0, 8), "freq_base": 500.0}),
    ("neox", dict(YARN, attn_factor=0.8)),
    ("mrope", dict(YARN, sections=(3, 2, 2, 1))),
]
VARIANT_IDS = ["normal", "neox", "mrope", "normal-ff", "neox-yarn", "mrope-yarn"]


def make_x(seed: int, n_tokens: int = 5, n_heads: int = 3, head_dim: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n_tokens, n_heads, head_dim))


def make_pos(seed: int, mode: str, n_tokens: int = 5, rows_equal: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if mode != "mrope":
        return rng.integers(-3000, 3000, n_tokens)
    if rows_equal:
        return np.tile(rng.integers(-3000, 3000, n_tokens), (4, 1))
    return rng.integers(-3000, 3000, (4, n_tokens))


def pairs(y: np.ndarray, mode: str, n_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """First and second members of every rotated pair, written out independently of the oracle."""
    if mode == "normal":
        return y[..., 0:n_dims:2], y[..., 1:n_dims:2]
    return y[..., : n_dims // 2], y[..., n_dims // 2 : n_dims]


# -- values computed by hand ---------------------------------------------------------------------
# n_dims 4, base 100: theta_scale = 100**(-2/4) = 0.1; p = 2 -> angles 2 and 0.2.
X_HAND = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])
C2, S2, C02, S02 = math.cos(2), math.sin(2), math.cos(0.2), math.sin(0.2)


def test_normal_mode_hand_values():
    # pairs (1, 2) at angle 2 and (3, 4) at angle 0.2; 5, 6 pass through
    want = [1 * C2 - 2 * S2, 1 * S2 + 2 * C2, 3 * C02 - 4 * S02, 3 * S02 + 4 * C02, 5, 6]
    got = rope(X_HAND, [2], n_dims=4, mode="normal", freq_base=100.0)
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-15)
    assert got[0, 0, 0] == pytest.approx(-2.234741690198506, rel=1e-14)


def test_neox_mode_hand_values():
    # pairs (x0, x2) = (1, 3) at angle 2 and (x1, x3) = (2, 4) at angle 0.2
    want = [1 * C2 - 3 * S2, 2 * C02 - 4 * S02, 1 * S2 + 3 * C2, 2 * S02 + 4 * C02, 5, 6]
    got = rope(X_HAND, [2], n_dims=4, mode="neox", freq_base=100.0)
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-15)
    assert got[0, 0, 0] == pytest.approx(-3.1440391170241875, rel=1e-14)


def test_freq_factors_and_inverse_hand_values():
    # freq_factors (1, 0.1) make pair 1's theta 0.2 / 0.1 = 2; inverse negates sin
    got = rope(X_HAND, [2], n_dims=4, freq_base=100.0, freq_factors=[1.0, 0.1], inverse=True)
    want = [1 * C2 + 2 * S2, -1 * S2 + 2 * C2, 3 * C2 + 4 * S2, -3 * S2 + 4 * C2, 5, 6]
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-14)


def test_yarn_corr_dims_and_ramp_hand_values():
    """n_dims 128, base 1e4, n_ctx_orig 4096: corr(32) = 128 ln(4096/(64 pi)) / (2 ln 1e4)
    = 20.94 -> low 20; corr(1) = 45.03 -> high 46.  Pair 33 sits at ramp (1 - 13/26) = 0.5, so
    with ext_factor 1 its theta is theta_extrap * (0.25 * 0.5 + 0.5).  The ramp takes the pair
    index (ggml halves its i0 = 2i); with i0 itself pair 33 would get ramp 0."""
    assert yarn_corr_dims(128, 4096, 10000.0, 32.0, 1.0) == (20.0, 46.0)
    x = np.zeros((1, 1, 128))
    x[0, 0, 0::2] = 1.0  # unit vector on the first member of every normal-mode pair
    got = rope(x, [1000], n_dims=128, **YARN)
    mscale = 1 + 0.1 * math.log(4)  # 1.1386...
    for pair, factor in [(10, 1.0), (20, 1.0), (33, 0.625), (46, 0.25), (60, 0.25)]:
        theta = 1000 * 10000 ** (-2 * pair / 128) * factor
        want = [mscale * math.cos(theta), mscale * math.sin(theta)]
        np.testing.assert_allclose(got[0, 0, 2 * pair : 2 * pair + 2], want, rtol=1e-12)


def test_rope_angles_hand_values_and_mscale():
    cos, sin = rope_angles(np.array([2, -1]), n_dims=4, freq_base=100.0, attn_factor=3.0)
    np.testing.assert_allclose(cos, 3 * np.cos([[2, 0.2], [-1, -0.1]]), rtol=1e-15)
    np.testing.assert_allclose(sin, 3 * np.sin([[2, 0.2], [-1, -0.1]]), rtol=1e-15)
    omega, mscale = rope_frequencies(n_dims=4, freq_base=100.0, freq_scale=0.5)
    np.testing.assert_allclose(omega, [0.5, 0.05], rtol=1e-15)
    assert mscale == 1.0


def test_mrope_rows_follow_sections():
    # sections (2, 1, 1, 0), sum 4: sectors of pairs 0..7 are 0,1,2,3,0,1,2,3 -> rows t,t,h,w
    np.testing.assert_array_equal(mrope_pair_rows((2, 1, 1, 0), 8), [0, 0, 1, 2, 0, 0, 1, 2])
    # an empty section is skipped: (0, 2, 0, 1) -> rows h,h,e
    np.testing.assert_array_equal(mrope_pair_rows((0, 2, 0, 1), 6), [1, 1, 3, 1, 1, 3])


def test_mrope_pair_uses_its_section_row():
    x, pos = make_x(1, head_dim=16), make_pos(2, "mrope")
    got = rope(x, pos, n_dims=16, mode="mrope", sections=SECTIONS)
    rows = mrope_pair_rows(SECTIONS, 8)
    for row in range(3):
        from_row = rope(x, pos[row], n_dims=16, mode="neox")
        first, second = pairs(got, "neox", 16), pairs(from_row, "neox", 16)
        for part, ref in zip(first, second):
            np.testing.assert_array_equal(part[..., rows == row], ref[..., rows == row])


# -- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_pair_norm_kept(mode, extra):
    extra = {k: v for k, v in extra.items() if k not in ("ext_factor", "attn_factor")}
    x, pos = make_x(3), make_pos(4, mode)
    y = rope(x, pos, n_dims=16, mode=mode, **extra)
    (a, b), (ya, yb) = pairs(x, mode, 16), pairs(y, mode, 16)
    np.testing.assert_allclose(np.hypot(ya, yb), np.hypot(a, b), rtol=1e-13)


def test_pair_norm_scaled_by_mscale():
    x, pos = make_x(5), make_pos(6, "neox")
    y = rope(x, pos, n_dims=16, mode="neox", **YARN, attn_factor=0.5)
    (a, b), (ya, yb) = pairs(x, "neox", 16), pairs(y, "neox", 16)
    mscale = 0.5 * (1 + 0.1 * math.log(4))
    np.testing.assert_allclose(np.hypot(ya, yb), mscale * np.hypot(a, b), rtol=1e-13)


def rotated_dots(mode, extra, q, k, pos_q, pos_k):
    rq = rope(q, pos_q, n_dims=16, mode=mode, **extra)
    rk = rope(k, pos_k, n_dims=16, mode=mode, **extra)
    return np.einsum("thd,thd->th", rq[..., :16], rk[..., :16])


@pytest.mark.parametrize(("mode", "extra"), VARIANTS, ids=VARIANT_IDS)
@settings(max_examples=15, deadline=None)
@given(shift=st.integers(-100_000, 100_000), seed=st.integers(0, 2**16))
def test_dot_product_depends_only_on_relative_position(mode, extra, shift, seed):
    q, k = make_x(seed), make_x(seed + 1)
    pos_q = make_pos(seed, mode, rows_equal=True)
    pos_k = make_pos(seed + 2, mode, rows_equal=True)
    before = rotated_dots(mode, extra, q, k, pos_q, pos_k)
    after = rotated_dots(mode, extra, q, k, pos_q + shift, pos_k + shift)
    np.testing.assert_allclose(after, before, atol=1e-9)


@pytest.mark.parametrize(("mode", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_inverse_after_forward(mode, extra):
    """inverse(forward(x)) = mscale**2 x: the identity when mscale is 1."""
    x, pos = make_x(7), make_pos(8, mode)
    forward = rope(x, pos, n_dims=16, mode=mode, **extra)
    back = rope(forward, pos, n_dims=16, mode=mode, inverse=True, **extra)
    _, mscale = rope_frequencies(n_dims=16, **{k: v for k, v in extra.items() if k != "sections"})
    np.testing.assert_allclose(back[..., :16], mscale**2 * x[..., :16], atol=1e-12)
    if mscale == 1.0:
        np.testing.assert_allclose(back, x, atol=1e-12)


def test_negative_position_is_inverse_rotation():
    x, pos = make_x(9), make_pos(10, "normal")
    np.testing.assert_allclose(
        rope(x, -pos, n_dims=16), rope(x, pos, n_dims=16, inverse=True), atol=1e-12
    )


def test_tokens_are_independent_of_order():
    x, pos = make_x(11, n_tokens=7), make_pos(12, "neox", n_tokens=7)
    perm = np.random.default_rng(13).permutation(7)
    np.testing.assert_array_equal(
        rope(x[perm], pos[perm], n_dims=16, mode="neox"), rope(x, pos, n_dims=16, mode="neox")[perm]
    )


@pytest.mark.parametrize(("mode", "extra"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_tail_past_n_dims_bit_identical(mode, extra, dtype):
    x = make_x(14).astype(dtype)
    y = rope(x, make_pos(15, mode), n_dims=16, mode=mode, dtype=dtype, **extra)
    assert y.dtype == dtype
    assert y[..., 16:].tobytes() == x[..., 16:].tobytes()
    assert not np.array_equal(y[..., :16], x[..., :16])


def test_tail_exact_after_upcast():
    x = make_x(16).astype(np.float32)
    y = rope(x, make_pos(17, "normal"), n_dims=8)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:].astype(np.float64))


@pytest.mark.parametrize("extra", [{}, YARN], ids=["plain", "yarn"])
def test_normal_and_neox_differ_by_a_fixed_permutation(extra):
    """neox(x) = P^-1 normal(P x), P interleaving the halves: (x_i, x_{i+h}) -> (2i, 2i+1)."""
    n_dims, half = 16, 8
    perm = np.arange(20)
    perm[:n_dims] = np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel()
    x, pos = make_x(18), make_pos(19, "neox")
    neox = rope(x, pos, n_dims=n_dims, mode="neox", **extra)
    normal = rope(x[..., perm], pos, n_dims=n_dims, mode="normal", **extra)
    np.testing.assert_array_equal(normal[..., np.argsort(perm)], neox)
    assert not np.allclose(rope(x, pos, n_dims=n_dims, mode="normal", **extra), neox)


def test_yarn_off_is_plain_rope():
    x, pos = make_x(20), make_pos(21, "neox")
    plain = rope(x, pos, n_dims=16, mode="neox")
    # ext_factor 0, freq_scale 1: the YaRN parameters must not matter
    off = rope(x, pos, n_dims=16, mode="neox", ext_factor=0.0, freq_scale=1.0,
               n_ctx_orig=4096, beta_fast=16.0, beta_slow=2.0)  # fmt: skip
    np.testing.assert_array_equal(off, plain)
    # freq_scale 1 makes interp = extrap and mscale = attn_factor, whatever ext_factor is
    on = rope(x, pos, n_dims=16, mode="neox", ext_factor=1.0, freq_scale=1.0, n_ctx_orig=4096)
    np.testing.assert_allclose(on, plain, atol=1e-12)


def test_float32_compute_close_to_float64():
    x, pos = make_x(22).astype(np.float32), make_pos(23, "neox")
    lo = rope(x, pos, n_dims=16, mode="neox", dtype=np.float32)
    hi = rope(x, pos, n_dims=16, mode="neox")
    assert lo.dtype == np.float32
    np.testing.assert_allclose(lo, hi, atol=5e-4)  # |p| < 3000: f32 angle error ~ 3000 * 6e-8
    cos, _ = rope_angles(pos, n_dims=16, dtype=np.float32)
    assert cos.dtype == np.float32


# -- Hugging Face converters ---------------------------------------------------------------------
HF = dict(head_dim=20, rope_theta=10000.0, max_position_embeddings=4096)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


def longrope_cfg(dim_half: int = 10, **extra) -> dict:
    rng = np.random.default_rng(24)
    short = list(rng.uniform(1.0, 1.5, dim_half))
    long = list(rng.uniform(1.0, 40.0, dim_half))
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long, **extra}


def test_hf_default_linear_dynamic_hand_values():
    kw = dict(head_dim=4, rope_theta=100.0)
    np.testing.assert_allclose(hf_inv_freq(None, **kw)[0], [1.0, 0.1], rtol=1e-15)
    np.testing.assert_allclose(
        hf_inv_freq({"type": "linear", "factor": 2.0}, **kw)[0], [0.5, 0.05], rtol=1e-15
    )
    # dynamic at seq_len = 2 * mpe, factor 2, dim 4: base * (2*2 - 1)**(4/2) = 900
    dyn = {"rope_type": "dynamic", "factor": 2.0}
    inv, att = hf_inv_freq(dyn, max_position_embeddings=100, seq_len=200, **kw)
    np.testing.assert_allclose(inv, [1.0, 1 / 30], rtol=1e-14)
    assert att == 1.0
    # below mpe the base is unchanged
    np.testing.assert_allclose(hf_inv_freq(dyn, max_position_embeddings=100, **kw)[0], [1, 0.1])


def test_hf_llama3_hand_values():
    inv, att = hf_inv_freq(LLAMA3, head_dim=128, rope_theta=500000.0)
    assert att == 1.0 and inv[0] == 1.0  # wavelen 2 pi < 8192 / 4: kept
    assert inv[63] == pytest.approx(500000.0 ** (-126 / 128) / 8, rel=1e-14)  # long: / 8
    # pair 32: inv = 500000**-0.5, wavelen = 2 pi sqrt(5e5) = 4442.9 lies in (2048, 8192)
    smooth = (8192 / (2 * math.pi * math.sqrt(500000.0)) - 1) / 3
    assert inv[32] == pytest.approx(500000.0**-0.5 * ((1 - smooth) / 8 + smooth), rel=1e-14)


def test_hf_yarn_ramp_hand_values():
    """Same numbers as the ggml YaRN test: original ctx 4096 (not max_position_embeddings)
    gives low 20, high 46; pair 33 mixes 0.5 of the interpolated frequency 1/4."""
    cfg = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    inv, att = hf_inv_freq(cfg, head_dim=128, rope_theta=1e4, max_position_embeddings=16384)
    for pair, factor in [(10, 1.0), (20, 1.0), (33, 0.625), (46, 0.25), (60, 0.25)]:
        assert inv[pair] == pytest.approx(1e4 ** (-2 * pair / 128) * factor, rel=1e-13)
    assert att == pytest.approx(1 + 0.1 * math.log(4))
    params = hf_to_ggml(cfg, head_dim=128, rope_theta=1e4, max_position_embeddings=16384)
    assert params["n_ctx_orig"] == 4096


def test_hf_yarn_and_longrope_attention_hand_values():
    yarn = {"rope_type": "yarn", "factor": 4.0}
    assert hf_inv_freq(yarn, **HF)[1] == pytest.approx(1 + 0.1 * math.log(4))
    deepseek = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5}
    want = (1 + 0.1 * math.log(40)) / (1 + 0.05 * math.log(40))
    assert hf_inv_freq(deepseek, **HF)[1] == pytest.approx(want)
    # Phi-3 style: factor = 131072 / 4096 = 32, attention sqrt(1 + ln 32 / ln 4096) = sqrt(17/12)
    phi3 = longrope_cfg(original_max_position_embeddings=4096)
    kw = dict(HF, max_position_embeddings=131072)
    inv, att = hf_inv_freq(phi3, **kw, seq_len=5000)
    assert att == pytest.approx(math.sqrt(17 / 12))
    np.testing.assert_allclose(inv, hf_inv_freq(None, **HF)[0] / phi3["long_factor"])
    short, _ = hf_inv_freq(phi3, **kw, seq_len=4096)
    np.testing.assert_allclose(short, hf_inv_freq(None, **HF)[0] / phi3["short_factor"])


@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_hf_linear_equals_freq_scale(factor):
    cfg = {"rope_type": "linear", "factor": factor}
    assert hf_to_ggml(cfg, **HF)["freq_scale"] == 1 / factor
    x, pos = make_x(25), make_pos(26, "neox")
    inv, att = hf_inv_freq(cfg, **HF)
    want = rope(x, pos, n_dims=20, mode="neox", freq_scale=1 / factor)
    np.testing.assert_allclose(rope_inv_freq(x, pos, inv, attention_scaling=att), want, atol=1e-12)


HF_CASES = {
    "default-partial": (None, dict(partial_rotary_factor=0.5)),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, dict(seq_len=10000)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0}, {}),
    "yarn-orig-ctx": ({"rope_type": "yarn", "factor": 8.0,
                       "original_max_position_embeddings": 2048, "attention_factor": 0.9}, {}),
    "yarn-no-truncate": ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, {}),
    "llama3": (LLAMA3, dict(head_dim=128, rope_theta=500000.0)),
    "longrope-short": (longrope_cfg(factor=16.0), {}),
    "longrope-long": (longrope_cfg(factor=16.0), dict(seq_len=8192)),
    "longrope-phi3": (longrope_cfg(original_max_position_embeddings=1024), dict(seq_len=2048)),
}  # fmt: skip


@pytest.mark.parametrize("case", HF_CASES.values(), ids=HF_CASES.keys())
def test_hf_to_ggml_agrees_with_inverse_frequency_form(case):
    """ggml params (freq_factors for llama3/longrope, native YaRN for yarn) == HF inv_freq."""
    cfg, extra = case
    kw = dict(HF, **extra)
    x, pos = make_x(27, head_dim=kw["head_dim"]), make_pos(28, "neox")
    inv, att = hf_inv_freq(cfg, **kw)
    params = hf_to_ggml(cfg, **kw)
    assert params["n_dims"] == 2 * inv.size
    want = rope_inv_freq(x, pos, inv, attention_scaling=att)
    np.testing.assert_allclose(rope(x, pos, mode="neox", **params), want, atol=1e-9)


def test_hf_to_ggml_picks_native_parameters():
    yarn = hf_to_ggml({"rope_type": "yarn", "factor": 4.0}, **HF)
    assert (yarn["freq_scale"], yarn["ext_factor"], yarn["n_ctx_orig"]) == (0.25, 1.0, 4096)
    assert yarn["attn_factor"] == pytest.approx(1.0) and yarn["freq_factors"] is None
    llama3 = hf_to_ggml(LLAMA3, head_dim=128, rope_theta=500000.0)
    assert llama3["freq_factors"][0] == pytest.approx(1.0)
    assert llama3["freq_factors"][63] == pytest.approx(8.0)
    longrope = longrope_cfg(factor=16.0)
    np.testing.assert_allclose(hf_to_ggml(longrope, **HF)["freq_factors"], longrope["short_factor"])


# -- validation ----------------------------------------------------------------------------------
X = make_x(29)  # [5, 3, 20]
P = np.arange(5)
ROPE_ERRORS = [
    (dict(n_dims=7), "n_dims=7 must be an even int > 0 and <= head_dim=20"),
    (dict(n_dims=22), "n_dims=22"),
    (dict(n_dims=0), "n_dims=0"),
    (dict(n_dims=4.0), "n_dims=4.0"),
    (dict(mode="gptj"), "mode='gptj' must be one of"),
    (dict(x=X[0]), r"x.shape=\(3, 20\)"),
    (dict(pos=np.arange(4)), r"pos.shape=\(4,\) must end in n_tokens=5"),
    (dict(pos=np.zeros((4, 5), int)), r"pos.shape=\(4, 5\) must be \[n_tokens\]"),
    (dict(pos=np.arange(5.0)), "pos.dtype=float64 must be an integer dtype"),
    (dict(mode="mrope", sections=SECTIONS, pos=P), r"must be \[4, n_tokens\]"),
    (dict(mode="mrope"), "sections=None must be 4 ints"),
    (dict(mode="mrope", sections=(1, 1, 1)), r"sections=\(1, 1, 1\)"),
    (dict(mode="mrope", sections=(1, -1, 1, 1)), "sections="),
    (dict(mode="mrope", sections=(0, 0, 0, 0)), "sum > 0"),
    (dict(mode="neox", sections=SECTIONS), "only allowed with mode='mrope'"),
    (dict(freq_factors=np.ones(7)), r"freq_factors.shape=\(7,\) must be \(n_dims // 2,\)"),
    (dict(ext_factor=1.0), "n_ctx_orig=0 must be > 0 when ext_factor"),
    (dict(freq_base=0.0), "freq_base=0.0 must be > 0"),
    (dict(freq_scale=-1.0), "freq_scale=-1.0 must be > 0"),
    (dict(ext_factor=1.0, n_ctx_orig=64, beta_slow=0.0), "beta_slow=0.0"),
    (dict(ext_factor=1.0, n_ctx_orig=64, freq_base=1.0), "freq_base=1"),
    (dict(dtype=np.int32), "dtype=int32 must be one of"),
]


@pytest.mark.parametrize(("kwargs", "match"), ROPE_ERRORS, ids=[m for _, m in ROPE_ERRORS])
def test_rope_rejects_bad_input(kwargs, match):
    call = dict(x=X, pos=P, n_dims=16)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rope(call.pop("x"), call.pop("pos"), **call)


INV_FREQ_ERRORS = [
    (dict(mode="mrope"), "mode='mrope' must be one of"),
    (dict(inv_freq=np.ones(11)), r"inv_freq.shape=\(11,\)"),
    (dict(inv_freq=np.ones((2, 2))), r"inv_freq.shape=\(2, 2\)"),
    (dict(pos=np.zeros(3, int)), "n_tokens=5"),
]


@pytest.mark.parametrize(("kwargs", "match"), INV_FREQ_ERRORS, ids=[m for _, m in INV_FREQ_ERRORS])
def test_rope_inv_freq_rejects_bad_input(kwargs, match):
    call = dict(x=X, pos=P, inv_freq=np.ones(4))
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rope_inv_freq(call.pop("x"), call.pop("pos"), call.pop("inv_freq"), **call)


def test_rope_angles_rejects_bad_input():
    with pytest.raises(ValueError, match="n_dims=3"):
        rope_angles(P, n_dims=3)
    with pytest.raises(ValueError, match="sections=.* must be 4 ints"):
        rope_angles(np.zeros((4, 5), int), n_dims=8, sections=(1, 2))


HF_ERRORS = [
    ({"rope_type": "ntk2"}, {}, "rope_scaling\\['rope_type'\\]='ntk2' must be one of"),
    ("linear", {}, "rope_scaling='linear' must be a dict or None"),
    ({"rope_type": "linear"}, {}, "rope_scaling\\['factor'\\] is required"),
    ({"rope_type": "linear", "factor": 0.0}, {}, "rope_scaling\\['factor'\\]=0.0 must be > 0"),
    (None, dict(head_dim=0), "head_dim=0 must be an int > 0"),
    (None, dict(partial_rotary_factor=0.0), "partial_rotary_factor=0.0 must be in"),
    (None, dict(partial_rotary_factor=1.5), "partial_rotary_factor=1.5"),
    (None, dict(head_dim=20, partial_rotary_factor=0.25), "-> 5 rotary dims, must be even"),
    (None, dict(rope_theta=0.0), "rope_theta=0.0 must be > 0"),
    ({"rope_type": "dynamic", "factor": 2.0}, dict(max_position_embeddings=None),
     "max_position_embeddings=None must be > 0 for rope_type='dynamic'"),
    ({"rope_type": "dynamic", "factor": 2.0}, dict(head_dim=2), "rotary dims=2 must be > 2"),
    ({"rope_type": "yarn", "factor": 2.0}, dict(max_position_embeddings=None),
     "rope_type='yarn'"),
    ({"rope_type": "yarn", "factor": 2.0}, dict(rope_theta=1.0), "rope_theta=1 is not allowed"),
    (longrope_cfg(dim_half=9, factor=2.0), {}, "'short_factor'\\] has 9 entries, must be"),
    (longrope_cfg(), {}, "rope_scaling\\['factor'\\] is required for rope_type='longrope'"),
    ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, {},
     "rope_scaling\\['low_freq_factor'\\] is required"),
    (dict(LLAMA3, low_freq_factor=4.0), {}, "must differ from"),
]  # fmt: skip


@pytest.mark.parametrize("convert", [hf_inv_freq, hf_to_ggml])
@pytest.mark.parametrize(("cfg", "kwargs", "match"), HF_ERRORS, ids=[m for *_, m in HF_ERRORS])
def test_hf_converters_reject_bad_config(convert, cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert(cfg, **dict(HF, **kwargs))
