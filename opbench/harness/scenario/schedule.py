"""The host-side schedule of a scenario: which tokens each step adds, where they go in the paged
cache, and what eviction does after each step.  No numerics: both the engine (driving a backend)
and the float64 oracle follow the same schedule, so they agree on every decision.

Positions follow StreamingLLM: a token's position is its index in the (compacted) cache; after
an eviction the kept tokens move towards the front (their keys are re-rotated by the number of
tokens evicted before them) and new tokens continue from the cache length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opbench.reference.kv_cache import evict as evict_plan

from .config import ModelConfig


@dataclass(frozen=True)
class Eviction:
    """One sequence's eviction after a step.  ``rotate_blocks`` are physical blocks whose keys
    move; ``block_deltas`` their shift in tokens; ``token_deltas`` the shift of each kept token
    (by token index) for storages that are not block-paged."""

    seq: int
    rotate_blocks: np.ndarray  # int32 [R]
    block_deltas: np.ndarray  # int32 [R], tokens
    token_deltas: dict[int, int]  # token index -> tokens evicted before it (kept tokens, > 0)
    freed_blocks: tuple[int, ...]
    evicted_tokens: tuple[int, ...]


@dataclass
class StepPlan:
    step: int  # 0 = prefill
    new_tokens: list[np.ndarray]  # per sequence: token indices appended this step
    positions: np.ndarray  # int32 [n_q] packed: cache index of every new token
    slots: np.ndarray  # int32 [n_q] paged-cache slot of every new token
    q_start: np.ndarray  # int32 [n_seqs + 1]
    seq_lens: np.ndarray  # int32 [n_seqs] cache length after this step's writes
    block_table: np.ndarray  # int32 [n_seqs, max_blocks] (unused entries 0)
    cache_tokens: list[np.ndarray]  # per sequence: token index at each cache position
    evictions: list[Eviction] = field(default_factory=list)  # applied after the step

    @property
    def n_q(self) -> int:
        return int(self.q_start[-1])


class _Sequence:
    def __init__(self) -> None:
        self.tokens: list[int] = []  # token index at each cache position
        self.blocks: list[int] = []  # physical block of each logical block
        self.appended = 0


class Scheduler:
    """Allocates paged-cache blocks (lowest free first, freed blocks reused) and evicts."""

    def __init__(self, cfg: ModelConfig, evict: bool) -> None:
        self.cfg, self.evict = cfg, evict
        per_seq = -(-cfg.capacity // cfg.block_size)
        self.max_blocks = per_seq
        self.num_blocks = per_seq * cfg.n_seqs
        self.free = list(range(self.num_blocks))
        self.seqs = [_Sequence() for _ in range(cfg.n_seqs)]
        # a token's eviction score: seeded, fixed per (sequence, token) like accumulated attention
        self.scores = [np.random.default_rng((cfg.seed, 7, s)).random(cfg.capacity)
                       for s in range(cfg.n_seqs)]

    def step(self, step: int, q_lens: list[int]) -> StepPlan:
        new, positions, slots = [], [], []
        for seq, n_new in zip(self.seqs, q_lens):
            start = seq.appended
            new.append(np.arange(start, start + n_new))
            for token in range(start, start + n_new):
                positions.append(len(seq.tokens))
                slots.append(self._append(seq, token))
        plan = self._plan(step, new, positions, slots, q_lens)
        if self.evict:
            plan.evictions = [e for s in range(len(self.seqs)) if (e := self._evict(s))]
        return plan

    def _append(self, seq: _Sequence, token: int) -> int:
        bs = self.cfg.block_size
        if len(seq.tokens) == len(seq.blocks) * bs:
            seq.blocks.append(self.free.pop(0))
        slot = seq.blocks[-1] * bs + len(seq.tokens) % bs
        seq.tokens.append(token)
        seq.appended += 1
        return slot

    def _plan(self, step, new, positions, slots, q_lens) -> StepPlan:
        table = np.zeros((len(self.seqs), self.max_blocks), np.int32)
        for s, seq in enumerate(self.seqs):
            table[s, : len(seq.blocks)] = seq.blocks
        return StepPlan(
            step=step, new_tokens=new, positions=np.array(positions, np.int32),
            slots=np.array(slots, np.int32),
            q_start=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
            seq_lens=np.array([len(s.tokens) for s in self.seqs], np.int32),
            block_table=table, cache_tokens=[np.array(s.tokens) for s in self.seqs])

    def _evict(self, s: int) -> Eviction | None:
        cfg, seq = self.cfg, self.seqs[s]
        plan = evict_plan(self.scores[s][seq.tokens], start_size=cfg.start_size,
                          recent_size=cfg.recent_size, max_cache_size=cfg.max_cache_size,
                          block_size=cfg.block_size)
        if len(plan.evicted_blocks) == 0:
            return None
        bs = cfg.block_size
        moved = plan.deltas > 0
        token_deltas = {seq.tokens[b * bs + i]: int(d)
                        for b, d in zip(plan.kept_blocks[moved], plan.deltas[moved])
                        for i in range(min(bs, len(seq.tokens) - b * bs))}
        eviction = Eviction(
            seq=s, rotate_blocks=np.array([seq.blocks[b] for b in plan.kept_blocks[moved]],
                                          np.int32),
            block_deltas=plan.deltas[moved].astype(np.int32), token_deltas=token_deltas,
            freed_blocks=tuple(seq.blocks[b] for b in plan.evicted_blocks),
            evicted_tokens=tuple(t for b in plan.evicted_blocks
                                 for t in seq.tokens[b * bs:(b + 1) * bs]))
        seq.tokens = [t for b in plan.kept_blocks for t in seq.tokens[b * bs:(b + 1) * bs]]
        seq.blocks = [seq.blocks[b] for b in plan.kept_blocks]
        self.free = sorted(self.free + list(eviction.freed_blocks))
        return eviction


def build_schedule(cfg: ModelConfig, evict: bool) -> list[StepPlan]:
    """The prefill (every prompt at once) then ``cfg.steps`` decode steps of one token each."""
    scheduler = Scheduler(cfg, evict)
    plans = [scheduler.step(0, list(cfg.prompt_lens))]
    for step in range(1, cfg.steps + 1):
        plans.append(scheduler.step(step, [1] * cfg.n_seqs))
    return plans


def cache_blocks(cfg: ModelConfig) -> tuple[int, int]:
    """(num_blocks, max_blocks per sequence) of the paged caches the schedule addresses."""
    s = Scheduler(cfg, False)
    return s.num_blocks, s.max_blocks
