"""Stateful and multi-device bugs, one each: broken cpu backends and broken engine parts.

The scenario matrix must catch every one while the real cpu backend passes it
(test_scenario_zoo.py).  ``python tests/bugzoo/scenario_bugs.py [--delay]`` prints which axes
of the matrix's delay-off (delay-on) half catch each bug (the table in docs/scenarios.md).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from opbench.backends.common.arrays import plain
from opbench.backends.cpu import CpuBackend, kernels
from opbench.backends.cpu.rope_cache import RopeCache, _Table, rope_frequencies
from opbench.harness.ops.rope import oracle_kwargs
from opbench.harness.scenario.model import attention_mass, cfg_scale
from opbench.harness.scenario.splits import SequenceSplit
from opbench.protocol import RopeParams
from opbench.reference.attention import attention
from opbench.reference.copies import round_to
from opbench.reference.rope import rope_angles


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
    host next synchronizes the destination device (after the work queued there has run).  A
    gather that issues several copies and reads them before its one synchronize reads the
    poisoned destination.  (Landing on any synchronize made where the bug first shows depend
    on thread timing: a synchronize of another device could land the copy before the reading
    kernel ran, and a 3-device layer split then first diverged at layer 4 instead of 2.)"""

    def copy_async(self, src, dst_device, stream=None):
        dst = self.empty(src.shape, src.dtype, dst_device)
        source, target = plain(src), plain(dst)
        self._pending_copies().append((self.runtime.device(dst_device),
                                       lambda: np.copyto(target, source)))
        return dst

    def synchronize(self, device=None) -> None:
        super().synchronize(device)
        synced = None if device is None else self.runtime.device(device)
        pending = self._pending_copies()
        for entry in [e for e in pending if synced is None or e[0] is synced]:
            pending.remove(entry)
            entry[1]()

    def _pending_copies(self) -> list:
        return self.__dict__.setdefault("_copies_in_flight", [])


class RingMergeIgnoresLse(CpuBackend):
    """The ring's online-softmax merge averages the partial outputs, ignoring their lse."""

    def attn_merge(self, out, lse, part_out, part_lse, stream=None) -> None:
        device = self._same_device("attn_merge", out=out, part_out=part_out)
        a, b = plain(out), plain(part_out)
        self._submit(device, stream, lambda: np.copyto(a, (a + b) / 2))


class F16CacheAsBf16(CpuBackend):
    """SET_ROWS into an f16 cache rounds the values to bf16 first (the conversion kernel picked
    for the wrong 16-bit type): an f16 cache with bf16's 8-bit mantissa.  f32 and bf16 caches
    are right."""

    def set_rows(self, dst, src, slots, stream=None) -> None:
        if plain(dst).dtype != np.float16:
            return super().set_rows(dst, src, slots, stream)
        device = self._same_device("set_rows", dst=dst, src=src, slots=slots)
        target, source, where = plain(dst), plain(src), plain(slots)
        self._submit(device, stream, lambda: kernels.set_rows(
            target, round_to(source, "bf16").astype(np.float32), where))


class RopeDropsFreqFactors(CpuBackend):
    """The per-layer RoPE entry point forgets to pass freq_factors on: llama3 and longrope
    layers (and YaRN without truncation) rotate with the plain frequencies."""

    def rope_for_layer(self, x, pos, out, p, layer, freq_factors=None, stream=None) -> None:
        self.rope(x, pos, out, p, stream=stream)


class MropePositionsTokenMajor(CpuBackend):
    """mrope reads its positions token-major, ``pos[4 * token + section]`` (the layout of one
    position quadruple per token), instead of ggml's section-major ``[4, n_tokens]`` rows: the
    sections of a token turn by other tokens' positions (or by the fourth row's 0).  Text
    tokens give every row the same position, which hides a mix-up between the t, h and w rows
    but not this one."""

    def rope(self, x, pos, out, p, freq_factors=None, stream=None) -> None:
        if p.mode != "mrope":
            return super().rope(x, pos, out, p, freq_factors, stream)
        device = self._same_device("rope", x=x, pos=pos, out=out)
        cache = self._cache(device) if self.rope_cache else None
        ff = None if freq_factors is None else plain(freq_factors)
        token_major = plain(pos).reshape(-1, 4).T  # a view: read when the kernel runs
        args = (plain(x), token_major, plain(out))
        self._submit(device, stream, lambda: kernels.rope(*args, p, ff, cache))


class AlibiBiasFromCacheSlot(CpuBackend):
    """Paged ATTN takes ALiBi's positions from the cache slots of the keys and the queries
    (block * block_size + offset, the index it just computed to read the key) instead of
    their positions in the sequence.  While a sequence's blocks are contiguous and in order
    the slots are the positions plus one offset, which cancels in slope * (k - q); once a
    sequence grows into a later free block, or an eviction compacts its block table, the
    bias is wrong."""

    def attention(self, q, k, v, out, p, mask=None, sinks=None, lse=None, paged=None,
                  stream=None) -> None:
        if paged is None or p.max_bias == 0:
            return super().attention(q, k, v, out, p, mask, sinks, lse, paged, stream)
        device = self._same_device("attention", q=q, k=k, v=v, out=out)
        arrays = [None if a is None else plain(a) for a in (
            q, k, v, out, lse, paged.block_table, paged.seq_lens, paged.q_start)]
        self._submit(device, stream, lambda: _slot_alibi_attention(*arrays, p))


def _slot_alibi_attention(q, k_cache, v_cache, out, lse, table, seq_lens, q_start, p):
    block = k_cache.shape[1]
    keys, values = (c.reshape((-1,) + c.shape[2:]).astype(np.float64) for c in (k_cache, v_cache))
    for s in range(len(seq_lens)):
        rows, n_kv = slice(int(q_start[s]), int(q_start[s + 1])), int(seq_lens[s])
        n_q = rows.stop - rows.start
        positions = np.arange(n_kv)
        slots = table[s, positions // block] * block + positions % block
        future = positions[None, :] > positions[n_kv - n_q:, None]  # causal by position
        o, l_se = attention(q[rows], keys[slots], values[slots], scale=p.scale,
                            mask=np.where(future, -np.inf, 0.0), max_bias=p.max_bias,
                            q_pos=slots[n_kv - n_q:], k_pos=slots, return_lse=True)
        out[rows] = o
        if lse is not None:
            lse[rows] = l_se


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
        self.b.kv_rotate(v_cache, blocks, deltas, lut, self.cfg.kv_layout)


class ScoresFromLogits:
    """Eviction scores accumulate the pre-softmax logits scale*q.k instead of the attention
    probabilities: every number the model computes is right, the blocks it evicts are not."""

    def token_mass(self, q, keys, lse, q_pos):
        q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
        k = np.repeat(keys, q.shape[1] // keys.shape[1], axis=1)
        logits = cfg_scale(self.cfg) * np.einsum("qhd,khd->qhk", q, k)
        visible = np.arange(len(keys))[None, None, :] <= np.asarray(q_pos)[:, None, None]
        return np.where(visible, logits, 0.0).sum(axis=(0, 1))


class LutWithAttentionFactor:
    """The re-rotation LUT is taken from the layer's RoPE cos/sin table, attention factor
    included (YaRN's mscale, longrope's scaling): every eviction scales the kept keys again."""

    def rotation_lut(self, layer):
        cos, sin = rope_angles(np.arange(self.cfg.capacity + 1),
                               freq_factors=self.cfg.freq_factors(layer),
                               **oracle_kwargs(self.cfg.rope_params(layer), angles_only=True))
        return np.concatenate([cos, -sin], axis=1).astype(np.float32)


class MropeTextPositionInOneRow:
    """The engine writes a text token's position into the temporal row of mrope's ``[4, n]``
    positions only (a port from a one-row position API), leaving the height and width rows
    0: Qwen2-VL's text tokens need the position in all three."""

    def write_inputs(self, buffers, inputs, first):
        if self.cfg.mrope:
            inputs = {**inputs, "pos": [np.concatenate([p[:1], np.zeros_like(p[1:])])
                                        for p in inputs["pos"]]}
        super().write_inputs(buffers, inputs, first)


class MassWithoutAlibi:
    """The eviction scores leave ALiBi's bias out of the logits, exp(scale*q.k - lse), while
    the backend's lse has it: the probabilities of a rotary model's formula, wrong for ALiBi
    (every number the model computes is right, the blocks it evicts are not)."""

    def token_mass(self, q, keys, lse, q_pos):
        return attention_mass(q, keys, lse, q_pos, cfg_scale(self.cfg))


BACKEND_BUGS = [RopeCacheLayerZero, RopeCacheKeyWithoutBase, CopiesNotAwaited,
                RingMergeIgnoresLse, F16CacheAsBf16, RopeDropsFreqFactors,
                MropePositionsTokenMajor, AlibiBiasFromCacheSlot]
ENGINE_BUGS = [StaleReplayPositions, ZigzagWrongOrder, EvictDeltasInBlocks, RotateValuesToo,
               ScoresFromLogits, LutWithAttentionFactor, MropeTextPositionInOneRow,
               MassWithoutAlibi]


# -- communication bugs (devices as ranks) ---------------------------------------------------------
# Concrete classes, not made by engine_with: the rank processes unpickle them by name.
from opbench.backends.runtimes.ranks import RankRuntime  # noqa: E402
from opbench.harness.scenario.engine import PagedEngine  # noqa: E402
from opbench.harness.scenario.ring import SequenceEngine  # noqa: E402


class SendBeforeSourceDone(RankRuntime):
    """The send is posted as soon as the host asks, not after the work queued on the source:
    the message carries what the source held when it was posted (the poison the buffers were
    made with, or older data).

    Left to the threads' timing, the race is lost only when the host runs ahead of the device;
    on a loaded machine the device can finish first and the bug go unseen (it did, once, in
    CI).  So the device is held from each send until the next send has been posted (or the
    host waits for the device): the work that computes the next source runs after its message
    has left, every run."""

    _held = None  # the gate on this rank's device, placed after the last send

    def _send(self, source, device, peer) -> None:
        compute, held = self.stream(device), self._held
        posted: list = []

        def post() -> None:
            self._log("send", peer, source.nbytes)
            snapshot = source.copy()  # what the source holds now, not when the wire reads it
            posted[:] = [self.transport.isend(snapshot, peer, self._next_tag("send", peer))]
            if held is not None:
                held.release()

        self.send_stream.submit(post)  # missing: send_stream.wait(compute.record())
        compute.wait(self.send_stream.record())
        compute.submit(lambda: posted[0]())
        self._held = self.hold(compute)

    def _let_the_device_run(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def synchronize(self, device=None) -> None:
        self._let_the_device_run()
        super().synchronize(device)

    def to_host(self, arr):
        self._let_the_device_run()  # another rank's values may wait on this rank's messages
        return super().to_host(arr)


class SendBeforeSourceDoneHostBehind(SendBeforeSourceDone):
    """The same bug with the host 50 ms late to every send, as on a loaded machine: the device
    has long finished the source, and the bug must still be caught."""

    def _send(self, source, device, peer) -> None:
        time.sleep(0.05)
        super()._send(source, device, peer)


class ReceiveIntoWrongBuffer(RankRuntime):
    """Receive buffers rotated wrongly: a message lands in the buffer of the previous receive
    from the same peer, the new destination keeps its poison (or the old data)."""

    def _receive(self, target, device, peer) -> None:
        previous = self.__dict__.setdefault("_last_target", {})
        wrong = previous.get(peer, np.empty_like(target))
        previous[peer] = target
        if wrong.shape != target.shape:
            wrong = np.empty_like(target)
        super()._receive(wrong, device, peer)


class RingHopSkipped(SequenceEngine):
    """The ring's last device does not pass its chunk on in round 0: device 0 attends to its
    own chunk twice and never sees the last device's."""

    def _layer(self, layer, xs, buf):
        n_dev = len(self.devices)
        qs, chunks = zip(*(self._project(layer, d, xs[d], buf) for d in range(n_dev)))
        accs = [None] * n_dev
        for r in range(n_dev):
            for d in range(n_dev):
                accs[d] = self._round(d, qs[d], chunks[d], buf[f"mask{r}"][d], accs[d])
            if r + 1 < n_dev:
                chunks = [chunks[0] if (r == 0 and d == 0) else
                          self._send(chunks[(d - 1) % n_dev], d) for d in range(n_dev)]
        return [self._residual(layer, d, xs[d], accs[d][0], buf) for d in range(n_dev)]


class BlockSentTwice(SequenceEngine):
    """Every ring hop ships its KV block twice and uses the second copy: the numbers are right,
    the traffic is doubled."""

    def _send(self, chunk, device):
        super()._send(chunk, device)
        return super()._send(chunk, device)


class GatherToWrongRank(PagedEngine):
    """Head split: the partial outputs are gathered on device 1 and the sum sent home after,
    instead of gathering on the home device (same sums in the same order: right numbers)."""

    def _layer(self, layer, x, buf):
        home, x_out = self.home(layer), buf["x"][layer]
        x = self.on(x, home)
        parts = [self._attend(layer, d, s, self.on(x, d), buf) for d, s in
                 self.layer_shards(layer)]
        collector = 1 if len(parts) > 1 else home
        gathered = [self.on(y, collector) for y in parts]
        total = gathered[0]
        for y in gathered[1:]:
            summed = self.poisoned(total.shape, collector)
            self.b.add(total, y, summed)
            total = summed
        self.b.add(x, self.on(total, home), x_out)
        return x_out


#: bug -> (split, what catches it: "oracle" (the numbers) or "pattern" (the message check))
RANK_BUGS = {
    SendBeforeSourceDone: ("ring", "oracle"),
    ReceiveIntoWrongBuffer: ("layer", "oracle"),
    RingHopSkipped: ("ring", "pattern"),
    BlockSentTwice: ("zigzag", "pattern"),
    GatherToWrongRank: ("head", "pattern"),
}


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
                         f"evict={spec.evict}", f"model={spec.model}",
                         f"kv_dtype={spec.kv_dtype}"])
        first = caught[0][1].describe() if caught else "-"
        print(f"{name}: caught by {len(caught)}/{len(specs)} (delay {'on' if delay else 'off'});"
              f" e.g. {first}")
        print("   " + ", ".join(f"{k}:{v}" for k, v in sorted(axes.items())))
    sys.stdout.flush()


if __name__ == "__main__":
    main(delay="--delay" in sys.argv[1:])
