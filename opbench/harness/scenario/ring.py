"""Sequence splits (ring / zigzag / stripe): tokens live on devices, KV chunks travel the ring.

Each device owns the tokens ``SequenceSplit.owner`` gives it: their residual stream, and their
K and V rows side by side in a per-layer local store ``[rows + 1, 2, Hkv, D]`` (the extra row
stays zero: padding reads it).  Per layer every device computes q/k/v of its tokens, writes
K/V, gathers its chunk (the kept tokens its chunks hold, GET_ROWS), then N rounds: attend its
queries to the chunk it holds (contiguous ATTN with an additive mask that hides other
sequences, padding and the future: causal per block from the real positions), merge the
partial (out, lse) by online softmax (``attn_merge``), and pass the chunk on to the next device
with copy_async.  Shapes are padded to fixed capacities so a decode step can be captured once
and replayed.
"""

from __future__ import annotations

import numpy as np

from .engine import F32, I32, Engine, Readout
from .model import StepResult, step_inputs
from .schedule import Eviction, StepPlan
from .splits import SequenceSplit, ring_sources


class LocalStore:
    """Host bookkeeping of one device's K/V rows: (seq, token) -> row, lowest free row first."""

    def __init__(self, n_rows: int) -> None:
        self.pad_row = n_rows
        self.row_of: dict[tuple[int, int], int] = {}
        self.free = list(range(n_rows))

    def allocate(self, key: tuple[int, int]) -> int:
        row = self.free.pop(0)
        self.row_of[key] = row
        return row

    def release(self, key: tuple[int, int]) -> None:
        if key in self.row_of:
            self.free = sorted(self.free + [self.row_of.pop(key)])


class SequenceEngine(Engine):
    def __init__(self, backend, spec, cfg, weights) -> None:
        super().__init__(backend, spec, cfg, weights)
        self.split = self.make_split()
        self.n_rows = cfg.n_seqs * cfg.capacity
        self.kv_cap = self.n_rows
        self.stores = [LocalStore(self.n_rows) for _ in self.devices]
        self._upload()

    def make_split(self) -> SequenceSplit:
        return SequenceSplit(self.spec.split, self.spec.devices, self.cfg.capacity)

    def _upload(self) -> None:
        cfg, w = self.cfg, self.w
        # K and V of a token side by side in one row: one GET_ROWS and one copy per chunk
        shape = (self.n_rows + 1, 2, cfg.n_kv_heads, cfg.head_dim)
        self.weights, self.stores_kv = {}, {}
        for d in range(len(self.devices)):
            for layer in range(cfg.n_layers):
                self.weights[layer, d] = {name: self.put(getattr(w, name)[layer], d)
                                          for name in ("norm", "wq", "wk", "wv", "wo")}
                self.stores_kv[layer, d] = self._store(shape, d)
            self.weights["out_norm", d] = self.put(w.out_norm, d)

    def _store(self, shape, device: int):
        store = np.full(shape, np.nan, self.kv)
        store[-1] = 0.0  # the padding row: read under a -inf mask, so it must be finite
        return self.put(store, device)

    # -- host side -----------------------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> dict:
        n_dev = len(self.devices)
        queries = self._place_queries(plan)
        self._rows_of_step = queries
        q_cap = max([self.cfg.n_seqs] + [len(q) for q in queries])
        chunks = [self._chunk(src, plan) for src in range(n_dev)]
        x = step_inputs(self.w, plan)
        inputs: dict = {name: [] for name in ("x_in", "pos", "slots", "kv_rows")}
        inputs.update({f"mask{r}": [] for r in range(n_dev)})
        for d, rows in enumerate(queries):
            inputs["x_in"].append(_padded(x[[r[0] for r in rows]], q_cap, 0.0))
            positions = _padded(np.array([r[2] for r in rows], I32), q_cap, 0)
            inputs["pos"].append(self.cfg.rope_positions(positions))
            inputs["slots"].append(_padded(np.array([r[3] for r in rows], I32), q_cap, -1))
            inputs["kv_rows"].append(_padded(np.array([c[2] for c in chunks[d]], I32),
                                             self.kv_cap, self.stores[d].pad_row))
            for r, src in enumerate(ring_sources(d, n_dev)):
                inputs[f"mask{r}"].append(_mask(rows, chunks[src], q_cap, self.kv_cap))
        return inputs

    def _place_queries(self, plan: StepPlan) -> list[list[tuple]]:
        """Per device: (packed row, seq, position, store row) of the new tokens it owns."""
        queries: list[list[tuple]] = [[] for _ in self.devices]
        for s, tokens in enumerate(plan.new_tokens):
            for i, token in enumerate(tokens):
                packed = int(plan.q_start[s]) + i
                d = self.split.owner(int(token))
                row = self.stores[d].allocate((s, int(token)))
                queries[d].append((packed, s, int(plan.positions[packed]), row))
        return queries

    def _chunk(self, src: int, plan: StepPlan) -> list[tuple]:
        """(seq, position, store row) of the cached tokens the ring ships from ``src``."""
        chunk = []
        for s, cached in enumerate(plan.cache_tokens):
            position = {int(t): i for i, t in enumerate(cached)}
            for token in self.split.tokens_of(src, [int(t) for t in cached]):
                row = self.stores[src].row_of.get((s, token), self.stores[src].pad_row)
                chunk.append((s, position[token], row))
        return chunk

    # -- device side ---------------------------------------------------------------------------
    def allocate(self, plan: StepPlan, inputs: dict) -> dict:
        cfg = self.cfg
        buffers = self.input_buffers(inputs)
        q_cap = inputs["pos"][0].shape[-1]  # mrope: [4, q_cap]
        buffers["x"] = [[self.poisoned((q_cap, cfg.d_model), d) for d in range(len(self.devices))]
                        for _ in range(cfg.n_layers)]
        buffers["out"] = [self.poisoned((q_cap, cfg.d_model), d) for d in range(len(self.devices))]
        return buffers

    def enqueue(self, buf: dict) -> None:
        xs = buf["x_in"]
        for layer in range(self.cfg.n_layers):
            xs = self._layer(layer, xs, buf)
        for d, x in enumerate(xs):
            self.b.rms_norm(x, self.weights["out_norm", d], buf["out"][d], self.cfg.eps)

    def _layer(self, layer: int, xs: list, buf: dict) -> list:
        n_dev = len(self.devices)
        qs, chunks = zip(*(self._project(layer, d, xs[d], buf) for d in range(n_dev)))
        accs = [None] * n_dev
        for r in range(n_dev):
            for d in range(n_dev):
                accs[d] = self._round(d, qs[d], chunks[d], buf[f"mask{r}"][d], accs[d])
            if r + 1 < n_dev:  # every device passes the chunk it holds to the next one
                chunks = [self._send(chunks[(d - 1) % n_dev], d) for d in range(n_dev)]
        for d in range(n_dev):  # the merged lse: the softmax over every chunk
            self._mass_parts[layer, d] = (qs[d], accs[d][1])
        return [self._residual(layer, d, xs[d], accs[d][0], buf) for d in range(n_dev)]

    def _project(self, layer: int, d: int, x, buf: dict):
        cfg, w, b = self.cfg, self.weights[layer, d], self.b
        n, hd, n_h, n_kv = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        h, q, k, v = (self.poisoned(shape, d) for shape in (
            (n, cfg.d_model), (n, n_h * hd), (n, n_kv * hd), (n, n_kv * hd)))
        b.rms_norm(x, w["norm"], h, cfg.eps)
        for weight, out in ((w["wq"], q), (w["wk"], k), (w["wv"], v)):
            b.matmul(h, weight, out)
        pos = buf["pos"][d]
        q_rot = self.rotate(layer, d, q, pos, (n, n_h, hd))
        k_rot = self.rotate(layer, d, k, pos, (n, n_kv, hd))
        store = self.stores_kv[layer, d]
        b.set_rows(store[:, 0], k_rot, buf["slots"][d])
        b.set_rows(store[:, 1], v.reshape(n, n_kv, hd), buf["slots"][d])
        chunk = self.poisoned((self.kv_cap, 2, n_kv, hd), d, self.kv)
        b.get_rows(store, buf["kv_rows"][d], chunk)
        return self.convert(q_rot, self.kv, d), chunk

    def _round(self, d: int, q, chunk, mask, acc):
        """Attend to one chunk; the first round's partial is the accumulator, later ones merge."""
        out = self.poisoned(q.shape, d, self.kv)
        lse = self.poisoned(q.shape[:2], d)
        self.b.attention(q, chunk[:, 0], chunk[:, 1], out, self.cfg.attn_params(causal=False),
                         mask=mask, lse=lse)
        out = self.convert(out, F32, d)  # partials merge in f32
        if acc is None:
            return out, lse
        self.b.attn_merge(acc[0], acc[1], out, lse)
        return acc

    def _send(self, chunk, device: int):
        return self.b.copy_async(chunk, self.devices[device])

    def _residual(self, layer: int, d: int, x, att, buf: dict):
        cfg = self.cfg
        n = att.shape[0]
        y = self.poisoned((n, cfg.d_model), d)
        self.b.matmul(att.reshape(n, -1), self.weights[layer, d]["wo"], y)
        x_out = buf["x"][layer][d]
        self.b.add(x, y, x_out)
        return x_out

    def read(self, buf: dict, plan: StepPlan, inputs: dict) -> Readout:
        owner = np.zeros(plan.n_q, np.int64)
        for d, rows in enumerate(self._rows_of_step):
            owner[[r[0] for r in rows]] = d

        def gather(per_device):
            packed = np.full((plan.n_q, self.cfg.d_model), np.nan)
            for d, rows in enumerate(self._rows_of_step):
                local = self.b.to_host(per_device[d])
                packed[[r[0] for r in rows]] = local[: len(rows)]
            return packed

        layers = [gather(buf["x"][layer]) for layer in range(self.cfg.n_layers)]
        return Readout(StepResult(layers, gather(buf["out"])), [owner] * self.cfg.n_layers)

    def attention_mass(self, plan: StepPlan) -> list[np.ndarray]:
        mass = [np.zeros(len(cached)) for cached in plan.cache_tokens]
        for layer in range(self.cfg.n_layers):
            stores = [self.b.to_host(self.stores_kv[layer, d]) for d in range(len(self.devices))]
            for d, rows in enumerate(self._rows_of_step):
                q_rot, lse = self._mass_parts[layer, d]
                q, lse_host = self.b.to_host(q_rot), self.b.to_host(lse)
                for s, cached in enumerate(plan.cache_tokens):
                    mine = [i for i, row in enumerate(rows) if row[1] == s]
                    if mine:
                        keys = np.stack([self._key(stores, layer, s, int(t)) for t in cached])
                        q_pos = np.array([rows[i][2] for i in mine])
                        mass[s] += self.token_mass(q[mine], keys, lse_host[mine], q_pos)
        return mass

    def _key(self, stores: list, layer: int, s: int, token: int) -> np.ndarray:
        owner = self.split.owner(token)
        return stores[owner][self.stores[owner].row_of[(s, token)], 0]

    def evict(self, eviction: Eviction) -> None:
        s = eviction.seq
        for d, store in enumerate(self.stores):
            moved = [(store.row_of[(s, t)], delta) for t, delta in eviction.token_deltas.items()
                     if (s, t) in store.row_of]
            if moved and self.cfg.rotary:  # ALiBi: nothing to turn
                rows = np.array([m[0] for m in moved], I32)
                deltas = self.lut_rows(np.array([m[1] for m in moved], I32))[:, None]
                for layer in range(self.cfg.n_layers):
                    self._rotate_rows(layer, d, rows, deltas.astype(I32))
            for token in eviction.evicted_tokens:
                store.release((s, token))

    def _rotate_rows(self, layer: int, d: int, rows, deltas) -> None:
        """The store viewed as blocks of one token: per-token deltas are per-block deltas."""
        store = self.stores_kv[layer, d]
        as_blocks = (store.shape[0], 1) + store.shape[2:]
        k, v = store[:, 0].reshape(as_blocks), store[:, 1].reshape(as_blocks)
        self.rotate_cache(k, v, self.put(rows, d), self.put(deltas, d),
                          self._upload_lut(layer, d))


def _padded(values: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full((size,) + values.shape[1:], fill, values.dtype)
    out[: len(values)] = values
    return out


def _mask(queries: list[tuple], chunk: list[tuple], q_cap: int, kv_cap: int) -> np.ndarray:
    """0 where query (seq, pos) may see key (seq, pos): same sequence, key not in the future."""
    mask = np.full((q_cap, kv_cap), -np.inf, F32)
    if queries and chunk:
        q_seq = np.array([q[1] for q in queries])[:, None]
        q_pos = np.array([q[2] for q in queries])[:, None]
        k_seq = np.array([c[0] for c in chunk])[None, :]
        k_pos = np.array([c[1] for c in chunk])[None, :]
        visible = (q_seq == k_seq) & (k_pos <= q_pos)
        mask[: len(queries), : len(chunk)] = np.where(visible, 0.0, -np.inf)
    return mask
