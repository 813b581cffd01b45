"""Model presets and Hugging Face ``config.json`` parsing: the facts RoPE and attention need.

A preset is a small JSON file next to this module holding public facts from one model's
``config.json`` under the transformers key names, so a preset and a user's own ``config.json``
go through the same parser.  Both conventions are read: ``rope_scaling`` + ``rope_theta``
(transformers 4) and ``rope_parameters`` (transformers 5, flat or per layer type).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opbench.protocol import AttnParams, RopeParams

from ...reference import rope as rope_ref

PRESET_DIR = Path(__file__).parent
#: model types whose rotary pairs are interleaved (2i, 2i+1) in the HF code; the rest use
#: rotate_half (i, i + d/2), ggml's neox pairing
INTERLEAVED_TYPES = {"deepseek_v2", "deepseek_v3", "gptj"}
ALIBI_TYPES = {"bloom", "mpt", "falcon_alibi"}
SLIDING, FULL = "sliding_attention", "full_attention"
ALIASES = {"n_head": "num_attention_heads", "n_embed": "hidden_size", "n_embd": "hidden_size",
           "n_layer": "num_hidden_layers", "n_positions": "max_position_embeddings",
           "seq_length": "max_position_embeddings"}
#: keys read by this module (after aliases); everything else is reported as unused
USED = {"model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "num_hidden_layers", "head_dim", "max_position_embeddings", "rope_theta",
        "rope_scaling", "rope_parameters", "partial_rotary_factor", "rope_local_base_freq",
        "sliding_window", "use_sliding_window", "sliding_window_pattern",
        "layer_types", "attn_logit_softcapping", "query_pre_attn_scalar", "qk_rope_head_dim",
        "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "original_max_position_embeddings",
        "text_config", "_source"}


class ModelError(ValueError):
    """A config that cannot be turned into cases: names the field and the value."""


@dataclass(frozen=True)
class LayerKind:
    """One distinct layer type: its RoPE (HF rope_scaling dict with rope_type, theta) and
    window (0: full attention)."""

    name: str
    rope: dict | None  # None: no rotary embedding (ALiBi)
    theta: float
    window: int


@dataclass(frozen=True)
class Model:
    name: str
    model_type: str
    n_heads: int
    n_kv_heads: int
    head_dim: int  # query/key head size fed to attention
    v_head_dim: int
    rope_dim: int  # rotated dims of the rope input (partial rotation, MLA's rope part)
    rope_head_dim: int  # head size of the tensor RoPE is applied to
    rope_kv_heads: int  # key heads that carry rotary dims (MLA: one shared k_pe)
    cache_row: tuple[int, int]  # (heads, width) of one token's row in the KV cache
    n_layers: int
    layers: tuple[str, ...]  # kind name per layer
    kinds: dict
    max_ctx: int
    softcap: float
    sinks: bool
    alibi: bool
    mrope_section: tuple[int, ...] | None
    attn_scale: float
    unused: tuple[str, ...]

    @property
    def mode(self) -> str:
        if self.mrope_section:
            return "mrope"
        return "normal" if self.model_type in INTERLEAVED_TYPES else "neox"

    def kind(self, name: str) -> LayerKind:
        return self.kinds[name]

    def hf_rope(self, kind: str, seq_len=None) -> tuple[np.ndarray, float]:
        k = self.kinds[kind]
        return rope_ref.hf_inv_freq(k.rope, head_dim=self.rope_dim, rope_theta=k.theta,
                                    max_position_embeddings=self.max_ctx, seq_len=seq_len)

    def ggml_rope(self, kind: str, seq_len=None) -> dict:
        """``reference.rope.rope`` keyword params of one layer kind (freq_factors included)."""
        k = self.kinds[kind]
        params = rope_ref.hf_to_ggml(k.rope, head_dim=self.rope_dim, rope_theta=k.theta,
                                     max_position_embeddings=self.max_ctx, seq_len=seq_len)
        params["mode"] = self.mode
        params["sections"] = self.sections
        return params

    @property
    def sections(self) -> tuple[int, int, int, int] | None:
        if not self.mrope_section:
            return None
        return tuple((list(self.mrope_section) + [0, 0, 0, 0])[:4])

    def rope_params(self, kind: str, seq_len=None) -> tuple[RopeParams, np.ndarray | None]:
        params = self.ggml_rope(kind, seq_len)
        freq_factors = params.pop("freq_factors")
        return RopeParams(**params), freq_factors

    def attn_params(self, kind: str) -> AttnParams:
        return AttnParams(scale=self.attn_scale, causal=True, window=self.kinds[kind].window,
                          softcap=self.softcap, max_bias=8.0 if self.alibi else 0.0)


# -- loading ------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@functools.cache
def load(ref: str) -> Model:
    """A preset name or a path to a ``config.json``."""
    path = PRESET_DIR / f"{ref}.json"
    if not path.is_file():
        path = Path(ref)
        if not path.is_file():
            raise ModelError(f"model {ref!r} is neither a preset ({', '.join(preset_names())})"
                             " nor a config.json file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: a config.json holds a JSON object, not {type(raw).__name__}")
    try:
        return parse(raw, name=ref)
    except ModelError:
        raise
    except (TypeError, ValueError, KeyError) as exc:  # a value of the wrong type
        raise ModelError(f"{path}: a value of the wrong type or shape: "
                         f"{type(exc).__name__}: {exc}") from None


def _flatten(raw: dict) -> dict:
    """Multimodal configs keep the language model in ``text_config``; aliases to HF names."""
    cfg = {**raw, **raw.get("text_config", {})} if isinstance(raw.get("text_config"), dict) \
        else dict(raw)
    for alias, key in ALIASES.items():
        if alias in cfg and key not in cfg:
            cfg[key] = cfg.pop(alias)
    return cfg


def _positive_int(cfg: dict, key: str, default=None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{key}={value!r} must be an int > 0")
    return value


def parse(raw: dict, name: str = "config") -> Model:
    cfg = _flatten(raw)
    model_type = str(cfg.get("model_type", ""))
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = _positive_int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelError(f"num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv_heads}")
    hidden = _positive_int(cfg, "hidden_size")
    head_dim = cfg.get("head_dim") or hidden // heads
    n_layers = _positive_int(cfg, "num_hidden_layers")
    max_ctx = _positive_int(cfg, "max_position_embeddings", 2048)
    alibi = model_type in ALIBI_TYPES
    layers = _layer_types(cfg, n_layers, max_ctx)
    kinds = {kind: _layer_kind(cfg, kind, alibi, max_ctx) for kind in dict.fromkeys(layers)}
    dims = _head_dims(cfg, head_dim, kv_heads)
    sinks = model_type == "gpt_oss"  # learned per-head sinks: in the weights, not the config
    softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
    model = Model(name=name, model_type=model_type, n_heads=heads, n_kv_heads=kv_heads,
                  n_layers=n_layers, layers=tuple(layers), kinds=kinds, max_ctx=max_ctx,
                  softcap=softcap, sinks=sinks, alibi=alibi,
                  mrope_section=_mrope_section(cfg), attn_scale=_attn_scale(cfg, dims),
                  unused=tuple(sorted(k for k in cfg if k not in USED)), **dims)
    _check_rope(model)
    return model


def _head_dims(cfg: dict, head_dim: int, kv_heads: int) -> dict:
    """MLA (DeepSeek-V2): q/k heads are nope + rope dims, RoPE turns the rope part only, one
    k_pe is shared by every head and the cache row is the latent plus k_pe."""
    if cfg.get("qk_rope_head_dim"):
        rope, nope = cfg["qk_rope_head_dim"], cfg.get("qk_nope_head_dim", 0)
        latent = cfg.get("kv_lora_rank") or 0
        return dict(head_dim=rope + nope, v_head_dim=cfg.get("v_head_dim", rope + nope),
                    rope_dim=rope, rope_head_dim=rope, rope_kv_heads=1,
                    cache_row=(1, latent + rope) if latent else (kv_heads, rope + nope))
    factor = cfg.get("partial_rotary_factor", 1.0)
    rope_dim = int(head_dim * factor)
    return dict(head_dim=head_dim, v_head_dim=head_dim, rope_dim=rope_dim,
                rope_head_dim=head_dim, rope_kv_heads=kv_heads, cache_row=(kv_heads, head_dim))


def _attn_scale(cfg: dict, dims: dict) -> float:
    """Gemma: query_pre_attn_scalar**-0.5; DeepSeek-V2 YaRN: q_head_dim**-0.5 * mscale**2
    with mscale = 0.1 * mscale_all_dim * ln(factor) + 1; others head_dim**-0.5."""
    if cfg.get("query_pre_attn_scalar"):
        return float(cfg["query_pre_attn_scalar"]) ** -0.5
    scale = dims["head_dim"] ** -0.5
    rope = _rope_dict(cfg) or {}
    if cfg.get("qk_rope_head_dim") and rope.get("mscale_all_dim") and rope.get("factor", 1) > 1:
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


def _layer_types(cfg: dict, n_layers: int, max_ctx: int) -> list[str]:
    """``layer_types`` when given, else the family's pattern: Gemma 2 alternates (even layers
    slide), Gemma 3 slides except every ``sliding_window_pattern``-th layer, Qwen2 slides only
    with use_sliding_window, any other window covers every layer."""
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
        if len(types) != n_layers or not set(types) <= {SLIDING, FULL}:
            raise ModelError(f"layer_types must hold num_hidden_layers={n_layers} entries of "
                             f"{SLIDING!r}/{FULL!r}")
        return types
    window, model_type = cfg.get("sliding_window"), cfg.get("model_type", "")
    if not window or window >= max_ctx or cfg.get("use_sliding_window") is False:
        return [FULL] * n_layers
    if model_type == "gemma2":
        return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
    if model_type.startswith("gemma3"):
        every = cfg.get("sliding_window_pattern", 6)
        return [FULL if (i + 1) % every == 0 else SLIDING for i in range(n_layers)]
    return [SLIDING] * n_layers


def _rope_dict(cfg: dict, kind: str = FULL) -> dict | None:
    """The layer kind's rope_scaling-style dict (rope_type resolved), or None when default."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and kind in params:
        params = params[kind]
    if not isinstance(params, dict):
        params = cfg.get("rope_scaling")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ModelError(f"rope_scaling={params!r} must be an object or null")
    out = dict(params)
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    if out["rope_type"] == "mrope":  # transformers maps Qwen2-VL's "mrope" to default
        out["rope_type"] = "default"
    return out


def _layer_kind(cfg: dict, kind: str, alibi: bool, max_ctx: int) -> LayerKind:
    window = int(cfg.get("sliding_window") or 0) if kind == SLIDING else 0
    if alibi:
        return LayerKind(kind, None, 0.0, window)
    rope = _rope_dict(cfg, kind) or {"rope_type": "default"}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    local_base = cfg.get("rope_local_base_freq")
    if kind == SLIDING and local_base and "rope_parameters" not in cfg:
        rope, theta = {"rope_type": "default"}, local_base  # Gemma 3 local layers
    if rope["rope_type"] == "longrope" and "original_max_position_embeddings" in cfg:
        rope.setdefault("original_max_position_embeddings",
                        cfg["original_max_position_embeddings"])
    return LayerKind(kind, rope, float(theta), window)


def _mrope_section(cfg: dict) -> tuple[int, ...] | None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    return tuple(int(s) for s in section) if section else None


def _check_rope(model: Model) -> None:
    """An unsupported rope type or missing parameters fail here, naming them."""
    for kind in model.kinds.values():
        if kind.rope is None:
            continue
        if kind.rope["rope_type"] not in rope_ref.HF_ROPE_TYPES:
            raise ModelError(f"unsupported rope type {kind.rope['rope_type']!r} ({kind.name} "
                             f"layers); supported: {', '.join(rope_ref.HF_ROPE_TYPES)}")
        if model.mrope_section and sum(model.mrope_section) != model.rope_dim // 2:
            raise ModelError(f"mrope_section={list(model.mrope_section)} must sum to "
                             f"rotary dims / 2 = {model.rope_dim // 2}")


def rope_ready(model: Model) -> str | None:
    """None when ROPE cases can be built, else why not: the model has no RoPE (ALiBi), or
    its RoPE parameters cannot be used (``rope_error``)."""
    if any(kind.rope is None for kind in model.kinds.values()):
        return "no rotary embedding (ALiBi)"
    return rope_error(model)


def rope_error(model: Model) -> str | None:
    """Why the RoPE parameters of a model that has RoPE cannot be used (a factor list left
    out, rope_theta <= 0, ...); None when they can, or when it has no RoPE."""
    for name, kind in model.kinds.items():
        if kind.rope is None:
            continue
        try:
            model.ggml_rope(name)
        except ValueError as exc:
            return str(exc)
    return None


def summary(model: Model) -> dict:
    """The key facts ``opbench models`` prints."""
    kinds = []
    for kind in model.kinds.values():
        rope = "alibi" if kind.rope is None else f"{kind.rope['rope_type']} theta {kind.theta:g}"
        window = f" window {kind.window}" if kind.window else ""
        count = model.layers.count(kind.name)
        kinds.append(f"{count}x {kind.name.split('_')[0]}: {rope}{window}")
    return {"name": model.name, "heads": f"{model.n_heads}/{model.n_kv_heads}",
            "head_dim": model.head_dim, "rope_dim": model.rope_dim, "mode": model.mode,
            "max_ctx": model.max_ctx, "softcap": model.softcap, "sinks": model.sinks,
            "layers": "; ".join(kinds)}


__all__ = ["Model", "ModelError", "LayerKind", "load", "parse", "preset_names", "rope_ready",
           "summary"]
