"""Seeded weights and the float64 oracle model.

Per layer l: h = rms_norm(x) * g_l; q, k, v = h Wq, h Wk, h Wv; x += Attn(RoPE_l(q),
RoPE_l(k), v) Wo.  Output = rms_norm(x_L) * g_out.  The oracle keeps raw (un-rotated) keys and
recomputes every key at its current cache position each step: no caches, no splits, no reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opbench.reference.attention import attention
from opbench.reference.rope import rope

from ..ops.rope import oracle_kwargs
from .config import ModelConfig
from .schedule import StepPlan


@dataclass(frozen=True)
class Weights:
    """float32 weights (the oracle reads the same values in float64)."""

    wq: list[np.ndarray]  # [d_model, H*D]
    wk: list[np.ndarray]  # [d_model, Hkv*D]
    wv: list[np.ndarray]  # [d_model, Hkv*D]
    wo: list[np.ndarray]  # [H*D, d_model]
    norm: list[np.ndarray]  # [d_model]
    out_norm: np.ndarray  # [d_model]
    inputs: list[np.ndarray]  # per sequence: [capacity, d_model] token embeddings


def make_weights(cfg: ModelConfig) -> Weights:
    rng = np.random.default_rng((cfg.seed, 1))
    d, hd, kvd = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def uniform(shape, scale):  # uniform with variance scale^2
        return (rng.uniform(-1, 1, shape) * scale * 3 ** 0.5).astype(np.float32)

    layers = range(cfg.n_layers)
    return Weights(
        wq=[uniform((d, hd), d ** -0.5) for _ in layers],
        wk=[uniform((d, kvd), d ** -0.5) for _ in layers],
        wv=[uniform((d, kvd), d ** -0.5) for _ in layers],
        # Wo kept small so the residual stream stays O(1) through the layers
        wo=[uniform((hd, d), 0.5 * hd ** -0.5) for _ in layers],
        norm=[(1 + rng.uniform(-0.2, 0.2, d)).astype(np.float32) for _ in layers],
        out_norm=(1 + rng.uniform(-0.2, 0.2, d)).astype(np.float32),
        inputs=[rng.uniform(-1, 1, (cfg.capacity, d)).astype(np.float32)
                for _ in range(cfg.n_seqs)],
    )


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def step_inputs(weights: Weights, plan: StepPlan) -> np.ndarray:
    """The embeddings of the step's new tokens, packed [n_q, d_model] float32."""
    return np.concatenate([weights.inputs[s][t] for s, t in enumerate(plan.new_tokens)])


@dataclass
class StepResult:
    """Per step: the residual stream after each layer [L][n_q, d_model] and the output."""

    layers: list[np.ndarray]
    output: np.ndarray


class OracleModel:
    def __init__(self, cfg: ModelConfig, weights: Weights) -> None:
        self.cfg, self.w = cfg, weights
        shape = (cfg.n_layers, cfg.n_seqs, cfg.capacity, cfg.n_kv_heads, cfg.head_dim)
        self.raw_k = np.full(shape, np.nan)  # keys before RoPE, by token index
        self.v = np.full(shape, np.nan)

    def step(self, plan: StepPlan) -> StepResult:
        x = step_inputs(self.w, plan).astype(np.float64)
        layers = []
        for layer in range(self.cfg.n_layers):
            x = x + self._attention(layer, x, plan)
            layers.append(x.copy())
        return StepResult(layers, rms_norm(x, self.w.out_norm, self.cfg.eps))

    def _attention(self, layer: int, x: np.ndarray, plan: StepPlan) -> np.ndarray:
        cfg, w = self.cfg, self.w
        h = rms_norm(x, w.norm[layer], cfg.eps)
        q = (h @ w.wq[layer].astype(np.float64)).reshape(len(x), cfg.n_heads, cfg.head_dim)
        k = (h @ w.wk[layer].astype(np.float64)).reshape(len(x), cfg.n_kv_heads, -1)
        v = (h @ w.wv[layer].astype(np.float64)).reshape(len(x), cfg.n_kv_heads, -1)
        out = np.empty_like(q)
        for s, tokens in enumerate(plan.new_tokens):
            rows = slice(int(plan.q_start[s]), int(plan.q_start[s + 1]))
            self.raw_k[layer, s, tokens], self.v[layer, s, tokens] = k[rows], v[rows]
            out[rows] = self._sequence(layer, s, q[rows], plan)
        return out.reshape(len(x), -1) @ w.wo[layer].astype(np.float64)

    def _sequence(self, layer: int, s: int, q: np.ndarray, plan: StepPlan) -> np.ndarray:
        params = _rope_kwargs(self.cfg, layer)
        cached = plan.cache_tokens[s]  # token at each cache position = its position
        keys = rope(self.raw_k[layer, s, cached], np.arange(len(cached)), **params)
        q_pos = plan.positions[plan.q_start[s]:plan.q_start[s + 1]]
        return attention(rope(q, q_pos, **params), keys, self.v[layer, s, cached],
                         scale=cfg_scale(self.cfg), causal=True)


def cfg_scale(cfg: ModelConfig) -> float:
    return cfg.head_dim ** -0.5


def _rope_kwargs(cfg: ModelConfig, layer: int) -> dict:
    return oracle_kwargs(cfg.rope_params(layer))


def run_oracle(cfg: ModelConfig, weights: Weights, plans: list[StepPlan]) -> list[StepResult]:
    oracle = OracleModel(cfg, weights)
    return [oracle.step(plan) for plan in plans]
