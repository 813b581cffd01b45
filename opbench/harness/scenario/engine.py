"""The engine: runs the scenario's model on a backend, step by step, through the protocol only.

Every step: host prepares the step's inputs (positions, slots, block tables, masks) from the
schedule; the step is built (buffers allocated, ops enqueued on every device's stream) -- or,
with graph reuse, built once for the decode shape, captured, and replayed with the new inputs
written into its buffers; the host reads back the residual stream after every layer and the
output; with eviction on, the host also reads the step's rotated queries, the attention's lse
and the cached keys, and computes the attention probability mass every cached token received
(``attention_mass``: what the backend's attention gave it, the input of the eviction decision);
then evictions re-rotate the kept keys with KV_ROTATE (outside the graph).  An ALiBi model
(no RoPE) skips ROPE and the re-rotation: its attention's bias reads the keys' compacted
positions, which the block table already gives.  mrope layers get ROPE's ``[4, n]`` positions
(``ModelConfig.rope_positions``).

``PagedEngine`` serves splits none/layer/head (paged KV cache, paged ATTN);
``ring.SequenceEngine`` serves ring/zigzag/stripe.  Methods named as engine "parts"
(``rotation_lut``, ``lut_rows``, ``rotate_cache``, ``write_inputs``, ``token_mass``) are what
the bug zoo overrides.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from opbench.protocol import PagedKV, numpy_dtype
from opbench.reference.rope import rope_frequencies

from ..ops.rope import oracle_kwargs
from .config import ModelConfig, ScenarioSpec
from .model import StepResult, Weights, attention_mass, cfg_scale, step_inputs
from .schedule import StepPlan, cache_blocks
from .splits import HeadShard, head_split, layer_owner, layer_split

F32, I32 = np.float32, np.int32


def rotation_lut(cfg: ModelConfig, layer: int) -> np.ndarray:
    """KV_ROTATE's LUT for a layer, one row per token of shift: [cos | -sin] of d * omega_i at
    that layer's RoPE frequencies (freq_scale, freq_factors and the YaRN ramp included, so
    scaled layers rotate back by their own angles).

    No magnitude: a cached key is mscale * R(p * omega) k, and R(-d * omega) turns it into
    mscale * R((p - d) * omega) k, the key RoPE gives at p - d.  The attention factor (YaRN's
    mscale, longrope's scaling) belongs to that first rotation; a LUT carrying it would scale
    the key again at every eviction."""
    kwargs = oracle_kwargs(cfg.rope_params(layer), angles_only=True)
    del kwargs["sections"]
    omega, _mscale = rope_frequencies(**kwargs, freq_factors=cfg.freq_factors(layer))
    # partial (interleaved) rotation: the pairs past the rotary dims turn by angle 0
    omega = np.pad(omega, (0, cfg.head_dim // 2 - len(omega)))
    angles = np.arange(cfg.capacity + 1, dtype=np.float64)[:, None] * omega
    return np.concatenate([np.cos(angles), -np.sin(angles)], axis=1).astype(F32)


@dataclass
class Readout:
    """What the host reads back after a step, plus where each layer ran."""

    result: StepResult
    layer_devices: list[Any]  # per layer: device index, or an int array per packed row
    mass: list[np.ndarray] | None = None  # per sequence and cache position (eviction on)


class Engine:
    """Common machinery: devices, streams, graph reuse, the step loop.  A split's engine
    provides ``prepare`` (host inputs per device), ``allocate`` (the step's buffers),
    ``enqueue`` (the step's ops), ``read`` and ``evict``."""

    def __init__(self, backend, spec: ScenarioSpec, cfg: ModelConfig, weights: Weights) -> None:
        self.b, self.spec, self.cfg, self.w = backend, spec, cfg, weights
        self.devices = backend.devices(spec.devices)
        self.streams = [backend.stream(d) for d in self.devices]
        self.graph = None
        self.graph_buffers = None
        self.kv = numpy_dtype(spec.kv_dtype)  # the caches' dtype
        self.luts = ([self.rotation_lut(layer) for layer in range(cfg.n_layers)] if cfg.rotary
                     else [])  # ALiBi: no key to re-rotate
        self._luts_on_device: dict = {}
        # (layer, device) -> the layer's freq_factors on that device, uploaded before any
        # capture (a graph replays the buffers it was captured with)
        self.freq_factors = {(layer, d): self.put(cfg.freq_factors(layer), d)
                             for layer in range(cfg.n_layers) for d in range(len(self.devices))
                             if cfg.freq_factors(layer) is not None}
        # (layer, shard or device) -> (rotated queries, lse) of the step: what the mass needs
        self._mass_parts: dict = {}
        # set by the judge (with eviction on): the mass reads every device's cache from one
        # host, which a run with devices as separate ranks cannot
        self.collect_mass = False

    # -- helpers ---------------------------------------------------------------------------------
    def put(self, host: np.ndarray, device: int):
        return self.b.to_device(np.ascontiguousarray(host), self.devices[device])

    def input_buffers(self, inputs: dict) -> dict:
        """One poisoned buffer per host input and device, filled later by ``write_inputs``."""
        return {name: [self.poisoned(h.shape, d, h.dtype) for d, h in enumerate(per_device)]
                for name, per_device in inputs.items()}

    def poisoned(self, shape, device: int, dtype=F32):
        """A buffer reading NaN (ints -1) until written: a skipped write shows.  Made by the
        backend's ``empty``, never uploaded from the host: inside a capture a GPU refuses a
        host upload, and the step's intermediates are made there."""
        return self.b.empty(tuple(shape), dtype, self.devices[device])

    def convert(self, x, dtype, device: int):
        """x in ``dtype`` (CPY); x itself when the cache is f32, as nothing then converts.
        A cache in f16 / bf16 is attended in its dtype: the queries are converted to it and
        the attention's output back to f32 (as llama.cpp's flash attention over an f16 cache)."""
        if self.spec.kv_dtype == "f32":
            return x
        out = self.poisoned(x.shape, device, dtype)
        self.b.cpy(x, out, tuple(range(len(x.shape))), 1)
        return out

    def on(self, arr, device: int):
        """arr on ``device``: itself, or an async copy (ordered by copy_async's contract)."""
        if self._device_index(arr) == device:
            return arr
        return self.b.copy_async(arr, self.devices[device])

    def _device_index(self, arr) -> int:
        return self.devices.index(self.b.device_of(arr))

    # -- the step loop ---------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> Readout:
        inputs = self.prepare(plan)
        if self.spec.graph_reuse and plan.step > 0:
            buffers = self._replay(plan, inputs)
        else:
            buffers = self.allocate(plan, inputs)
            self.write_inputs(buffers, inputs, first=True)
            self.enqueue(buffers)
        readout = self.read(buffers, plan, inputs)
        if self.collect_mass:  # before the eviction re-rotates the keys the step attended to
            readout.mass = self.attention_mass(plan)
        for eviction in plan.evictions:
            self.evict(eviction)
        return readout

    def _replay(self, plan: StepPlan, inputs: dict):
        if self.graph is None:
            self.graph_buffers = self.allocate(plan, inputs)
            self.write_inputs(self.graph_buffers, inputs, first=True)
            self.b.capture_begin(self.streams)
            try:
                self.enqueue(self.graph_buffers)
            except BaseException:
                self._abandon_capture()
                raise
            self.graph = self.b.capture_end(self.streams)
        else:
            self.write_inputs(self.graph_buffers, inputs, first=False)
        self.b.replay(self.graph)
        return self.graph_buffers

    def _abandon_capture(self) -> None:
        """End a capture that an op broke, so the op's error is the one reported: on a GPU an
        illegal call invalidates the capture, and every later call on its streams (the
        backend's close() included) fails with a capture error that hides the first."""
        with contextlib.suppress(Exception):  # an invalidated capture ends with its own error
            self.b.capture_end(self.streams)

    def write_inputs(self, buffers: dict, inputs: dict, first: bool) -> None:
        """Write this step's host inputs into the step's buffers (every device's copy)."""
        for name, per_device in inputs.items():
            for target, host in zip(buffers[name], per_device):
                self.b.write(target, host)

    # -- eviction ----------------------------------------------------------------------------------
    def token_mass(self, q, keys, lse, q_pos) -> np.ndarray:
        """Per key, the probability mass of the backend's attention: exp(scale*q.k - lse)."""
        return attention_mass(q, keys, lse, q_pos, cfg_scale(self.cfg), self.cfg.max_bias)

    def rotation_lut(self, layer: int) -> np.ndarray:
        """KV_ROTATE's LUT of ``layer`` (module ``rotation_lut``)."""
        return rotation_lut(self.cfg, layer)

    def lut_rows(self, deltas_in_tokens: np.ndarray) -> np.ndarray:
        """KV_ROTATE deltas are LUT rows; our LUT has one row per token."""
        return deltas_in_tokens

    def rotate_cache(self, k_cache, v_cache, blocks, deltas, lut) -> None:
        """Re-rotate the kept keys.  Values carry no position: they are never rotated."""
        self.b.kv_rotate(k_cache, blocks, deltas, lut, self.cfg.kv_layout)

    def rotate(self, layer: int, device: int, x, pos, shape: tuple):
        """x ``[n, heads * D]`` through ``layer``'s ROPE into a new ``[n, heads, D]`` buffer;
        for an ALiBi model x itself, reshaped (its positions act in the attention)."""
        if not self.cfg.rotary:
            return x.reshape(shape)
        out = self.poisoned(shape, device)
        self.b.rope_for_layer(x.reshape(shape), pos, out, self.cfg.rope_params(layer), layer,
                              freq_factors=self.freq_factors.get((layer, device)))
        return out

    def _upload_lut(self, layer: int, device: int):
        key = (layer, device)
        if key not in self._luts_on_device:
            self._luts_on_device[key] = self.put(self.luts[layer], device)
        return self._luts_on_device[key]


class PagedEngine(Engine):
    """split none / layer / head: whole-sequence paged KV caches, the paged ATTN op."""

    def __init__(self, backend, spec, cfg, weights) -> None:
        super().__init__(backend, spec, cfg, weights)
        n = spec.devices
        self.ranges = layer_split(cfg.n_layers, n) if spec.split == "layer" else None
        full = HeadShard(range(cfg.n_heads), range(cfg.n_kv_heads))
        self.shards = head_split(cfg.n_heads, cfg.n_kv_heads, n) if spec.split == "head" else [full]
        self.num_blocks, _ = cache_blocks(cfg)
        self._upload_weights()
        self._allocate_caches()

    def home(self, layer: int) -> int:
        """The device holding the residual stream after ``layer``."""
        return layer_owner(layer, self.ranges) if self.ranges else 0

    def layer_shards(self, layer: int) -> list[tuple[int, int]]:
        """(device, shard index) pairs computing ``layer``."""
        if self.spec.split == "head":
            return [(d, d) for d in range(len(self.shards))]
        return [(self.home(layer), 0)]

    def _upload_weights(self) -> None:
        cfg, w, hd = self.cfg, self.w, self.cfg.head_dim
        self.weights: dict = {}
        for layer in range(cfg.n_layers):
            for device, s in self.layer_shards(layer):
                sh = self.shards[s]
                q = slice(sh.q_heads.start * hd, sh.q_heads.stop * hd)
                kv = slice(sh.kv_heads.start * hd, sh.kv_heads.stop * hd)
                self.weights[layer, s] = dict(
                    norm=self.put(w.norm[layer], device), wq=self.put(w.wq[layer][:, q], device),
                    wk=self.put(w.wk[layer][:, kv], device),
                    wv=self.put(w.wv[layer][:, kv], device), wo=self.put(w.wo[layer][q], device))
        last = self.home(cfg.n_layers - 1)
        self.out_norm = self.put(w.out_norm, last)

    def _allocate_caches(self) -> None:
        cfg = self.cfg
        self.caches: dict = {}
        for layer in range(cfg.n_layers):
            for device, s in self.layer_shards(layer):
                shape = (self.num_blocks, cfg.block_size, len(self.shards[s].kv_heads),
                         cfg.head_dim)
                self.caches[layer, s] = (self.poisoned(shape, device, self.kv),
                                         self.poisoned(shape, device, self.kv))

    # -- per step --------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> dict:
        n = self.spec.devices
        host = dict(x_in=[step_inputs(self.w, plan)], pos=self.cfg.rope_positions(plan.positions),
                    slots=plan.slots,
                    block_table=plan.block_table, seq_lens=plan.seq_lens, q_start=plan.q_start)
        inputs = {name: [value] * n for name, value in host.items() if name != "x_in"}
        inputs["x_in"] = host["x_in"]  # only on the first layer's device
        return inputs

    def allocate(self, plan: StepPlan, inputs: dict) -> dict:
        cfg, n_q = self.cfg, plan.n_q
        buffers = self.input_buffers({k: v for k, v in inputs.items() if k != "x_in"})
        buffers["x_in"] = [self.poisoned(inputs["x_in"][0].shape, self.home(0))]
        buffers["x"] = [self.poisoned((n_q, cfg.d_model), self.home(layer))
                        for layer in range(cfg.n_layers)]
        buffers["out"] = [self.poisoned((n_q, cfg.d_model), self.home(cfg.n_layers - 1))]
        return buffers

    def enqueue(self, buf: dict) -> None:
        x = buf["x_in"][0]
        for layer in range(self.cfg.n_layers):
            x = self._layer(layer, x, buf)
        self.b.rms_norm(x, self.out_norm, buf["out"][0], self.cfg.eps)

    def _layer(self, layer: int, x, buf: dict):
        home, x_out = self.home(layer), buf["x"][layer]
        x = self.on(x, home)  # layer split: the activations cross to the layer's device
        parts = [self._attend(layer, d, s, self.on(x, d), buf) for d, s in self.layer_shards(layer)]
        # head split: several async copies to the home device in flight, then one reduction
        gathered = [self.on(y, home) for y in parts]
        total = gathered[0]
        for y in gathered[1:]:
            summed = self.poisoned(total.shape, home)
            self.b.add(total, y, summed)
            total = summed
        self.b.add(x, total, x_out)
        return x_out

    def _attend(self, layer: int, device: int, s: int, x, buf: dict):
        cfg, w, b = self.cfg, self.weights[layer, s], self.b
        n_q, hd = x.shape[0], cfg.head_dim
        n_h, n_kv = len(self.shards[s].q_heads), len(self.shards[s].kv_heads)
        h, q, k, v = (self.poisoned(shape, device) for shape in (
            (n_q, cfg.d_model), (n_q, n_h * hd), (n_q, n_kv * hd), (n_q, n_kv * hd)))
        b.rms_norm(x, w["norm"], h, cfg.eps)
        for weight, out in ((w["wq"], q), (w["wk"], k), (w["wv"], v)):
            b.matmul(h, weight, out)
        pos = buf["pos"][device]
        q_rot = self.rotate(layer, device, q, pos, (n_q, n_h, hd))
        k_rot = self.rotate(layer, device, k, pos, (n_q, n_kv, hd))
        k_cache, v_cache = self.caches[layer, s]
        flat = (self.num_blocks * cfg.block_size, n_kv, hd)
        b.set_rows(k_cache.reshape(flat), k_rot, buf["slots"][device])
        b.set_rows(v_cache.reshape(flat), v.reshape(n_q, n_kv, hd), buf["slots"][device])
        q_kv, att = self.convert(q_rot, self.kv, device), self.poisoned((n_q, n_h, hd), device,
                                                                        self.kv)
        paged = PagedKV(buf["block_table"][device], buf["seq_lens"][device], buf["q_start"][device])
        lse = self.poisoned((n_q, n_h), device) if self.spec.evict else None
        b.attention(q_kv, k_cache, v_cache, att, cfg.attn_params(), lse=lse, paged=paged)
        self._mass_parts[layer, s] = (q_kv, lse)
        y = self.poisoned((n_q, cfg.d_model), device)
        b.matmul(self.convert(att, F32, device).reshape(n_q, n_h * hd), w["wo"], y)
        return y

    def read(self, buf: dict, plan: StepPlan, inputs: dict) -> Readout:
        layers = [self.b.to_host(x).astype(np.float64) for x in buf["x"]]
        output = self.b.to_host(buf["out"][0]).astype(np.float64)
        return Readout(StepResult(layers, output),
                       [self.home(layer) for layer in range(self.cfg.n_layers)])

    def attention_mass(self, plan: StepPlan) -> list[np.ndarray]:
        cfg = self.cfg
        mass = [np.zeros(len(cached)) for cached in plan.cache_tokens]
        for (layer, s), (q_rot, lse) in self._mass_parts.items():
            q, lse_host = self.b.to_host(q_rot), self.b.to_host(lse)
            k_cache = self.b.to_host(self.caches[layer, s][0])
            keys = k_cache.reshape((-1,) + k_cache.shape[2:])
            for seq in range(cfg.n_seqs):
                rows = slice(int(plan.q_start[seq]), int(plan.q_start[seq + 1]))
                cache_pos = np.arange(int(plan.seq_lens[seq]))
                slots = (plan.block_table[seq, cache_pos // cfg.block_size] * cfg.block_size
                         + cache_pos % cfg.block_size)
                mass[seq] += self.token_mass(q[rows], keys[slots], lse_host[rows],
                                             plan.positions[rows])
        return mass

    def evict(self, eviction) -> None:
        if not self.cfg.rotary:  # ALiBi: nothing to turn; the block table compacts the keys
            return
        deltas = self.lut_rows(eviction.block_deltas)[:, None].astype(I32)
        for (layer, _shard), (k_cache, v_cache) in self.caches.items():
            device = self._device_index(k_cache)
            self.rotate_cache(k_cache, v_cache, self.put(eviction.rotate_blocks, device),
                              self.put(deltas, device), self._upload_lut(layer, device))
