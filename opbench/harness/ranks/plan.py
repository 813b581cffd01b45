"""The messages a split must exchange per decode step: derived from the split plans
(splits.py) and the model's sizes alone, never from the engine that sends them.

- layer: the residual stream crosses once per device boundary, device d-1 -> d
  ([new tokens, d_model] f32);
- head: per layer the home device (0) sends the residual stream to every other device and
  gathers each one's attention output back (same size);
- ring / zigzag / stripe: per layer N-1 rounds, every device passes the KV chunk it holds to
  the next one, d -> (d + 1) mod N ([kv capacity, 2, kv heads, head dim] in the cache dtype).

A plan is, per rank, the multiset of (direction, peer, bytes).  A split that sends a block
twice, skips a hop or gathers to the wrong rank differs from it even when its numbers come
out right.
"""

from __future__ import annotations

from collections import Counter

from opbench.protocol import numpy_dtype

from ..scenario.config import ModelConfig, ScenarioSpec
from ..scenario.splits import SEQUENCE_SPLITS, layer_split

F32_BYTES = 4
Messages = Counter  # (direction, peer, nbytes) -> count


def step_plan(spec: ScenarioSpec, cfg: ModelConfig, n_new_tokens: int) -> list[Messages]:
    """Per rank, the messages of one step with ``n_new_tokens`` new tokens."""
    n = spec.devices
    plan = [Counter() for _ in range(n)]
    if n == 1:
        return plan
    if spec.split == "layer":
        _layer(plan, cfg, n, n_new_tokens * cfg.d_model * F32_BYTES)
    elif spec.split == "head":
        _head(plan, cfg, n, n_new_tokens * cfg.d_model * F32_BYTES)
    elif spec.split in SEQUENCE_SPLITS:
        kv_rows = cfg.n_seqs * cfg.capacity
        kv_bytes = numpy_dtype(spec.kv_dtype).itemsize  # the chunks are cache rows
        _ring(plan, cfg, n, kv_rows * 2 * cfg.n_kv_heads * cfg.head_dim * kv_bytes)
    return plan


def _message(plan: list[Messages], src: int, dst: int, nbytes: int, times: int = 1) -> None:
    plan[src][("send", dst, nbytes)] += times
    plan[dst][("recv", src, nbytes)] += times


def _layer(plan, cfg: ModelConfig, n: int, nbytes: int) -> None:
    ranges = layer_split(cfg.n_layers, n)
    for d in range(1, n):
        if len(ranges[d]):
            _message(plan, d - 1, d, nbytes)


def _head(plan, cfg: ModelConfig, n: int, nbytes: int) -> None:
    for d in range(1, n):
        _message(plan, 0, d, nbytes, cfg.n_layers)  # the residual stream out
        _message(plan, d, 0, nbytes, cfg.n_layers)  # the partial attention output back


def _ring(plan, cfg: ModelConfig, n: int, nbytes: int) -> None:
    for d in range(n):
        _message(plan, d, (d + 1) % n, nbytes, cfg.n_layers * (n - 1))


def describe_difference(step: int, rank: int, want: Messages, got: Messages) -> str | None:
    """None when equal; else one line naming the step, the rank and each difference."""
    if want == got:
        return None
    parts = []
    for (direction, peer, nbytes), count in sorted((want - got).items()):
        word = "to" if direction == "send" else "from"
        parts.append(f"missing {count} x {direction} {word} rank {peer} ({nbytes} B)")
    for (direction, peer, nbytes), count in sorted((got - want).items()):
        word = "to" if direction == "send" else "from"
        parts.append(f"unexpected {count} x {direction} {word} rank {peer} ({nbytes} B)")
    return f"communication at step {step}, rank {rank}: " + "; ".join(parts)


def counted(messages) -> Messages:
    return Counter((m.direction, m.peer, m.nbytes) for m in messages)
