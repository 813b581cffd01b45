"""``opbench scenario --model`` with a model preset or config.json: the scenario's per-layer
RoPE and head layout come from the model."""

from __future__ import annotations

import pytest

from opbench.cli.main import main
from opbench.harness.scenario.config import model_config


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


@pytest.mark.parametrize("model", ["gemma-2-9b", "gemma-3-4b"])
def test_scenario_runs_at_a_preset(model, capsys):
    argv = ["scenario", "--model", model, "--split", "head", "--devices", "2", "--evict", "on",
            "-q"]
    assert main(argv) == 0, capsys.readouterr().out[-2000:]


@pytest.mark.parametrize("model, message", [
    ("llama-3.1-8b", "rope type 'llama3' needs freq_factors"),
    ("qwen2-vl-7b", "not mrope"),
    ("bloom-560m", "not ALiBi"),
    ("no-such-model", "neither a preset"),
])
def test_unsupported_models_exit_2_naming_why(model, message, capsys):
    assert main(["scenario", "--model", model]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
