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


@pytest.mark.parametrize("model, message", [
    ("qwen2-vl-7b", "not mrope"),
    ("bloom-560m", "not ALiBi"),
    ("no-such-model", "neither a preset"),
])
def test_unsupported_models_exit_2_naming_why(model, message, capsys):
    assert main(["scenario", "--model", model]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_partial_rotate_half_rope_is_refused_naming_the_dims(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**YARN, "partial_rotary_factor": 0.5}))
    assert main(["scenario", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not partial rotation (32 of 64 dims" in err and len(err.strip().splitlines()) == 1
