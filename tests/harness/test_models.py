"""Model presets and ``--model``: parsing, the cases at a model's parameters, and the presets'
RoPE checked against transformers' own rope initialisation (when transformers is installed)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness import models
from opbench.harness.models import PRESET_DIR, preset_names
from opbench.harness.models.cases import model_cases

PRESETS = preset_names()
REQUIRED = {"llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "qwen2-vl-7b", "gemma-2-9b",
            "gemma-3-4b", "mistral-7b-v0.1", "phi-3.5-mini", "deepseek-v2-lite", "gpt-oss-20b",
            "bloom-560m"}


def _raw(name: str) -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


def test_presets_cover_the_issue_models_and_their_key_facts():
    assert REQUIRED <= set(PRESETS)
    llama = models.load("llama-3.1-8b")
    assert llama.kinds["full_attention"].rope == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    gemma3 = models.load("gemma-3-4b")
    assert gemma3.layers[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert gemma3.kinds["sliding_attention"].theta == 1e4
    assert gemma3.kinds["full_attention"].rope["factor"] == 8.0
    assert models.load("gemma-2-9b").softcap == 50.0
    assert models.load("qwen2-vl-7b").sections == (16, 24, 24, 0)
    oss = models.load("gpt-oss-20b")
    assert oss.sinks and oss.kinds["sliding_attention"].window == 128
    deepseek = models.load("deepseek-v2-lite")
    assert (deepseek.rope_dim, deepseek.head_dim, deepseek.cache_row) == (64, 192, (1, 576))
    assert deepseek.attn_scale == pytest.approx(192 ** -0.5 * (1 + 0.0707 * np.log(40)) ** 2)
    assert models.load("bloom-560m").alibi


def test_every_layer_kind_gets_prefill_decode_and_max_context_cases():
    cases = model_cases("gemma-3-4b")
    for layer in ("sliding", "full"):
        rope = [c for c in cases if c.op == "ROPE" and c["layer"] == layer]
        assert {c["ne"][2] for c in rope} == {7, 1}
        assert max(c["pos"] + 2 * c["ne"][2] for c in rope if "pos" in c.params) == 131072
        attn = [c for c in cases if c.op == "ATTN" and c["layer"] == layer]
        assert {c["nq"] for c in attn} >= {16, 1}
    windowed = [c for c in cases if c.op == "ATTN" and c["layer"] == "sliding"]
    assert {c["window"] for c in windowed} == {1024} and max(c["nkv"] for c in windowed) > 1024
    assert {c.op for c in cases} == {"ROPE", "ATTN", "KV_ROTATE", "SET_ROWS", "GET_ROWS"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_cases_pass_on_cpu(name, capsys):
    assert main(["test", "--model", name, "-q"]) == 0, capsys.readouterr().out[-2000:]


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


LLAMA = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 4096,
         "vocab_size": 1000, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                 "rope_theta": 1e4,
                                                 "original_max_position_embeddings": 1024}}


def test_config_json_in_transformers_5_style_runs_and_lists_unused_fields(tmp_path, capsys):
    path = _write(tmp_path, LLAMA)
    assert main(["test", "--model", path, "-o", "ROPE", "-q"]) == 0
    assert "fields not used: vocab_size" in capsys.readouterr().err
    model = models.load(path)
    assert model.kinds["full_attention"].rope["rope_type"] == "yarn"
    assert model.head_dim == 64


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "su", "factor": 2.0}, "rope_parameters": None},
     "unsupported rope type 'su'"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads=3"),
    ({"num_attention_heads": "4"}, "num_attention_heads='4' must be an int > 0"),
    ({"layer_types": ["full_attention"]}, "layer_types must hold num_hidden_layers=2"),
    ({"rope_parameters": {**LLAMA["rope_parameters"], "rope_theta": "abc"}},
     "a value of the wrong type or shape: ValueError: could not convert"),
])
def test_config_errors_exit_2_naming_the_field(tmp_path, capsys, change, message):
    path = _write(tmp_path, {**LLAMA, **change})
    assert main(["test", "--model", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("change", [{"rope_parameters": {"rope_type": "default",
                                                          "rope_theta": -1.0}},
                                     {"rope_parameters": {"rope_type": "linear",
                                                          "rope_theta": 1e4}}])
def test_rope_parameters_that_cannot_be_used_fail_the_run_instead_of_dropping_rope(
        tmp_path, capsys, change):
    path = _write(tmp_path, {**LLAMA, **change})
    assert main(["test", "--model", path, "-q"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"opbench: error: --model {path}: ")
    assert "must be > 0" in err[-1] or "is required" in err[-1]
    assert not [line for line in err if "Traceback" in line or "passed" in line]


def test_unknown_model_and_bad_json_exit_2(tmp_path, capsys):
    assert main(["test", "--model", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["test", "--model", str(bad)]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err


def test_models_verb_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "29x sliding: default theta 10000 window 1024; 5x full: linear theta 1e+06" in out


# -- transformers cross-check -------------------------------------------------------------------
F32_ULPS = 4 * float(np.finfo(np.float32).eps)


def _hf_config(name: str):
    return _hf_config_of(_raw(name))


def _hf_config_of(raw: dict):
    """transformers' config object of a preset dict (built locally: no hub access)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed: "
                                       "presets not checked against its rope initialisation")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__}: the check reads 5.x's "
                    "rope_parameters")
    raw = {k: v for k, v in raw.items() if k != "_source"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    return cfg.get_text_config()


def _hf_inv_freq(cfg, kind: str):
    """transformers' (inv_freq, attention_scaling) of one layer kind, float32."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = cfg.rope_parameters
    layer_type = kind if kind in params else None
    params = params[kind] if layer_type else params
    if params["rope_type"] == "default":  # transformers computes it in each model's class
        dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        dim = int(dim * getattr(cfg, "partial_rotary_factor", 1.0))
        inv = 1.0 / params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.int64) / dim)
        return inv.astype(np.float32), 1.0
    kwargs = {"layer_type": layer_type} if layer_type else {}
    inv, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", **kwargs)
    return inv.numpy(), float(scaling)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_rope_matches_transformers(name):
    """To float32 precision: transformers computes in float32, a few ulps from the float64
    values rounded once."""
    model = models.load(name)
    if models.rope_ready(model):
        pytest.skip(f"{name}: {models.rope_ready(model)}")
    cfg = _hf_config(name)
    for kind in model.kinds:
        ours, our_scaling = model.hf_rope(kind)
        theirs, their_scaling = _hf_inv_freq(cfg, kind)
        np.testing.assert_allclose(ours.astype(np.float32), theirs, rtol=F32_ULPS, err_msg=kind)
        assert np.float32(our_scaling) == pytest.approx(np.float32(their_scaling), rel=F32_ULPS)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        assert tuple(layer_types) == model.layers


def test_phi35_preset_holds_its_48_value_factor_lists():
    rope = models.load("phi-3.5-mini").kinds["full_attention"].rope
    assert rope["original_max_position_embeddings"] == 4096
    assert models.load("phi-3.5-mini").max_ctx == 131072
    for key, first, last in (("short_factor", 1.0, 2.8399994373321533),
                             ("long_factor", 1.0800000429153442, 64.83999633789062)):
        factors = rope[key]
        assert len(factors) == 48 and (factors[0], factors[-1]) == (first, last)
        # the checkpoint's float32 values, non-decreasing from the highest frequency
        assert all(float(np.float32(f)) == f for f in factors) and factors == sorted(factors)


@pytest.mark.parametrize("seq_len", [None, 4096, 4097, 131072])
def test_phi35_longrope_matches_transformers_on_both_sides_of_4096(seq_len):
    """Short factors up to the original 4096 positions, long ones past them: the preset's
    inv_freq and attention scaling meet transformers' at sequence lengths on either side."""
    cfg = _hf_config("phi-3.5-mini")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theirs, their_scaling = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
    ours, our_scaling = models.load("phi-3.5-mini").hf_rope("full_attention", seq_len=seq_len)
    np.testing.assert_allclose(ours.astype(np.float32), theirs.numpy(), rtol=F32_ULPS)
    assert our_scaling == pytest.approx(float(their_scaling), rel=F32_ULPS)


@pytest.mark.parametrize("name", ["gemma-3-4b", "gpt-oss-20b", "deepseek-v2-lite"])
def test_config_json_as_transformers_writes_it_parses_like_the_preset(name):
    """transformers 5 writes rope_parameters (per layer type for Gemma 3) and layer_types: the
    parser reads that form to the same layer kinds and RoPE as the preset's."""
    written = _hf_config(name).to_dict()
    ours, theirs = models.load(name), models.parse(written, name=name)
    assert theirs.layers == ours.layers
    for kind in ours.kinds:
        assert theirs.kinds[kind].theta == ours.kinds[kind].theta
        assert theirs.kinds[kind].window == ours.kinds[kind].window
        np.testing.assert_array_equal(theirs.hf_rope(kind)[0], ours.hf_rope(kind)[0])
    assert theirs.attn_scale == ours.attn_scale
