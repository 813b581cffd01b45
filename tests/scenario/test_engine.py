"""The engine drives the cpu backend through every split and toggle and matches the oracle; the
judge names the first diverging step, layer, device and metric."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from opbench.backends.cpu import CpuBackend
from opbench.harness.scenario.config import ScenarioSpec
from opbench.harness.scenario.engine import Readout
from opbench.harness.scenario.judge import judge_step, run_scenario, scenario_options
from opbench.harness.scenario.matrix import matrix, split_devices, unsupported
from opbench.harness.scenario.model import StepResult
from opbench.protocol import Backend

SPECS = [
    ScenarioSpec(split="none", evict=True, graph_reuse=True),
    ScenarioSpec(split="layer", devices=3, rope_cache=False, evict=True),
    ScenarioSpec(split="head", devices=3, graph_reuse=True, delay=True),
    ScenarioSpec(split="ring", devices=2, evict=True, graph_reuse=True),
    ScenarioSpec(split="zigzag", devices=3, delay=True, evict=True),
    ScenarioSpec(split="stripe", devices=4, graph_reuse=True, rope_cache=False),
]


def _run(spec, backend_cls=CpuBackend):
    backend = backend_cls(**scenario_options(spec))
    try:
        return run_scenario(backend, spec), backend
    finally:
        backend.close()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_cpu_backend_matches_the_oracle_at_every_step(spec):
    result, _ = _run(spec)
    assert result.ok, result.divergence
    assert result.steps == spec.steps + 1
    assert 0 < result.worst["nmse"] < 1e-11  # real float32 error, far under the threshold


class Spy(CpuBackend):
    """Counts the protocol calls the engine makes."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: Counter = Counter()
        self.rope_layers: list[tuple[int, int]] = []
        self.rotated: list = []

    def capture_begin(self, streams):
        self.calls["capture_begin"] += 1
        super().capture_begin(streams)

    def replay(self, graph, stream=None):
        self.calls["replay"] += 1
        super().replay(graph, stream)

    def copy_async(self, src, dst_device, stream=None):
        self.calls[f"copy_to_{self.device(dst_device).index}"] += 1
        return super().copy_async(src, dst_device, stream)

    def rope_for_layer(self, x, pos, out, p, layer, freq_factors=None, stream=None):
        self.rope_layers.append((layer, x.device.index))
        super().rope_for_layer(x, pos, out, p, layer, freq_factors, stream)

    def kv_rotate(self, key_cache, block_indices, deltas, lut, layout, stream=None):
        self.rotated.append((id(key_cache), np.asarray(deltas).copy()))
        super().kv_rotate(key_cache, block_indices, deltas, lut, layout, stream)


def test_graph_reuse_captures_the_decode_step_once_and_replays_it():
    spec = ScenarioSpec(split="layer", devices=2, graph_reuse=True, steps=4)
    result, spy = _run(spec, Spy)
    assert result.ok
    assert spy.calls["capture_begin"] == 1
    assert spy.calls["replay"] == 4  # every decode step; the prefill is built normally


def test_without_graph_reuse_nothing_is_captured():
    result, spy = _run(ScenarioSpec(split="layer", devices=2), Spy)
    assert result.ok and spy.calls["capture_begin"] == 0 and spy.calls["replay"] == 0


def test_layer_split_starts_every_later_device_past_layer_0():
    _, spy = _run(ScenarioSpec(split="layer", devices=3, steps=1), Spy)
    first_layer = {}
    for layer, device in spy.rope_layers:
        first_layer.setdefault(device, layer)
    assert first_layer == {0: 0, 1: 2, 2: 4}


def test_head_split_gathers_every_partial_to_device_0():
    spec = ScenarioSpec(split="head", devices=4, steps=1)
    _, spy = _run(spec, Spy)
    n_layers, n_steps = spec.layers, spec.steps + 1
    assert spy.calls["copy_to_0"] == 3 * n_layers * n_steps  # 3 partials per layer and step
    assert spy.calls["copy_to_3"] == n_layers * n_steps  # the residual stream broadcast


def test_eviction_rotates_keys_only_by_token_deltas():
    spec = ScenarioSpec(split="none", evict=True)
    _, spy = _run(spec, Spy)
    assert spy.rotated, "the default config evicts"
    assert all((deltas % 4 == 0).all() and (deltas > 0).all() for _, deltas in spy.rotated)
    # one rotation per layer per eviction, never of a value cache: distinct caches == layers
    assert len({cache for cache, _ in spy.rotated}) == spec.layers


def _readout(layers, output, devices):
    return Readout(StepResult(layers, output), devices)


def test_judge_names_the_first_diverging_layer_and_its_device():
    rng = np.random.default_rng(0)
    want = StepResult([rng.normal(size=(3, 8)) for _ in range(4)], rng.normal(size=(3, 8)))
    got = [x.copy() for x in want.layers]
    got[2][1, 5] += 0.5
    got[3][1, 5] += 0.5
    divergence, worst = judge_step(7, _readout(got, want.output, [0, 0, 1, 1]), want)
    assert (divergence.step, divergence.layer, divergence.device) == (7, "2", 1)
    assert divergence.metric == "nmse" and divergence.value > 1e-3
    assert "step 7, layer 2, device 1: nmse=" in divergence.describe()
    assert worst["max_rel"] > 0.1


def test_judge_reports_nan_and_the_device_owning_the_worst_row():
    want = StepResult([np.ones((3, 4))], np.ones((3, 4)))
    got = np.ones((3, 4))
    got[2, 0] = np.nan
    owners = np.array([0, 1, 3])  # sequence split: rows live on different devices
    divergence, _ = judge_step(0, _readout([got], np.ones((3, 4)), [owners]), want)
    assert divergence.metric == "nan(count=1)" and divergence.device == 3


def test_judge_passes_float32_noise():
    want = StepResult([np.linspace(-1, 1, 64).reshape(4, 16)], np.ones((4, 16)))
    got = [want.layers[0].astype(np.float32).astype(np.float64)]
    divergence, _ = judge_step(0, _readout(got, want.output, [0]), want)
    assert divergence is None


def test_matrix_covers_every_split_device_count_and_toggle():
    specs = matrix()
    assert len(specs) == (1 + 5 * 4) * (16 + 2 + 2 + 1) + 6 + 6
    mrope = [s for s in specs if s.model == "qwen2-vl-7b"]
    assert {(s.split, s.devices) for s in mrope} == {("none", 1)} | {
        (split, 2) for split in ("layer", "head", "ring", "zigzag", "stripe")}
    alibi = [s for s in specs if s.model == "bloom-560m"]
    assert {(s.split, s.devices) for s in alibi} == {("none", 1), ("head", 1)} | {
        ("layer", n) for n in range(1, 5)}
    assert all(s.evict for s in mrope + alibi)
    assert len({s.id for s in specs}) == len(specs)
    real = [s for s in specs if s.model == "phi-3.5-mini"]
    assert {(s.split, s.devices) for s in real} == set(split_devices())
    assert all(s.evict for s in real)
    low = [s for s in specs if s.kv_dtype != "f32"]
    assert {(s.split, s.devices, s.kv_dtype) for s in low} == {
        (split, n, kv) for split, n in split_devices() for kv in ("f16", "bf16")}
    assert all(s.evict for s in low)
    assert {(s.split, s.devices) for s in specs if s.split == "zigzag"} == {
        ("zigzag", n) for n in range(1, 5)}


def test_unsupported_names_what_a_backend_lacks():
    class Bare(Backend):
        name = "bare"

    assert "capture_begin" in unsupported(Bare(), ScenarioSpec(graph_reuse=True))
    assert "cpy" in unsupported(Bare(), ScenarioSpec(kv_dtype="f16"))
    assert "cpy" not in unsupported(Bare(), ScenarioSpec())
    assert unsupported(CpuBackend(), ScenarioSpec(split="ring", devices=2, evict=True,
                                                  graph_reuse=True)) is None


@pytest.mark.parametrize("layer", [0, 5])  # a local and the scaled global layer
def test_rotation_lut_row_d_moves_a_key_back_by_d_positions(layer):
    from opbench.harness.scenario.config import model_config
    from opbench.harness.scenario.engine import rotation_lut
    from opbench.reference.kv_cache import rotate_keys
    from opbench.reference.rope import rope

    cfg = model_config()
    p = cfg.rope_params(layer)
    kw = dict(n_dims=p.n_dims, mode=p.mode, freq_base=p.freq_base, freq_scale=p.freq_scale)
    k = np.random.default_rng(0).uniform(-1, 1, (4, 2, cfg.head_dim))
    at_old = rope(k, np.array([9, 10, 11, 12]), **kw).reshape(1, 4, 2, -1)
    moved = rotate_keys(at_old, np.array([0]), np.array([[4]]), rotation_lut(cfg, layer),
                        layout="rotate_half")
    want = rope(k, np.array([5, 6, 7, 8]), **kw)
    np.testing.assert_allclose(moved[0], want, atol=1e-6)


@pytest.mark.parametrize("model", ["phi-3.5-mini", "gpt-oss-20b", "llama-3.1-8b",
                                   "deepseek-v2-lite", "qwen2-vl-7b"])
def test_rotation_lut_moves_a_scaled_key_without_scaling_it_again(model):
    """A key RoPE'd at p with freq_factors and an attention factor (longrope, YaRN), turned
    by LUT row d, is the key RoPE gives at p - d: same frequencies, one attention factor
    (DeepSeek: interleaved pairs, 64 of 192 dims rotated, the rest kept; Qwen2-VL: mrope of
    text tokens, every section moved by the same d)."""
    from opbench.harness.scenario.config import model_config
    from opbench.harness.scenario.engine import rotation_lut
    from opbench.harness.scenario.model import _rotate
    from opbench.reference.kv_cache import rotate_keys

    cfg = model_config(model)
    k = np.random.default_rng(0).uniform(-1, 1, (4, 2, cfg.head_dim))
    at_old = _rotate(cfg, 0, k, np.array([9, 10, 11, 12])).reshape(1, 4, 2, -1)
    moved = rotate_keys(at_old, np.array([0]), np.array([[4]]), rotation_lut(cfg, 0),
                        layout=cfg.kv_layout)
    np.testing.assert_allclose(moved[0], _rotate(cfg, 0, k, np.array([5, 6, 7, 8])),
                               atol=1e-6)


# -- eviction from the backend's attention, and low-precision caches ----------------------------
@pytest.mark.parametrize("spec", [
    ScenarioSpec(split="head", devices=2, evict=True),
    ScenarioSpec(split="zigzag", devices=3, evict=True, graph_reuse=True),
    ScenarioSpec(split="layer", devices=2, evict=True, kv_dtype="bf16"),
    ScenarioSpec(split="layer", devices=2, evict=True, model="bloom-560m"),  # ALiBi's bias
], ids=lambda s: s.id)
def test_backend_attention_mass_matches_the_oracles(spec):
    """The mass the engine computes from the backend's queries, keys and lse is the oracle's
    float64 mass to the cache dtype's precision, at every step (eviction included)."""
    from opbench.harness.scenario.judge import ENGINES, oracle_run

    cfg = spec.config()
    weights, plans, _ = oracle_run(cfg, True)
    scheduler_mass = _oracle_masses(cfg, weights, plans)
    backend = CpuBackend(**scenario_options(spec))
    try:
        engine = ENGINES[spec.split](backend, spec, cfg, weights)
        engine.collect_mass = True
        for plan, want in zip(plans, scheduler_mass):
            got = engine.step(plan).mass
            for s in range(cfg.n_seqs):
                rtol = 1e-4 if spec.kv_dtype == "f32" else 5e-2
                np.testing.assert_allclose(got[s], want[s], rtol=rtol, atol=rtol)
    finally:
        backend.close()


def _oracle_masses(cfg, weights, plans):
    from opbench.harness.scenario.model import OracleModel

    oracle = OracleModel(cfg, weights)
    masses = []
    for plan in plans:
        oracle.step(plan)
        masses.append(oracle.step_mass)
    return masses


class _ReversedMass:
    """An engine whose eviction scores are upside down: it evicts what the oracle keeps."""

    def token_mass(self, q, keys, lse, q_pos):
        return -super().token_mass(q, keys, lse, q_pos)


def test_a_wrong_eviction_decision_is_a_divergence_named_as_such():
    from opbench.harness.scenario.engine import PagedEngine

    spec = ScenarioSpec(split="none", evict=True)
    engine = type("Reversed", (_ReversedMass, PagedEngine), {})
    result = _run_engine(spec, engine)
    assert result.divergence.layer == "eviction" and result.divergence.step == 0
    assert "evicts tokens" in result.divergence.describe()
    assert result.worst["nmse"] < 1e-9  # the numbers themselves were right


def test_a_near_tie_is_reported_not_judged():
    """With a tie margin above the oracle's, a different decision is an error that says
    near-tie, neither a pass nor a divergence."""
    from opbench.harness.scenario.config import ScenarioTolerance
    from opbench.harness.scenario.engine import PagedEngine

    spec = ScenarioSpec(split="none", evict=True)
    engine = type("Reversed", (_ReversedMass, PagedEngine), {})
    wide = ScenarioTolerance(tie_margins=(("f32", 1.0), ("f16", 1.0), ("bf16", 1.0)))
    result = _run_engine(spec, engine, wide)
    assert not result.ok and result.divergence is None
    assert "near-tie" in result.error and "step 0" in result.error


def _run_engine(spec, engine_cls, *tol):
    backend = CpuBackend(**scenario_options(spec))
    try:
        return run_scenario(backend, spec, engine_cls, *tol)
    finally:
        backend.close()


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16"])
def test_low_precision_cache_is_judged_by_the_precision_rule(kv_dtype):
    """A low-precision cache passes with bounds from the low-precision evaluation and fails
    the f32 bounds (so the rule, not a loose constant, lets it pass)."""
    spec = ScenarioSpec(split="ring", devices=2, evict=True, kv_dtype=kv_dtype)
    result = _run_engine(spec, None)
    assert result.ok, result.divergence and result.divergence.describe()
    assert result.worst["nmse"] > 1e-9 and result.worst["max_rel"] > 1e-4


def test_ring_messages_carry_chunks_in_the_cache_dtype():
    """Devices as ranks: the chunks the ring ships are cache rows, half the bytes in f16/bf16;
    the residual stream (layer, head) stays f32."""
    from opbench.harness.ranks.plan import step_plan

    def sent_bytes(**axes):
        spec = ScenarioSpec(devices=2, **axes)
        return sorted(key[2] for key in step_plan(spec, spec.config(), 3)[0])

    f32 = sent_bytes(split="ring")
    assert sent_bytes(split="ring", kv_dtype="f16") == [n // 2 for n in f32]
    assert sent_bytes(split="ring", kv_dtype="bf16") == [n // 2 for n in f32]
    assert sent_bytes(split="layer", kv_dtype="f16") == sent_bytes(split="layer")
