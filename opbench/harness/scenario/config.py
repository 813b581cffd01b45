"""Scenario configuration: the model, the run's axes, and the one tolerance table.

The model is a small attention-only transformer with Gemma-3-style per-layer RoPE: every
``global_every``-th layer is global (freq_base 1e6, linear scaling), the rest local (1e4).  A
model preset or ``config.json`` (``--model``) gives instead its own per-layer RoPE pattern (or
ALiBi), head size and query/KV head ratio, with fewer heads, a narrower model and fewer layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from opbench.protocol import AttnParams, RopeParams

from ..models import load as load_model
from .splits import SEQUENCE_SPLITS, check_split, head_split, layer_split


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    n_layers: int = 6
    prompt_lens: tuple[int, ...] = (13, 6, 17)  # sequences of different lengths
    steps: int = 5  # decode steps after the prefill
    block_size: int = 4
    local_base: float = 1e4
    global_base: float = 1e6
    global_scale: float = 8.0  # HF linear rope_scaling factor of global layers; 1 = none
    global_every: int = 6  # layers l with (l + 1) % global_every == 0 are global
    eps: float = 1e-6
    seed: int = 0
    # eviction sizes in tokens (OpenVINO GenAI): evict once a sequence holds max + block_size
    start_size: int = 4
    recent_size: int = 4
    max_cache_size: int = 12
    #: RoPE per layer from a real model's config (cycled over the layers); empty: the
    #: local/global pattern above
    layer_ropes: tuple[RopeParams, ...] = ()
    #: per entry of ``layer_ropes``: the freq_factors (float32 values; llama3, longrope and
    #: untruncated YaRN divide theta by them), or None
    layer_freq_factors: tuple[tuple[float, ...] | None, ...] = ()
    score_aggregation: str = "NORM_SUM"  # OpenVINO GenAI's SUM or NORM_SUM (mass / lifetime)
    #: ALiBi instead of RoPE when > 0: ggml's max_bias of the attention (slopes per head)
    max_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even")
        if min(self.prompt_lens, default=0) < 1:
            raise ValueError(f"prompt_lens={self.prompt_lens} must be non-empty and >= 1")

    @property
    def n_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def capacity(self) -> int:
        """The most tokens any sequence ever appends."""
        return max(self.prompt_lens) + self.steps

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @property
    def rotary(self) -> bool:
        """Whether the keys carry RoPE (False: ALiBi, no ROPE and no re-rotation)."""
        return self.max_bias == 0

    def rope_params(self, layer: int) -> RopeParams:
        if not self.rotary:
            raise ValueError("an ALiBi model has no RoPE parameters")
        if self.layer_ropes:
            return self.layer_ropes[layer % len(self.layer_ropes)]
        # neox pairing (i, i + D/2) matches KV_ROTATE's rotate_half layout
        if self.is_global(layer):
            return RopeParams(n_dims=self.head_dim, mode="neox", freq_base=self.global_base,
                              freq_scale=1.0 / self.global_scale)
        return RopeParams(n_dims=self.head_dim, mode="neox", freq_base=self.local_base)

    @property
    def mrope(self) -> bool:
        return self.rotary and self.rope_params(0).mode == "mrope"

    def rope_positions(self, positions: np.ndarray) -> np.ndarray:
        """ROPE's ``pos`` for tokens at ``positions``: themselves, or for mrope the ggml layout
        ``[4, n]`` of a text token, as Qwen2-VL and llama.cpp give it: the temporal, height and
        width rows all hold the position (so every section turns by the same angle as
        neox would, and an eviction's one delta moves every section alike), the fourth row 0
        (no section of Qwen2-VL reads it)."""
        positions = np.asarray(positions, np.int32)
        if not self.mrope:
            return positions
        return np.stack([positions] * 3 + [np.zeros_like(positions)])

    @property
    def kv_layout(self) -> str:
        """KV_ROTATE's pair layout of the cached keys: RoPE's pairing (neox: rotate_half;
        normal: interleaved (2i, 2i+1), DeepSeek's)."""
        rotary = self.rotary and self.rope_params(0).mode == "normal"
        return "interleaved" if rotary else "rotate_half"

    def freq_factors(self, layer: int) -> np.ndarray | None:
        """float32 ``[n_dims // 2]`` freq_factors of ``layer``'s RoPE, or None."""
        if not self.layer_freq_factors:
            return None
        factors = self.layer_freq_factors[layer % len(self.layer_freq_factors)]
        return None if factors is None else np.array(factors, np.float32)

    def attn_params(self, causal: bool = True) -> AttnParams:
        return AttnParams(scale=self.head_dim ** -0.5, causal=causal, max_bias=self.max_bias)


#: Named models.  gemma3 = Gemma 3 4B+ (global layers scaled x8); gemma3-1b = Gemma 3 1B (no
#: scaling: local and global layers differ only in freq_base, the case a cache key without
#: freq_base gets wrong).
PRESETS = {
    "gemma3": {},
    "gemma3-1b": {"global_scale": 1.0},
}


def model_config(preset: str = "gemma3", **overrides) -> ModelConfig:
    """A named scenario model, else a model preset of ``opbench models`` or a config.json."""
    if preset in PRESETS:
        return ModelConfig(**{**PRESETS[preset], **overrides})
    return _from_real_model(preset, **overrides)


def _from_real_model(ref: str, **overrides) -> ModelConfig:
    """Same head size, query/KV head ratio and per-layer RoPE (frequencies, freq_factors, YaRN
    ramp and attention factor; mrope with its sections) or ALiBi as the model; at most 2 KV
    heads (4 without GQA, 1 when the ratio is above 4).
    What the scenario's model cannot express is refused by name (``scenario_refusal``)."""
    model = load_model(ref)  # ModelError is a ValueError: the CLI's usage error
    refusal = scenario_refusal(model)
    if refusal:
        raise ValueError(f"model {ref!r}: {refusal}")
    ratio = model.n_heads // model.n_kv_heads
    # at least 4 query heads (a head split over up to 4 devices) where the model has them
    kv_heads = min(model.n_kv_heads, 4 if ratio == 1 else 2 if ratio <= 4 else 1)
    heads = {"n_heads": kv_heads * ratio, "n_kv_heads": kv_heads, "head_dim": model.head_dim}
    if model.alibi:
        max_bias = alibi_max_bias(model.attn_params(model.layers[0]).max_bias, model.n_heads,
                                  kv_heads * ratio)
        return ModelConfig(**{**heads, "max_bias": max_bias, **overrides})
    kinds = {}
    for kind in dict.fromkeys(model.layers):
        params, factors = model.rope_params(kind)
        kinds[kind] = (params, None if factors is None
                       else tuple(float(f) for f in np.float32(factors)))
    layers = overrides.get("n_layers", ModelConfig.n_layers)
    per_layer = [kinds[model.layers[i % len(model.layers)]] for i in range(layers)]
    return ModelConfig(**{**heads, "layer_ropes": tuple(p for p, _ in per_layer),
                          "layer_freq_factors": tuple(f for _, f in per_layer), **overrides})


def alibi_max_bias(max_bias: float, model_heads: int, heads: int) -> float:
    """The max_bias that gives the scenario's ``heads`` the model's first ``heads`` ALiBi
    slopes.  ggml's slope of head h < 2^floor(log2 H) is m0^(h+1) with m0 = 2^(-max_bias /
    2^floor(log2 H)), so scaling max_bias by heads / 2^floor(log2 H_model) keeps m0 (exact when
    ``heads`` is a power of two no larger than that; BLOOM-560m: 16 heads, max_bias 8 -> 4
    heads, max_bias 2, slopes 2^-0.5, 2^-1, 2^-1.5, 2^-2)."""
    return max_bias * heads / 2 ** math.floor(math.log2(model_heads))


def scenario_refusal(model) -> str | None:
    """Why the scenario cannot run ``model``, or None.  Its keys are re-rotated by KV_ROTATE,
    one position delta per key, in the rotate_half layout over the whole head or in the
    interleaved layout (pairs past the rotary dims turned by angle 0).  That covers mrope
    (Qwen2-VL): the scenario's tokens are text, whose temporal, height and width positions are
    equal, so every section moves by the same delta; and ALiBi needs no re-rotation at all
    (the kept keys' bias follows their compacted positions).  Refused: partial rotate_half
    RoPE (its pairs (i, i + n/2) are not the LUT's (j, j + D/2))."""
    if model.mode == "neox" and model.rope_dim != model.head_dim and not model.alibi:
        return (f"scenarios need rotate_half RoPE over the whole head, not partial rotation "
                f"({model.rope_dim} of {model.head_dim} dims: the re-rotation pairs j, j + D/2)")
    return None


#: the splits whose ATTN cannot express ALiBi, and why
ALIBI_REFUSED_SPLITS = {
    "head": "ATTN derives ALiBi slopes from the head index within its call, where a device's "
            "shard of heads starts at 0, not at its global index",
    **{split: "a ring chunk holds keys of several sequences at scattered positions, and the "
              "contiguous ATTN takes ALiBi key positions from row indices (the additive mask, "
              "shared by the heads, cannot carry a per-head slope)"
       for split in SEQUENCE_SPLITS},
}


KV_DTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class ScenarioSpec:
    """One run: the model plus every axis of the matrix."""

    split: str = "none"
    devices: int = 1
    rope_cache: bool = True
    graph_reuse: bool = False
    evict: bool = False
    delay: bool = False
    model: str = "gemma3"
    layers: int = 6
    steps: int = 4
    seed: int = 0
    kv_dtype: str = "f32"  # storage of the K/V caches (and the attention's q and out)
    #: the sequences' prompt lengths; None: the model's (a sweep past its shortest prompt
    #: lengthens them, ``matrix.sweep_prompt_lens``)
    prompt_lens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={self.kv_dtype!r} must be one of {KV_DTYPES}")
        check_split(self.split, self.devices)
        cfg = self.config()
        if not cfg.rotary and self.split in ALIBI_REFUSED_SPLITS and (
                self.split != "head" or self.devices > 1):
            raise ValueError(f"model {self.model!r} (ALiBi) cannot run split={self.split!r}: "
                             f"{ALIBI_REFUSED_SPLITS[self.split]}")
        if self.split == "layer":
            layer_split(cfg.n_layers, self.devices)
        if self.split == "head":
            head_split(cfg.n_heads, cfg.n_kv_heads, self.devices)
        shortest = min(cfg.prompt_lens)
        if self.split in SEQUENCE_SPLITS and self.devices > shortest:
            # more devices than tokens: a device holds nothing of a sequence and tests nothing
            raise ValueError(f"devices={self.devices} must be <= {shortest} (tokens in the "
                             f"shortest prompt) for split={self.split!r}")

    def config(self) -> ModelConfig:
        prompts = {"prompt_lens": tuple(self.prompt_lens)} if self.prompt_lens else {}
        return model_config(self.model, n_layers=self.layers, steps=self.steps, seed=self.seed,
                            **prompts)

    @property
    def id(self) -> str:
        onoff = {True: "on", False: "off"}
        return (f"SCENARIO(split={self.split},devices={self.devices},"
                f"rope_cache={onoff[self.rope_cache]},graph_reuse={onoff[self.graph_reuse]},"
                f"evict={onoff[self.evict]},delay={onoff[self.delay]},model={self.model},"
                f"layers={self.layers},steps={self.steps},kv_dtype={self.kv_dtype}"
                + (f",prompts={'-'.join(map(str, self.prompt_lens))}" if self.prompt_lens
                   else "") + ")")

    def as_dict(self) -> dict:
        """The axes; for mrope and ALiBi models also how positions act (and, with eviction
        on, that an ALiBi run skips KV_ROTATE)."""
        axes = dataclasses.asdict(self)
        cfg = self.config()
        if cfg.mrope:
            axes["positions"] = "mrope, text tokens: the t, h and w rows equal"
        if not cfg.rotary:
            axes["positions"] = f"ALiBi (max_bias {cfg.max_bias:g}), no RoPE"
            if self.evict:
                axes["kv_rotate"] = ("skipped: ALiBi keys carry no rotation; the kept keys' "
                                     "bias uses their compacted positions")
        return axes


@dataclass(frozen=True)
class ScenarioTolerance:
    """float32 through several layers, judged against float64.  Measured on the cpu backend:
    NMSE ~1e-13 and max relative error ~1e-6 at 6 layers; every zoo bug lands at NMSE >= 1e-5.

    A KV cache in f16 / bf16 is judged by the precision rule: per (step, layer) the bounds are
    ``k`` times the error of the low-precision evaluation (the float64 model with the cache,
    the attention's queries and output rounded where the engine rounds them) plus the f32
    bounds above.
    """

    nmse: float = 1e-9
    max_rel: float = 1e-4  # max |a - b| / max |b| per (step, layer)
    k: float = 4.0  # low-precision KV: bound = k * low-precision error + the f32 bound
    # eviction: a decision whose oracle margin (score gap / top score) is below this, for the
    # cache dtype, is a near-tie; seeds 0-9 of both models decide with margins >= 0.05
    tie_margins: tuple = (("f32", 1e-3), ("f16", 1e-2), ("bf16", 4e-2))

    def tie_margin(self, kv_dtype: str) -> float:
        return dict(self.tie_margins)[kv_dtype]

    def bounds(self, low: dict | None) -> dict:
        """metric -> threshold, given the low-precision evaluation's metrics (None: f32)."""
        if low is None:
            return {"nmse": self.nmse, "max_rel": self.max_rel}
        return {"nmse": self.k ** 2 * low["nmse"] + self.nmse,
                "max_rel": self.k * low["max_rel"] + self.max_rel}


TOLERANCE = ScenarioTolerance()
#: cpu backend fault injection for scenarios: short sleeps (many small ops per step)
DELAY_MAX_MS = 0.3
