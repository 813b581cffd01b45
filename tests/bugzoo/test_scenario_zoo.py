"""Every scenario zoo bug is caught by the matrix axes meant for it, and missed where it cannot
show (so the catch is the axis's doing, not noise); the real cpu backend passes the same runs."""

from __future__ import annotations

import pytest
from scenario_bugs import (
    AlibiBiasFromCacheSlot,
    CopiesNotAwaited,
    EvictDeltasInBlocks,
    F16CacheAsBf16,
    LutWithAttentionFactor,
    MassWithoutAlibi,
    MropePositionsTokenMajor,
    MropeTextPositionInOneRow,
    RingMergeIgnoresLse,
    RopeCacheKeyWithoutBase,
    RopeCacheLayerZero,
    RopeDropsFreqFactors,
    RotateValuesToo,
    ScoresFromLogits,
    StaleReplayPositions,
    ZigzagWrongOrder,
    run_bug,
)

from opbench.backends.cpu import CpuBackend
from opbench.harness.scenario.config import ScenarioSpec as S
from opbench.harness.scenario.judge import run_scenario, scenario_options

# bug -> (specs that must catch it, with the (step, layer) it first shows at; specs that must not)
ZOO = {
    RopeCacheLayerZero: (
        [(S(split="layer", devices=2), (0, "3")),  # device 1 starts at layer 3: no table
         (S(split="none"), (0, "5"))],  # the global layer reads layer 0's angles
        [S(split="layer", devices=2, rope_cache=False)]),
    RopeCacheKeyWithoutBase: (
        [(S(split="none", model="gemma3-1b"), (0, "5")),
         (S(split="layer", devices=2, model="gemma3-1b"), (0, "5"))],
        [S(split="none"), S(split="none", model="gemma3-1b", rope_cache=False)]),
    CopiesNotAwaited: (
        [(S(split="head", devices=2), (0, "0")), (S(split="layer", devices=3), (0, "2")),
         (S(split="stripe", devices=2, graph_reuse=True), (0, "0"))],
        [S(split="head", devices=1)]),
    RingMergeIgnoresLse: (
        [(S(split="ring", devices=2), (0, "0")), (S(split="zigzag", devices=4), (0, "0"))],
        [S(split="ring", devices=1), S(split="head", devices=2)]),
    StaleReplayPositions: (
        [(S(split="none", graph_reuse=True), (2, "0")),  # step 1 is the captured step
         (S(split="zigzag", devices=3, graph_reuse=True), (2, "0"))],
        [S(split="none")]),
    ZigzagWrongOrder: (
        [(S(split="zigzag", devices=2), (0, "0")), (S(split="zigzag", devices=3), (0, "0"))],
        [S(split="zigzag", devices=1), S(split="ring", devices=3)]),
    EvictDeltasInBlocks: (
        [(S(split="none", evict=True), (1, "0")), (S(split="stripe", devices=3, evict=True),
                                                   (1, "0"))],
        [S(split="none")]),
    RotateValuesToo: (
        [(S(split="head", devices=2, evict=True), (1, "0")),
         (S(split="ring", devices=2, evict=True, graph_reuse=True), (1, "0"))],
        [S(split="head", devices=2)]),
    # the numbers stay right; the eviction decision after the prefill is wrong
    ScoresFromLogits: (
        [(S(split="none", evict=True), (0, "eviction")),
         (S(split="ring", devices=2, evict=True, graph_reuse=True), (0, "eviction")),
         (S(split="head", devices=3, evict=True, kv_dtype="bf16"), (0, "eviction"))],
        [S(split="none"), S(split="ring", devices=2, graph_reuse=True)]),
    F16CacheAsBf16: (
        [(S(split="none", kv_dtype="f16"), (0, "0")),
         (S(split="stripe", devices=3, evict=True, kv_dtype="f16"), (0, "0"))],
        [S(split="none"), S(split="none", kv_dtype="bf16"),
         S(split="stripe", devices=3, evict=True)]),
    # model presets whose RoPE carries freq_factors (llama3, longrope) or an attention factor
    RopeDropsFreqFactors: (
        [(S(split="none", model="llama-3.1-8b"), (0, "0")),
         (S(split="zigzag", devices=3, model="phi-3.5-mini"), (0, "0"))],
        [S(split="none"), S(split="none", model="gemma-3-4b")]),
    LutWithAttentionFactor: (
        [(S(split="none", evict=True, model="gpt-oss-20b"), (1, "0")),
         (S(split="stripe", devices=2, evict=True, model="phi-3.5-mini"), (1, "0"))],
        [S(split="none", model="gpt-oss-20b"), S(split="none", evict=True, model="llama-3.1-8b")]),
    # mrope (Qwen2-VL): text positions hide a mix-up of the t, h, w rows, not this layout bug
    MropePositionsTokenMajor: (
        [(S(split="none", model="qwen2-vl-7b"), (0, "0")),
         (S(split="zigzag", devices=2, evict=True, graph_reuse=True, model="qwen2-vl-7b"),
          (0, "0"))],
        [S(split="none", model="qwen2.5-7b"), S(split="zigzag", devices=2, model="llama-3.1-8b")]),
    # ALiBi (BLOOM): right while every sequence's blocks are contiguous; wrong once sequence 0
    # grows into a later free block (step 3) or an eviction compacts a block table (step 1)
    AlibiBiasFromCacheSlot: (
        [(S(split="none", model="bloom-560m"), (3, "0")),
         (S(split="layer", devices=2, evict=True, model="bloom-560m"), (1, "0"))],
        [S(split="none", model="bloom-560m", steps=2), S(split="none", evict=True)]),
    MropeTextPositionInOneRow: (  # engine part: only a scenario can catch it
        [(S(split="none", model="qwen2-vl-7b"), (0, "0")),
         (S(split="stripe", devices=2, evict=True, graph_reuse=True, model="qwen2-vl-7b"),
          (0, "0"))],
        [S(split="none", model="qwen2.5-7b"), S(split="none", model="bloom-560m")]),
    MassWithoutAlibi: (  # engine part: the numbers stay right, the eviction decision is wrong
        [(S(split="none", evict=True, model="bloom-560m"), (0, "eviction")),
         (S(split="layer", devices=2, evict=True, graph_reuse=True, model="bloom-560m"),
          (0, "eviction"))],
        [S(split="none", model="bloom-560m"), S(split="none", evict=True)]),
}


def _cases(which: int):
    for bug, entries in ZOO.items():
        for entry in entries[which]:
            spec = entry[0] if which == 0 else entry
            yield pytest.param(bug, entry, id=f"{bug.__name__}-{spec.id}")


@pytest.mark.parametrize("bug,entry", list(_cases(0)))
def test_matrix_axis_catches_bug(bug, entry):
    spec, (step, layer) = entry
    result = run_bug(bug, spec)
    assert not result.ok, f"{bug.__name__} not caught by {spec.id}"
    assert (result.divergence.step, result.divergence.layer) == (step, layer), \
        result.divergence.describe()


@pytest.mark.parametrize("bug,spec", list(_cases(1)))
def test_bug_is_invisible_where_its_axis_is_off(bug, spec):
    assert run_bug(bug, spec).ok


@pytest.mark.parametrize("spec", sorted({e[0] for entries in ZOO.values() for e in entries[0]},
                                        key=lambda s: s.id), ids=lambda s: s.id)
def test_real_backend_passes_the_runs_that_catch_bugs(spec):
    backend = CpuBackend(**scenario_options(spec))
    try:
        assert run_scenario(backend, spec).ok
    finally:
        backend.close()
