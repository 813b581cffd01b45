"""pytest-benchmark: the attention oracle beside the bare float64 matrix products it must perform.

The oracle should cost at most ~3x its two GEMMs (QK^T and PV per kv head).  Disabled by default
(``--benchmark-disable`` in pyproject: each function then runs once as a smoke test); measure
with ``pytest tests/reference/test_attention_bench.py --benchmark-enable`` and compare the
``oracle`` and ``bare_matmul`` rows of each group.  Inputs are float32, as the harness hands the
oracle the backend's rounded inputs; the baseline gets contiguous float64 per-kv-head operands.
"""

from __future__ import annotations

import numpy as np
import pytest

from opbench.reference.attention import attention

N_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = {
    "prefill": dict(n_q=512, n_kv=4096, causal=True),
    "decode": dict(n_q=1, n_kv=32768, causal=False),
}

pytestmark = pytest.mark.slow


def make_inputs(n_q: int, n_kv: int):
    rng = np.random.default_rng(0)
    def uniform(*shape):  # in [-1, 1), drawn directly in float32 (cheap at these sizes)
        return rng.random(shape, dtype=np.float32) * 2 - 1

    q = uniform(n_q, N_HEADS, HEAD_DIM)
    k = uniform(n_kv, N_KV_HEADS, HEAD_DIM)
    v = uniform(n_kv, N_KV_HEADS, HEAD_DIM)
    return q, k, v


def per_kv_head_float64(q, k, v):
    """Contiguous float64 operands: q ``[Hkv, n_q*G, D]``, k and v ``[Hkv, n_kv, D]``."""
    n_q, group = q.shape[0], N_HEADS // N_KV_HEADS
    q_groups = q.astype(np.float64).reshape(n_q, N_KV_HEADS, group, HEAD_DIM)
    q_groups = q_groups.transpose(1, 0, 2, 3).reshape(N_KV_HEADS, n_q * group, HEAD_DIM)
    k_heads = k.astype(np.float64).transpose(1, 0, 2)
    v_heads = v.astype(np.float64).transpose(1, 0, 2)
    return tuple(np.ascontiguousarray(a) for a in (q_groups, k_heads, v_heads))


def bare_matmuls(q_groups, k_heads, v_heads):
    """Only the two products per kv head, nothing else: the floor the oracle is measured against."""
    for q_g, k_h, v_h in zip(q_groups, k_heads, v_heads):
        scores = q_g @ k_h.T
        scores @ v_h


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_attention_oracle(benchmark, shape):
    spec = SHAPES[shape]
    q, k, v = make_inputs(spec["n_q"], spec["n_kv"])
    benchmark.group = f"attention-{shape}"
    benchmark.name = "oracle"
    out = benchmark.pedantic(attention, args=(q, k, v), kwargs={"causal": spec["causal"]},
                             rounds=3, iterations=1, warmup_rounds=0)
    assert out.shape == (spec["n_q"], N_HEADS, HEAD_DIM) and np.isfinite(out).all()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_bare_matmuls(benchmark, shape):
    spec = SHAPES[shape]
    operands = per_kv_head_float64(*make_inputs(spec["n_q"], spec["n_kv"]))
    benchmark.group = f"attention-{shape}"
    benchmark.name = "bare_matmul"
    benchmark.pedantic(bare_matmuls, args=operands, rounds=3, iterations=1, warmup_rounds=0)
