"""The host-side schedule of a scenario: which tokens each step adds, where they go in the paged
cache, and what eviction does after each step.  Eviction decisions come from attention: every
step adds, per cached token, the attention probability mass it received (``ScoreBook``), and
the policy evicts the lowest-scoring blocks.  The float64 oracle's probabilities make the
schedule both sides run; the engine's own book, fed with the backend's probabilities, must
reach the same decisions (``judge.check_evictions``).

Positions follow StreamingLLM: a token's position is its index in the (compacted) cache; after
an eviction the kept tokens move towards the front (their keys are re-rotated by the number of
tokens evicted before them) and new tokens continue from the cache length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opbench.reference.kv_cache import EvictionPlan, block_scores
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
    margin: float = np.inf  # score gap between the kept and evicted blocks (``decision_margin``)


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


class ScoreBook:
    """Per sequence and token (by token index): the attention probability mass it has received,
    summed over layers, query heads and the queries of every step it was cached for, and its
    lifetime (the number of queries that could see it; a prompt token t of n gets n - t, as
    OpenVINO GenAI counts a prompt "as if added one by one", then one per decode step).
    OpenVINO keeps one book per layer and evicts per layer; the scenario's layers share one
    block table, so the book sums the layers."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.mass: list[dict[int, float]] = [{} for _ in range(cfg.n_seqs)]
        self.life: list[dict[int, int]] = [{} for _ in range(cfg.n_seqs)]

    def add(self, plan: StepPlan, step_mass: list[np.ndarray]) -> None:
        """``step_mass[s]``: this step's mass per cache position of sequence s."""
        for s, (tokens, mass) in enumerate(zip(plan.cache_tokens, step_mass)):
            q_pos = plan.positions[plan.q_start[s]:plan.q_start[s + 1]]
            seen = (q_pos[None, :] >= np.arange(len(tokens))[:, None]).sum(axis=1)
            for token, m, n in zip(tokens.tolist(), mass, seen):
                self.mass[s][token] = self.mass[s].get(token, 0.0) + float(m)
                self.life[s][token] = self.life[s].get(token, 0) + int(n)

    def decide(self, s: int, tokens: list[int]) -> tuple[EvictionPlan, float]:
        """The policy's plan for sequence s holding ``tokens``, and its ``decision_margin``."""
        cfg = self.cfg
        scores = np.array([self.mass[s][t] for t in tokens])
        counts = np.array([self.life[s][t] for t in tokens])
        sizes = dict(start_size=cfg.start_size, recent_size=cfg.recent_size,
                     max_cache_size=cfg.max_cache_size, block_size=cfg.block_size)
        plan = evict_plan(scores, aggregation=cfg.score_aggregation, token_counts=counts,
                          **sizes)
        blocks = block_scores(scores, block_size=cfg.block_size,
                              aggregation=cfg.score_aggregation, token_counts=counts)
        return plan, decision_margin(blocks, plan, cfg, len(tokens))


def decision_margin(blocks: np.ndarray, plan: EvictionPlan, cfg: ModelConfig,
                    n_tokens: int) -> float:
    """How far the decision is from flipping: (lowest kept evictable block score - highest
    evicted one) / highest block score; inf when nothing is evicted.  A small margin is a
    near-tie: a backend whose probabilities differ by rounding may decide otherwise."""
    if len(plan.evicted_blocks) == 0:
        return np.inf
    first = cfg.start_size // cfg.block_size
    end = n_tokens // cfg.block_size - cfg.recent_size // cfg.block_size
    evictable = np.arange(first, end)
    kept = np.setdiff1d(evictable, plan.evicted_blocks)
    if len(kept) == 0:
        return np.inf
    gap = blocks[kept].min() - blocks[plan.evicted_blocks].max()
    return float(gap / max(blocks.max(), 1e-300))


class Scheduler:
    """Allocates paged-cache blocks (lowest free first, freed blocks reused) and evicts: after
    each step, ``evict_after`` with the step's attention mass."""

    def __init__(self, cfg: ModelConfig, evict: bool) -> None:
        self.cfg, self.evict = cfg, evict
        per_seq = -(-cfg.capacity // cfg.block_size)
        self.max_blocks = per_seq
        self.num_blocks = per_seq * cfg.n_seqs
        self.free = list(range(self.num_blocks))
        self.seqs = [_Sequence() for _ in range(cfg.n_seqs)]
        self.book = ScoreBook(cfg)

    def step(self, step: int, q_lens: list[int]) -> StepPlan:
        new, positions, slots = [], [], []
        for seq, n_new in zip(self.seqs, q_lens):
            start = seq.appended
            new.append(np.arange(start, start + n_new))
            for token in range(start, start + n_new):
                positions.append(len(seq.tokens))
                slots.append(self._append(seq, token))
        return self._plan(step, new, positions, slots, q_lens)

    def evict_after(self, plan: StepPlan, step_mass: list[np.ndarray]) -> None:
        """Add the step's attention mass to the book and set ``plan.evictions``."""
        if self.evict:
            self.book.add(plan, step_mass)
            plan.evictions = [e for s in range(len(self.seqs)) if (e := self._evict(s))]

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
        plan, margin = self.book.decide(s, seq.tokens)
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
                                 for t in seq.tokens[b * bs:(b + 1) * bs]), margin=margin)
        seq.tokens = [t for b in plan.kept_blocks for t in seq.tokens[b * bs:(b + 1) * bs]]
        seq.blocks = [seq.blocks[b] for b in plan.kept_blocks]
        self.free = sorted(self.free + list(eviction.freed_blocks))
        return eviction


def step_q_lens(cfg: ModelConfig, step: int) -> list[int]:
    """The prefill (every prompt at once) then decode steps of one token per sequence."""
    return list(cfg.prompt_lens) if step == 0 else [1] * cfg.n_seqs


def build_schedule(cfg: ModelConfig, evict: bool = False) -> list[StepPlan]:
    """The schedule without eviction (with it, the decisions need the run's attention:
    ``model.scheduled_oracle``)."""
    if evict:
        raise ValueError("an evicting schedule follows the attention: use scheduled_oracle")
    scheduler = Scheduler(cfg, False)
    return [scheduler.step(step, step_q_lens(cfg, step)) for step in range(cfg.steps + 1)]


def cache_blocks(cfg: ModelConfig) -> tuple[int, int]:
    """(num_blocks, max_blocks per sequence) of the paged caches the schedule addresses."""
    s = Scheduler(cfg, False)
    return s.num_blocks, s.max_blocks
