"""``opbench scenario --model`` with a model preset or config.json: the scenario's per-layer
RoPE and head layout come from the model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opbench.cli.main import main
from opbench.harness.scenario.config import model_config

YARN = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                            "original_max_position_embeddings": 1024}}


def test_gemma3_preset_gives_its_local_global_pattern_and_head_layout():
    cfg = model_config("gemma-3-4b", n_layers=6)
    local, global_ = cfg.rope_params(0), cfg.rope_params(5)
    assert (local.freq_base, local.freq_scale) == (1e4, 1.0)
    assert (global_.freq_base, global_.freq_scale) == (1e6, 1 / 8)
    assert [cfg.rope_params(i) for i in range(5)] == [local] * 5
    assert (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads) == (256, 4, 2)  # ratio 2 as 8/4
    assert local.n_dims == 256 and local.mode == "neox"


def test_gemma2_preset_has_one_base_on_every_layer():
    cfg = model_config("gemma-2-9b", n_layers=6)
    assert {cfg.rope_params(i).freq_base for i in range(6)} == {1e4}  # the default: 1e6 global
    assert {cfg.rope_params(i).freq_scale for i in range(6)} == {1.0}


def test_named_scenario_models_still_work():
    assert model_config("gemma3").rope_params(5).freq_scale == 1 / 8
    assert model_config("gemma3-1b").rope_params(5).freq_scale == 1.0


@pytest.mark.parametrize("model", ["llama-3.1-8b", "phi-3.5-mini", "gpt-oss-20b"])
def test_freq_factors_and_attention_factor_reach_the_layers(model):
    """llama3, longrope and untruncated YaRN: every layer carries the preset's freq_factors
    (float32, as the backends receive them) and its RoPE parameters."""
    from opbench.harness import models

    real = models.load(model)
    cfg = model_config(model, n_layers=4)
    for layer in range(4):
        params, factors = real.rope_params(real.layers[layer])
        assert cfg.rope_params(layer) == params
        np.testing.assert_array_equal(cfg.freq_factors(layer), factors.astype(np.float32))
    assert model_config("gemma-3-4b").freq_factors(0) is None


@pytest.mark.parametrize("model", ["gemma-2-9b", "gemma-3-4b", "llama-3.1-8b", "phi-3.5-mini",
                                   "gpt-oss-20b", "deepseek-v2-lite"])
def test_scenario_runs_at_a_preset(model, capsys):
    argv = ["scenario", "--model", model, "--split", "head", "--devices", "2", "--evict", "on",
            "-q"]
    assert main(argv) == 0, capsys.readouterr().out[-2000:]


def test_yarn_with_its_ramp_runs_from_a_config_json(tmp_path, capsys):
    """Truncated YaRN (transformers' default) reaches ggml's ramp: ext_factor 1, an attention
    factor, the key re-rotation with eviction on."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(YARN))
    cfg = model_config(str(path))
    assert cfg.rope_params(0).ext_factor == 1.0 and cfg.freq_factors(0) is None
    argv = ["scenario", "--model", str(path), "--split", "stripe", "--devices", "2", "--evict",
            "on", "-q"]
    assert main(argv) == 0, capsys.readouterr().out[-2000:]


def test_deepseek_keys_are_re_rotated_in_its_interleaved_layout(capsys):
    """DeepSeek-V2-Lite: interleaved pairs over 64 of 192 dims; a re-rotation in the
    rotate_half layout (the scenario's layout for every other model) fails at the first step
    after an eviction."""
    from opbench.backends.cpu import CpuBackend
    from opbench.harness.scenario.config import ScenarioSpec
    from opbench.harness.scenario.judge import ENGINES, run_scenario, scenario_options

    cfg = model_config("deepseek-v2-lite")
    assert (cfg.kv_layout, cfg.rope_params(0).n_dims, cfg.head_dim) == ("interleaved", 64, 192)

    class RotateHalfLayout:
        def rotate_cache(self, k_cache, v_cache, blocks, deltas, lut):
            self.b.kv_rotate(k_cache, blocks, deltas, lut, "rotate_half")

    spec = ScenarioSpec(model="deepseek-v2-lite", split="ring", devices=2, evict=True)
    backend = CpuBackend(**scenario_options(spec))
    try:
        result = run_scenario(backend, spec, type("E", (RotateHalfLayout, ENGINES["ring"]), {}))
    finally:
        backend.close()
    assert not result.ok and result.divergence.step == 1


def test_unknown_model_exits_2_naming_why(capsys):
    assert main(["scenario", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "neither a preset" in err and len(err.strip().splitlines()) == 1


# -- mrope (Qwen2-VL) ---------------------------------------------------------------------------
def test_qwen2_vl_layers_are_mrope_with_its_sections_and_text_positions():
    cfg = model_config("qwen2-vl-7b", n_layers=2)
    p = cfg.rope_params(1)
    assert (p.mode, p.sections, p.n_dims, p.freq_base) == ("mrope", (16, 24, 24, 0), 128, 1e6)
    assert (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.kv_layout) == (
        128, 7, 1, "rotate_half")  # ratio 7 as 28/4
    np.testing.assert_array_equal(cfg.rope_positions(np.array([3, 0, 9])),
                                  [[3, 0, 9], [3, 0, 9], [3, 0, 9], [0, 0, 0]])
    assert model_config("qwen2.5-7b").rope_positions(np.array([3, 9])).shape == (2,)


def test_oracle_rotates_by_the_references_mrope_which_equals_neox_at_equal_positions(
        monkeypatch):
    """The oracle calls the reference's mrope with ggml's [4, n] positions, not neox; with
    the temporal, height and width positions equal (text) both give the same numbers, so
    KV_ROTATE's rotate_half LUT re-rotates mrope keys."""
    from opbench.harness.scenario.config import ModelConfig
    from opbench.harness.scenario.model import _rotate
    from opbench.reference.rope import rope

    cfg = model_config("qwen2-vl-7b")
    x = np.random.default_rng(1).uniform(-1, 1, (6, 2, 128))
    pos = np.array([0, 5, 17, 300, 4095, 32767])
    p = cfg.rope_params(0)
    mrope = rope(x, np.stack([pos, pos, pos, 0 * pos]), n_dims=128, mode="mrope",
                 freq_base=p.freq_base, sections=p.sections)
    np.testing.assert_array_equal(_rotate(cfg, 0, x, pos), mrope)
    neox = rope(x, pos, n_dims=128, mode="neox", freq_base=p.freq_base)
    np.testing.assert_allclose(mrope, neox, rtol=0, atol=1e-12)
    # unequal rows (an image token) differ: the oracle's rope really is the mrope path
    image = rope(x, np.stack([pos, pos + 1, pos, 0 * pos]), n_dims=128, mode="mrope",
                 freq_base=p.freq_base, sections=p.sections)
    assert np.abs(image - neox).max() > 1e-3
    monkeypatch.setattr(ModelConfig, "rope_positions",
                        lambda self, p: np.stack([p, p + 1, p, 0 * p]))
    np.testing.assert_array_equal(_rotate(cfg, 0, x, pos), image)


@pytest.mark.parametrize("split, devices", [("none", 1), ("layer", 2), ("head", 2),
                                            ("ring", 2), ("zigzag", 2), ("stripe", 2)])
def test_qwen2_vl_runs_on_every_split(split, devices):
    _assert_runs(split, devices, "qwen2-vl-7b", graph_reuse=split in ("none", "zigzag"))


# -- ALiBi (BLOOM) ------------------------------------------------------------------------------
def test_bloom_keeps_the_models_first_alibi_slopes_and_has_no_rope():
    from opbench.reference.attention import alibi_slopes

    cfg = model_config("bloom-560m")
    assert (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.max_bias) == (64, 4, 4, 2.0)
    np.testing.assert_allclose(alibi_slopes(4, cfg.max_bias), alibi_slopes(16, 8.0)[:4])
    assert not cfg.rotary and cfg.attn_params().max_bias == 2.0
    with pytest.raises(ValueError, match="no RoPE"):
        cfg.rope_params(0)


@pytest.mark.parametrize("split, devices", [("none", 1), ("layer", 2), ("layer", 3),
                                            ("head", 1)])
def test_bloom_runs_where_attn_expresses_alibi(split, devices):
    _assert_runs(split, devices, "bloom-560m", graph_reuse=devices == 2)


def test_bloom_record_says_kv_rotate_is_skipped():
    from opbench.harness.scenario.config import ScenarioSpec

    params = ScenarioSpec(model="bloom-560m", evict=True).as_dict()
    assert params["kv_rotate"].startswith("skipped: ALiBi") and "ALiBi" in params["positions"]
    assert "kv_rotate" not in ScenarioSpec(model="bloom-560m").as_dict()
    assert "mrope" in ScenarioSpec(model="qwen2-vl-7b").as_dict()["positions"]
    assert "positions" not in ScenarioSpec(model="qwen2.5-7b").as_dict()


@pytest.mark.parametrize("split, devices, reason", [
    ("head", 2, "shard of heads starts at 0"),
    ("ring", 1, "ring chunk holds keys of several sequences"),
    ("zigzag", 2, "ring chunk"), ("stripe", 3, "ring chunk"),
])
def test_alibi_on_a_split_attn_cannot_express_exits_2_naming_why(split, devices, reason,
                                                                   capsys):
    argv = ["scenario", "--model", "bloom-560m", "--split", split, "--devices", str(devices)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"(ALiBi) cannot run split={split!r}" in err and reason in err
    assert len(err.strip().splitlines()) == 1


def _assert_runs(split: str, devices: int, model: str, graph_reuse: bool) -> None:
    """Eviction on, 3 layers and 3 decode steps (the second eviction comes after step 3)."""
    from opbench.backends.cpu import CpuBackend
    from opbench.harness.scenario.config import ScenarioSpec
    from opbench.harness.scenario.judge import run_scenario, scenario_options

    spec = ScenarioSpec(model=model, split=split, devices=devices, evict=True, layers=3,
                        steps=3, graph_reuse=graph_reuse)
    backend = CpuBackend(**scenario_options(spec))
    try:
        result = run_scenario(backend, spec)
    finally:
        backend.close()
    assert result.ok and result.steps == 4, result.divergence and result.divergence.describe()


def test_partial_rotate_half_rope_is_refused_naming_the_dims(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**YARN, "partial_rotary_factor": 0.5}))
    assert main(["scenario", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not partial rotation (32 of 64 dims" in err and len(err.strip().splitlines()) == 1
