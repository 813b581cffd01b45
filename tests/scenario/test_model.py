"""The float64 oracle model: step-by-step decoding equals one dense causal pass."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.harness.scenario.config import model_config
from opbench.harness.scenario.model import (
    make_weights,
    rms_norm,
    run_oracle,
    scheduled_oracle,
)
from opbench.harness.scenario.schedule import build_schedule
from opbench.reference.attention import attention
from opbench.reference.rope import rope


def dense_forward(cfg, w, seq: int, n_tokens: int) -> list[np.ndarray]:
    """The model over tokens 0..n-1 of one sequence at once: positions = indices, causal.
    mrope as neox (text positions: equal rows); ALiBi: no RoPE, the attention's max_bias."""
    x = w.inputs[seq][:n_tokens].astype(np.float64)
    layers = []
    for layer in range(cfg.n_layers):
        pos = np.arange(n_tokens)
        h = rms_norm(x, w.norm[layer], cfg.eps)
        q = (h @ w.wq[layer]).reshape(n_tokens, cfg.n_heads, -1)
        k = (h @ w.wk[layer]).reshape(n_tokens, cfg.n_kv_heads, -1)
        v = (h @ w.wv[layer]).reshape(n_tokens, cfg.n_kv_heads, -1)
        if cfg.rotary:
            p = cfg.rope_params(layer)
            kw = dict(n_dims=p.n_dims, mode="neox" if p.mode == "mrope" else p.mode,
                      freq_base=p.freq_base, freq_scale=p.freq_scale)
            q, k = rope(q, pos, **kw), rope(k, pos, **kw)
        att = attention(q, k, v, causal=True, max_bias=cfg.max_bias)
        x = x + att.reshape(n_tokens, -1) @ w.wo[layer]
        layers.append(x)
    return layers


@pytest.fixture(scope="module")
def cfg():
    return model_config(n_layers=6, steps=3)


def _rows_of(results, plans, seq: int, layer: int) -> np.ndarray:
    return np.concatenate([r.layers[layer][p.q_start[seq]:p.q_start[seq + 1]]
                           for r, p in zip(results, plans)])


@pytest.mark.parametrize("model", ["gemma3", "qwen2-vl-7b", "bloom-560m"])
def test_step_by_step_decoding_equals_one_dense_pass(model):
    """Qwen2-VL: the oracle's mrope at text positions against a neox dense pass; BLOOM:
    ALiBi with positions = indices."""
    cfg = model_config(model, n_layers=6, steps=3)
    w = make_weights(cfg)
    plans = build_schedule(cfg, evict=False)
    results = run_oracle(cfg, w, plans)
    for seq, prompt in enumerate(cfg.prompt_lens):
        dense = dense_forward(cfg, w, seq, prompt + cfg.steps)
        for layer in range(cfg.n_layers):
            np.testing.assert_allclose(_rows_of(results, plans, seq, layer), dense[layer],
                                       rtol=1e-12, atol=1e-12)


def test_global_layers_use_their_own_rope_parameters(cfg):
    local, glob = cfg.rope_params(0), cfg.rope_params(5)
    assert (local.freq_base, local.freq_scale) == (1e4, 1.0)
    assert (glob.freq_base, glob.freq_scale) == (1e6, 1 / 8)
    assert [cfg.is_global(layer) for layer in range(12)] == [False] * 5 + [True] + \
        [False] * 5 + [True]
    flat = model_config("gemma3-1b").rope_params(5)
    assert (flat.freq_base, flat.freq_scale) == (1e6, 1.0)


def test_eviction_changes_later_steps_only(cfg):
    w = make_weights(cfg)
    kept = run_oracle(cfg, w, build_schedule(cfg, evict=False))
    evicted_plans, evicted = scheduled_oracle(cfg, w, evict=True)
    np.testing.assert_array_equal(kept[0].output, evicted[0].output)  # evictions come after
    seq = evicted_plans[0].evictions[0].seq
    rows = slice(evicted_plans[1].q_start[seq], evicted_plans[1].q_start[seq + 1])
    assert not np.allclose(kept[1].output[rows], evicted[1].output[rows], atol=1e-6)


def test_evicted_keys_are_recomputed_at_their_compacted_positions(cfg):
    """After eviction, layer 0 (whose K/V depend on the token's embedding only) equals a dense
    pass over just the kept tokens, positions = their index among the kept ones: StreamingLLM
    positions.  (Deeper layers differ: kept tokens once attended to the evicted ones.)"""
    w = make_weights(cfg)
    plans, results = scheduled_oracle(cfg, w, evict=True)
    e = plans[0].evictions[0]
    seq, last = e.seq, plans[1]
    kept = last.cache_tokens[seq]  # kept prompt tokens then the first decoded token
    compact = make_weights(cfg)
    compact.inputs[seq][: len(kept)] = w.inputs[seq][kept]
    dense = dense_forward(cfg, compact, seq, len(kept))
    row = last.q_start[seq]
    np.testing.assert_allclose(results[1].layers[0][row], dense[0][-1], rtol=1e-12)


def test_weights_are_seeded():
    a, b = make_weights(model_config(seed=3)), make_weights(model_config(seed=3))
    c = make_weights(model_config(seed=4))
    np.testing.assert_array_equal(a.wq[2], b.wq[2])
    assert not np.array_equal(a.wq[2], c.wq[2])
    assert a.wq[0].dtype == np.float32


@pytest.mark.parametrize("kv_dtype,lo,hi", [("f16", 1e-5, 2e-3), ("bf16", 1e-4, 2e-2)])
def test_low_precision_evaluation_rounds_the_cache(cfg, kv_dtype, lo, hi):
    """The precision rule's low-precision evaluation: off the float64 model by about the cache
    dtype's rounding, never exact; an f32 "cache" is the oracle itself."""
    w = make_weights(cfg)
    plans = build_schedule(cfg)
    exact = run_oracle(cfg, w, plans)
    low = run_oracle(cfg, w, plans, kv_dtype=kv_dtype)
    rel = max(np.abs(a.output - b.output).max() / np.abs(b.output).max()
              for a, b in zip(low, exact))
    assert lo < rel < hi
    same = run_oracle(cfg, w, plans, kv_dtype="f32")
    np.testing.assert_array_equal(same[-1].output, exact[-1].output)
