"""Stateful and multi-device bugs, one each: broken cpu backends and broken engine parts.

The scenario matrix must catch every one while the real cpu backend passes it
(test_scenario_zoo.py).  ``python tests/bugzoo/scenario_bugs.py [--delay]`` prints which axes
of the matrix's delay-off (delay-on) half catch each bug (the table in docs/scenarios.md).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from opbench.backends.common.arrays import plain
from opbench.backends.cpu import CpuBackend, kernels
from opbench.backends.cpu.rope_cache import RopeCache, _Table, rope_frequencies
from opbench.harness.scenario.splits import SequenceSplit
from opbench.protocol import RopeParams


# -- broken backends ------------------------------------------------------------------------------
class _FixedTableCache(RopeCache):
    """A cache that hands out one table whatever the parameters."""

    def __init__(self, table: _Table) -> None:
        super().__init__()
        self.fixed = table

    def table(self, p: RopeParams, freq_factors) -> _Table:
        return self.fixed


class RopeCacheLayerZero(CpuBackend):
    """The sin/cos table is filled when the global layer index is 0 and reused by every later
    layer on the device: another layer's angles, or none on a device whose first layer is > 0."""

    def rope_for_layer(self, x, pos, out, p, layer, freq_factors=None, stream=None) -> None:
        if not self.rope_cache:
            return super().rope_for_layer(x, pos, out, p, layer, freq_factors, stream)
        device = x.device
        tables = self.__dict__.setdefault("_layer0_tables", {})
        if layer == 0:
            tables[device] = _Table(*rope_frequencies(p, None), p.inverse)
        empty = _Table(np.zeros(p.n_dims // 2), 1.0, p.inverse)  # never filled: no rotation
        cache = _FixedTableCache(tables.get(device, empty))
        args = (plain(x), plain(pos), plain(out))
        self._submit(device, stream, lambda: kernels.rope(*args, p, None, cache))


class _BaseBlindCache(RopeCache):
    @staticmethod
    def key(p: RopeParams, freq_factors) -> tuple:
        return RopeCache.key(dataclasses.replace(p, freq_base=1.0), freq_factors)


class RopeCacheKeyWithoutBase(CpuBackend):
    """The RoPE cache key leaves out freq_base: a local and a global layer that differ only in
    it (Gemma 3 1B) share one table."""

    def _start_device(self, index: int) -> None:
        super()._start_device(index)
        self._caches[-1] = _BaseBlindCache()


class CopiesNotAwaited(CpuBackend):
    """copy_async whose destination does not wait for the copy; the data lands only when the
    host next synchronizes.  A gather that issues several copies and reads them before its one
    synchronize reads the poisoned destination."""

    def copy_async(self, src, dst_device, stream=None):
        dst = self.empty(src.shape, src.dtype, dst_device)
        source, target = plain(src), plain(dst)
        pending = self.__dict__.setdefault("_pending_copies", [])
        pending.append(lambda: np.copyto(target, source))
        return dst

    def synchronize(self, device=None) -> None:
        super().synchronize(device)
        pending = self.__dict__.get("_pending_copies", [])
        while pending:
            pending.pop(0)()


class RingMergeIgnoresLse(CpuBackend):
    """The ring's online-softmax merge averages the partial outputs, ignoring their lse."""

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        device = self._same_device("attn_merge", out=out, part_out=part_out)
        a, b = plain(out), plain(part_out)
        self._submit(device, stream, lambda: np.copyto(a, (a + b) / 2))


# -- broken engine parts (mixed in front of the engine a split uses) ------------------------------
class StaleReplayPositions:
    """Graph replay keeps the positions of the step it was captured on."""

    def write_inputs(self, buffers, inputs, first):
        if not first:
            inputs = {name: value for name, value in inputs.items() if name != "pos"}
        super().write_inputs(buffers, inputs, first)


class _ForwardZigzag(SequenceSplit):
    def chunks_of(self, device: int) -> tuple[int, ...]:
        if self.kind != "zigzag":
            return super().chunks_of(device)
        return (device, device + self.n_devices)  # should be 2N-1-device


class ZigzagWrongOrder:
    """The ring ships zigzag chunks r and N+r from device r, while tokens were placed on chunks
    r and 2N-1-r: the chunk assignment in the wrong order."""

    def make_split(self):
        return _ForwardZigzag(self.spec.split, self.spec.devices, self.cfg.capacity)


class EvictDeltasInBlocks:
    """Eviction deltas passed to KV_ROTATE in blocks where the LUT expects tokens."""

    def lut_rows(self, deltas_in_tokens):
        return deltas_in_tokens // self.cfg.block_size


class RotateValuesToo:
    """After eviction the values are re-rotated as well as the keys."""

    def rotate_cache(self, k_cache, v_cache, blocks, deltas, lut):
        super().rotate_cache(k_cache, v_cache, blocks, deltas, lut)
        self.b.kv_rotate(v_cache, blocks, deltas, lut, "rotate_half")


BACKEND_BUGS = [RopeCacheLayerZero, RopeCacheKeyWithoutBase, CopiesNotAwaited,
                RingMergeIgnoresLse]
ENGINE_BUGS = [StaleReplayPositions, ZigzagWrongOrder, EvictDeltasInBlocks, RotateValuesToo]


def engine_with(bug, split: str):
    """The engine class ``split`` uses, with the engine-part ``bug`` mixed in front."""
    from opbench.harness.scenario.judge import ENGINES

    base = ENGINES[split]
    return type(f"{bug.__name__}{base.__name__}", (bug, base), {})


# -- which axes catch what ------------------------------------------------------------------------
def run_bug(bug, spec):
    """One scenario with the bug in; returns the ScenarioResult."""
    from opbench.harness.scenario.judge import run_scenario, scenario_options

    backend_cls = bug if bug in BACKEND_BUGS else CpuBackend
    engine_cls = engine_with(bug, spec.split) if bug in ENGINE_BUGS else None
    backend = backend_cls(**scenario_options(spec))
    try:
        return run_scenario(backend, spec, engine_cls)
    finally:
        backend.close()


def catch_table(specs) -> dict:
    """bug name -> list of (spec, divergence) for every spec that caught it."""
    table = {}
    for bug in BACKEND_BUGS + ENGINE_BUGS:
        caught = []
        for spec in specs:
            result = run_bug(bug, spec)
            if not result.ok:
                caught.append((spec, result.divergence))
        table[bug.__name__] = caught
    return table


def main(delay: bool = False) -> None:
    from collections import Counter

    from opbench.harness.scenario.matrix import matrix

    specs = [s for s in matrix() if s.delay == delay]
    for name, caught in catch_table(specs).items():
        axes = Counter()
        for spec, _ in caught:
            axes.update([f"split={spec.split}", f"devices={spec.devices}",
                         f"rope_cache={spec.rope_cache}", f"graph_reuse={spec.graph_reuse}",
                         f"evict={spec.evict}", f"model={spec.model}"])
        first = caught[0][1].describe() if caught else "-"
        print(f"{name}: caught by {len(caught)}/{len(specs)} (delay {'on' if delay else 'off'});"
              f" e.g. {first}")
        print("   " + ", ".join(f"{k}:{v}" for k, v in sorted(axes.items())))
    sys.stdout.flush()


if __name__ == "__main__":
    main(delay="--delay" in sys.argv[1:])
