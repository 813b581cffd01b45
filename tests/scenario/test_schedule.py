"""The host schedule: positions, slots, block tables and evictions."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.harness.scenario.config import model_config
from opbench.harness.scenario.schedule import Scheduler, build_schedule
from opbench.reference.kv_cache import evict


@pytest.fixture(scope="module")
def cfg():
    return model_config(n_layers=2, steps=5)


def _slot_of(plan, s, position, block_size):
    return plan.block_table[s, position // block_size] * block_size + position % block_size


def test_every_new_token_sits_at_its_cache_position_and_slot(cfg):
    for plan in build_schedule(cfg, evict=True):
        for s, tokens in enumerate(plan.new_tokens):
            rows = range(plan.q_start[s], plan.q_start[s + 1])
            for row, token in zip(rows, tokens):
                position = plan.positions[row]
                assert plan.cache_tokens[s][position] == token
                assert plan.slots[row] == _slot_of(plan, s, position, cfg.block_size)
            assert position == plan.seq_lens[s] - 1  # new tokens are the last in the cache


def test_without_eviction_positions_are_token_indices(cfg):
    plans = build_schedule(cfg, evict=False)
    assert not any(plan.evictions for plan in plans)
    last = plans[-1]
    assert last.seq_lens.tolist() == [n + cfg.steps for n in cfg.prompt_lens]
    for cached in last.cache_tokens:
        assert cached.tolist() == list(range(len(cached)))


def test_no_two_sequences_share_a_block(cfg):
    for plan in build_schedule(cfg, evict=True):
        used = [plan.block_table[s, : -(-n // cfg.block_size)] for s, n in
                enumerate(plan.seq_lens)]
        flat = np.concatenate(used)
        assert len(np.unique(flat)) == len(flat)


def test_eviction_follows_the_reference_policy(cfg):
    scheduler = Scheduler(cfg, evict=True)
    n_evictions = 0
    for step in range(cfg.steps + 1):
        q_lens = list(cfg.prompt_lens) if step == 0 else [1] * cfg.n_seqs
        plan = scheduler.step(step, q_lens)
        for e in plan.evictions:
            n_evictions += 1
            cached = plan.cache_tokens[e.seq]
            policy = evict(scheduler.scores[e.seq][cached], start_size=cfg.start_size,
                           recent_size=cfg.recent_size, max_cache_size=cfg.max_cache_size,
                           block_size=cfg.block_size)
            physical = plan.block_table[e.seq]
            assert list(e.freed_blocks) == physical[policy.evicted_blocks].tolist()
            moved = policy.deltas > 0
            assert e.rotate_blocks.tolist() == physical[policy.kept_blocks[moved]].tolist()
            assert e.block_deltas.tolist() == policy.deltas[moved].tolist()
    assert n_evictions >= 2  # the default config evicts after the prefill and mid-decode


def test_after_eviction_kept_tokens_move_front_by_their_delta(cfg):
    plans = build_schedule(cfg, evict=True)
    for before, after in zip(plans, plans[1:]):
        for e in before.evictions:
            old = {int(t): i for i, t in enumerate(before.cache_tokens[e.seq])}
            new = {int(t): i for i, t in enumerate(after.cache_tokens[e.seq])}
            for token, delta in e.token_deltas.items():
                assert new[token] == old[token] - delta
            assert not set(e.evicted_tokens) & set(new)
            # the step after continues from the compacted cache length
            assert after.seq_lens[e.seq] == len(old) - len(e.evicted_tokens) + 1


def test_freed_blocks_are_reused(cfg):
    plans = build_schedule(model_config(n_layers=1, steps=12), evict=True)
    freed = {b for plan in plans for e in plan.evictions for b in e.freed_blocks}
    later = {int(b) for plan in plans[1:] for s, n in enumerate(plan.seq_lens)
             for b in plan.block_table[s, : -(-n // 4)]}
    assert freed & later
