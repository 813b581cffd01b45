"""Seeded weights and the float64 oracle model.

Per layer l: h = rms_norm(x) * g_l; q, k, v = h Wq, h Wk, h Wv; x += Attn(RoPE_l(q),
RoPE_l(k), v) Wo.  Output = rms_norm(x_L) * g_out.  The oracle keeps raw (un-rotated) keys and
recomputes every key at its current cache position each step: no caches, no splits, no reuse.
Its attention probabilities drive the eviction decisions of the schedule (``scheduled_oracle``).

mrope (Qwen2-VL) goes through the reference's mrope with the text positions ``[4, n]`` of
``ModelConfig.rope_positions``, not a neox shortcut.  ALiBi (no RoPE): the attention adds
slope_h * (k_pos - q_pos) with the positions the keys hold *now*, their compacted cache
positions after an eviction, as llama.cpp does (its context shift moves the kept cells'
positions, which its ALiBi mask reads, and rotates nothing) and as a paged attention over the
compacted block table does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opbench.reference.attention import alibi_slopes, attention
from opbench.reference.copies import round_to
from opbench.reference.rope import rope

from ..ops.rope import oracle_kwargs
from .config import ModelConfig
from .schedule import Scheduler, StepPlan, step_q_lens


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


def attention_mass(q: np.ndarray, keys: np.ndarray, lse: np.ndarray, q_pos: np.ndarray,
                   scale: float, max_bias: float = 0.0) -> np.ndarray:
    """Per key: the attention probability mass it received, summed over the queries and heads.
    q ``[n_q, H, D]`` at positions q_pos; keys ``[n_kv, Hkv, D]`` (GQA) at positions 0..n_kv-1;
    lse ``[n_q, H]`` the softmax's log-denominator: p = exp(logit - lse), 0 for future keys,
    logit = scale*q.k (+ the ALiBi bias when max_bias > 0).
    The oracle passes its own lse, an engine the backend's."""
    logits = causal_logits(q, keys, q_pos, scale, max_bias) - np.asarray(lse, np.float64)[
        ..., None]
    with np.errstate(over="ignore"):
        return np.exp(logits).sum(axis=(0, 1))


def causal_logits(q: np.ndarray, keys: np.ndarray, q_pos: np.ndarray, scale: float,
                  max_bias: float = 0.0) -> np.ndarray:
    """float64 ``[n_q, H, n_kv]``: scale*q.k, + slope_h * (k_pos - q_pos) (ALiBi, ggml slopes)
    when max_bias > 0, -inf for future keys."""
    q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
    k = np.repeat(keys, q.shape[1] // keys.shape[1], axis=1)
    logits = scale * np.einsum("qhd,khd->qhk", q, k)
    rel = np.arange(len(keys))[None, None, :] - np.asarray(q_pos)[:, None, None]
    if max_bias > 0:
        logits += alibi_slopes(q.shape[1], max_bias)[None, :, None] * rel
    return np.where(rel <= 0, logits, -np.inf)


def causal_lse(q: np.ndarray, keys: np.ndarray, q_pos: np.ndarray, scale: float,
               max_bias: float = 0.0) -> np.ndarray:
    """float64 log-sum-exp of the visible logits, ``[n_q, H]``."""
    logits = causal_logits(q, keys, q_pos, scale, max_bias)
    top = logits.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]


class OracleModel:
    """``kv_dtype`` f16 / bf16: the low-precision evaluation (the precision rule's error
    bound): still float64, but the cached keys and values, the queries and the attention's
    output rounded to that dtype, where an engine with such a cache rounds them."""

    def __init__(self, cfg: ModelConfig, weights: Weights, kv_dtype: str = "f32") -> None:
        self.cfg, self.w = cfg, weights
        self.kv_dtype = kv_dtype
        shape = (cfg.n_layers, cfg.n_seqs, cfg.capacity, cfg.n_kv_heads, cfg.head_dim)
        self.raw_k = np.full(shape, np.nan)  # keys before RoPE, by token index
        self.v = np.full(shape, np.nan)
        self.step_mass: list[np.ndarray] = []  # per sequence, per cache position: this step's

    def step(self, plan: StepPlan) -> StepResult:
        self.step_mass = [np.zeros(len(cached)) for cached in plan.cache_tokens]
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
        cfg = self.cfg
        cached = plan.cache_tokens[s]  # token at each cache position = its position
        k_pos = np.arange(len(cached))
        q_pos = plan.positions[plan.q_start[s]:plan.q_start[s + 1]]
        keys = self._kv(_rotate(cfg, layer, self.raw_k[layer, s, cached], k_pos))
        q_rot, scale = self._kv(_rotate(cfg, layer, q, q_pos)), cfg_scale(cfg)
        lse = causal_lse(q_rot, keys, q_pos, scale, cfg.max_bias)
        self.step_mass[s] += attention_mass(q_rot, keys, lse, q_pos, scale, cfg.max_bias)
        return self._kv(attention(q_rot, keys, self._kv(self.v[layer, s, cached]), scale=scale,
                                  causal=True, max_bias=cfg.max_bias, q_pos=q_pos,
                                  k_pos=k_pos))

    def _kv(self, x: np.ndarray) -> np.ndarray:
        """x as the cache dtype holds it (exact for f32: the oracle rounds nothing)."""
        if self.kv_dtype == "f32":
            return x
        return round_to(x, self.kv_dtype).astype(np.float64)


def cfg_scale(cfg: ModelConfig) -> float:
    return cfg.head_dim ** -0.5


def _rotate(cfg: ModelConfig, layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """RoPE of ``layer`` at ``positions`` (mrope: the text positions of every section);
    x itself for an ALiBi model."""
    if not cfg.rotary:
        return np.asarray(x, np.float64)
    params = {**oracle_kwargs(cfg.rope_params(layer)), "freq_factors": cfg.freq_factors(layer)}
    return rope(x, cfg.rope_positions(positions), **params)


def run_oracle(cfg: ModelConfig, weights: Weights, plans: list[StepPlan],
               kv_dtype: str = "f32") -> list[StepResult]:
    """The oracle along a given schedule (``kv_dtype``: the low-precision evaluation)."""
    oracle = OracleModel(cfg, weights, kv_dtype)
    return [oracle.step(plan) for plan in plans]


def scheduled_oracle(cfg: ModelConfig, weights: Weights, evict: bool
                     ) -> tuple[list[StepPlan], list[StepResult]]:
    """The schedule and the oracle together: after each step, the oracle's float64 attention
    mass decides the evictions (the reference decisions every engine must reach)."""
    scheduler, oracle = Scheduler(cfg, evict), OracleModel(cfg, weights)
    plans, results = [], []
    for step in range(cfg.steps + 1):
        plan = scheduler.step(step, step_q_lens(cfg, step))
        results.append(oracle.step(plan))
        scheduler.evict_after(plan, oracle.step_mass)
        plans.append(plan)
    return plans, results
