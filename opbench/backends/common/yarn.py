"""The YaRN correction range, one formula for every backend that computes RoPE angles."""

from __future__ import annotations

import math

from opbench.protocol import RopeParams


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base: float, beta_fast: float,
                   beta_slow: float) -> tuple[float, float]:
    """ggml ``ggml_rope_yarn_corr_dims`` / HF ``find_correction_range``: pair-index bounds
    (low, high) of the YaRN ramp."""

    def corr_dim(n_rot: float) -> float:
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(freq_base))

    low = math.floor(corr_dim(beta_fast))
    high = math.ceil(corr_dim(beta_slow))
    return max(0.0, low), min(n_dims - 1.0, high)


def rope_corr_dims(p: RopeParams) -> tuple[float, float]:
    """``yarn_corr_dims`` of a RopeParams."""
    return yarn_corr_dims(p.n_dims, p.n_ctx_orig, p.freq_base, p.beta_fast, p.beta_slow)
