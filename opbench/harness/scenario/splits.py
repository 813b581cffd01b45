"""Split plans: which device owns which layers, heads or tokens.  Pure functions, no arrays of
any backend, so a CUDA backend (or any engine) can reuse them.

- ``layer_split``: contiguous layer ranges, earlier devices get the extra layers; every device
  but the first starts at a layer > 0 (the case a layer-0-only RoPE cache gets wrong).
- ``head_split``: query heads and the kv heads they read, per device, such that each device's
  shard is itself a valid GQA problem (local query head h reads local kv head h // group).
- ``SequenceSplit``: token index -> device for ring (N contiguous chunks), zigzag (2N chunks,
  device r owns chunks r and 2N-1-r, balancing causal work) and stripe (token t on t % N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("none", "layer", "head", "ring", "zigzag", "stripe")
SEQUENCE_SPLITS = ("ring", "zigzag", "stripe")


def check_split(split: str, n_devices: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"devices={n_devices!r} must be an int >= 1")
    if split == "none" and n_devices != 1:
        raise ValueError(f"split='none' runs on 1 device, got devices={n_devices}")


def layer_split(n_layers: int, n_devices: int) -> list[range]:
    """Contiguous layer ranges, one per device, sizes differing by at most one."""
    if n_devices > n_layers:
        raise ValueError(f"devices={n_devices} must be <= n_layers={n_layers} for split='layer'")
    sizes = [len(part) for part in np.array_split(np.arange(n_layers), n_devices)]
    starts = np.cumsum([0] + sizes)
    return [range(int(starts[d]), int(starts[d + 1])) for d in range(n_devices)]


def layer_owner(layer: int, ranges: list[range]) -> int:
    return next(d for d, r in enumerate(ranges) if layer in r)


@dataclass(frozen=True)
class HeadShard:
    q_heads: range
    kv_heads: range


def head_split(n_heads: int, n_kv_heads: int, n_devices: int) -> list[HeadShard]:
    """Heads over devices.  Up to n_kv_heads devices: whole kv groups per device.  More: the
    devices are dealt to the groups and each group's query heads split among its devices."""
    group = n_heads // n_kv_heads
    if n_devices > n_heads:
        raise ValueError(f"devices={n_devices} must be <= n_heads={n_heads} for split='head'")
    if n_devices <= n_kv_heads:
        kv_parts = np.array_split(np.arange(n_kv_heads), n_devices)
        return [HeadShard(range(int(p[0]) * group, (int(p[-1]) + 1) * group),
                          range(int(p[0]), int(p[-1]) + 1)) for p in kv_parts]
    per_group = [len(p) for p in np.array_split(np.arange(n_devices), n_kv_heads)]
    shards = []
    for kv, n_parts in enumerate(per_group):
        for part in np.array_split(np.arange(kv * group, (kv + 1) * group), n_parts):
            shards.append(HeadShard(range(int(part[0]), int(part[-1]) + 1), range(kv, kv + 1)))
    return shards


class SequenceSplit:
    """Token index (append order within its sequence, never changes) -> owning device.

    ``capacity`` is the most tokens a sequence will ever have; chunks are fixed up front so a
    token never moves once its K/V are written.  ``owner`` (where a new token's residual stream,
    K and V go) and ``chunks_of`` (which chunks the ring ships from a device) must agree: the
    zigzag order bug in the zoo breaks exactly that agreement."""

    def __init__(self, kind: str, n_devices: int, capacity: int) -> None:
        if kind not in SEQUENCE_SPLITS:
            raise ValueError(f"kind={kind!r} must be one of {SEQUENCE_SPLITS}")
        self.kind, self.n_devices, self.capacity = kind, n_devices, capacity
        n_chunks = {"ring": n_devices, "zigzag": 2 * n_devices, "stripe": 0}[kind]
        self.chunk_size = -(-capacity // n_chunks) if n_chunks else 1

    def chunk_of(self, token: int) -> int:
        return token // self.chunk_size if self.kind != "stripe" else token

    def chunks_of(self, device: int) -> tuple[int, ...]:
        """Chunk indices a device owns, in its local order (ring/zigzag only)."""
        if self.kind == "ring":
            return (device,)
        return (device, 2 * self.n_devices - 1 - device)

    def owner(self, token: int) -> int:
        if self.kind == "stripe":
            return token % self.n_devices
        chunk = self.chunk_of(token)
        if self.kind == "ring":
            return chunk
        return chunk if chunk < self.n_devices else 2 * self.n_devices - 1 - chunk

    def holds(self, device: int, token: int) -> bool:
        """Whether ``device``'s chunks contain ``token`` (the ring's view of the layout)."""
        if self.kind == "stripe":
            return token % self.n_devices == device
        return self.chunk_of(token) in self.chunks_of(device)

    def tokens_of(self, device: int, tokens) -> list[int]:
        """The given tokens that ``device`` holds, in chunk order then token order."""
        if self.kind == "stripe":
            return [t for t in tokens if self.holds(device, t)]
        order = {c: i for i, c in enumerate(self.chunks_of(device))}
        held = [t for t in tokens if self.holds(device, t)]
        return sorted(held, key=lambda t: (order[self.chunk_of(t)], t))


def ring_sources(device: int, n_devices: int) -> list[int]:
    """The device whose KV chunk ``device`` holds at ring round r = 0..N-1: (device - r) mod N."""
    return [(device - r) % n_devices for r in range(n_devices)]
