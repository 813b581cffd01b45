"""pytest-benchmark: the RoPE oracle at [4096, 32, 128] against bare float64 elementwise work.

Run with ``pytest tests/reference/test_rope_bench.py --benchmark-enable``; both benchmarks sit
in one group, so the table's ``mean`` column gives the ratio (target: oracle <= 3x baseline).
With benchmarks disabled (the default) each body runs once, as a smoke test.
"""

from __future__ import annotations

import numpy as np
import pytest

from opbench.reference.rope import rope

N_TOKENS, N_HEADS, HEAD_DIM = 4096, 32, 128
GROUP = "rope-f32-4096x32x128-neox"


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (N_TOKENS, N_HEADS, HEAD_DIM)).astype(np.float32)
    pos = rng.permutation(N_TOKENS).astype(np.int32)
    # full-width tables for the baseline: what a float64 rotate_half needs, precomputed for free
    theta = pos[:, None] * 10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    theta = np.concatenate([theta, theta], axis=1)[:, None, :]
    return x, pos, np.cos(theta), np.sin(theta)


def bare_float64_rope(x, cos, sin):
    """The least float64 work: upcast, rotate_half, x*cos + rotated*sin (HF formula)."""
    xd = x.astype(np.float64)
    half = HEAD_DIM // 2
    rotated = np.concatenate([-xd[..., half:], xd[..., :half]], axis=-1)
    return xd * cos + rotated * sin


@pytest.mark.benchmark(group=GROUP)
def test_bench_rope_oracle(benchmark, inputs):
    x, pos, cos, sin = inputs
    out = benchmark.pedantic(
        rope, args=(x, pos), kwargs=dict(n_dims=HEAD_DIM, mode="neox"), rounds=5, warmup_rounds=1
    )
    # the two compute the same thing; a benchmark of a wrong oracle would be worthless
    np.testing.assert_allclose(out, bare_float64_rope(x, cos, sin), atol=1e-9)


@pytest.mark.benchmark(group=GROUP)
def test_bench_bare_float64_baseline(benchmark, inputs):
    x, _, cos, sin = inputs
    out = benchmark.pedantic(bare_float64_rope, args=(x, cos, sin), rounds=5, warmup_rounds=1)
    assert out.shape == x.shape and out.dtype == np.float64
