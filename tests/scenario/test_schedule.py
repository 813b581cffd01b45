"""The host schedule: positions, slots, block tables and evictions."""

from __future__ import annotations

import numpy as np
import pytest

from opbench.harness.scenario.config import model_config
from opbench.harness.scenario.model import OracleModel, make_weights, scheduled_oracle
from opbench.harness.scenario.schedule import Scheduler, build_schedule, step_q_lens
from opbench.reference.kv_cache import evict


@pytest.fixture(scope="module")
def cfg():
    return model_config(n_layers=2, steps=5)


def evicting_schedule(cfg):
    return scheduled_oracle(cfg, make_weights(cfg), evict=True)[0]


def _slot_of(plan, s, position, block_size):
    return plan.block_table[s, position // block_size] * block_size + position % block_size


def test_every_new_token_sits_at_its_cache_position_and_slot(cfg):
    for plan in evicting_schedule(cfg):
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
    for plan in evicting_schedule(cfg):
        used = [plan.block_table[s, : -(-n // cfg.block_size)] for s, n in
                enumerate(plan.seq_lens)]
        flat = np.concatenate(used)
        assert len(np.unique(flat)) == len(flat)


def test_eviction_follows_the_reference_policy_over_the_attention_mass(cfg):
    """Scores accumulated here, independently, per token from the oracle's attention mass, and
    lifetimes counted as the queries that saw the token: the reference policy (NORM_SUM) over
    them decides exactly what the scheduler evicted."""
    scheduler, oracle = Scheduler(cfg, evict=True), OracleModel(cfg, make_weights(cfg))
    mass = np.zeros((cfg.n_seqs, cfg.capacity))
    life = np.zeros((cfg.n_seqs, cfg.capacity), np.int64)
    n_evictions = 0
    for step in range(cfg.steps + 1):
        plan = scheduler.step(step, step_q_lens(cfg, step))
        oracle.step(plan)
        for s, cached in enumerate(plan.cache_tokens):
            q_pos = plan.positions[plan.q_start[s]:plan.q_start[s + 1]]
            mass[s, cached] += oracle.step_mass[s]
            life[s, cached] += [(q_pos >= i).sum() for i in range(len(cached))]
        scheduler.evict_after(plan, oracle.step_mass)
        for e in plan.evictions:
            n_evictions += 1
            cached = plan.cache_tokens[e.seq]
            policy = evict(mass[e.seq, cached], start_size=cfg.start_size,
                           recent_size=cfg.recent_size, max_cache_size=cfg.max_cache_size,
                           block_size=cfg.block_size, aggregation="NORM_SUM",
                           token_counts=life[e.seq, cached])
            physical = plan.block_table[e.seq]
            assert list(e.freed_blocks) == physical[policy.evicted_blocks].tolist()
            moved = policy.deltas > 0
            assert e.rotate_blocks.tolist() == physical[policy.kept_blocks[moved]].tolist()
            assert e.block_deltas.tolist() == policy.deltas[moved].tolist()
            assert e.margin > 0.05  # far from a near-tie at the default seed
    assert n_evictions >= 2  # the default config evicts after the prefill and mid-decode


def test_attention_mass_is_probabilities_and_prompt_lifetimes_are_openvinos(cfg):
    """Each query's probabilities sum to 1 per head and layer; a prompt token t of n has seen
    n - t queries (OpenVINO GenAI's NORM_SUM default for a prompt)."""
    scheduler, oracle = Scheduler(cfg, evict=True), OracleModel(cfg, make_weights(cfg))
    plan = scheduler.step(0, step_q_lens(cfg, 0))
    oracle.step(plan)
    for s, n in enumerate(cfg.prompt_lens):
        np.testing.assert_allclose(oracle.step_mass[s].sum(), cfg.n_layers * cfg.n_heads * n,
                                   rtol=1e-12)
    scheduler.evict_after(plan, oracle.step_mass)
    for s, n in enumerate(cfg.prompt_lens):
        assert [scheduler.book.life[s][t] for t in range(n)] == list(range(n, 0, -1))


def test_an_evicting_schedule_needs_the_attention(cfg):
    with pytest.raises(ValueError, match="scheduled_oracle"):
        build_schedule(cfg, evict=True)


def test_after_eviction_kept_tokens_move_front_by_their_delta(cfg):
    plans = evicting_schedule(cfg)
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
    plans = evicting_schedule(model_config(n_layers=1, steps=12))
    freed = {b for plan in plans for e in plan.evictions for b in e.freed_blocks}
    later = {int(b) for plan in plans[1:] for s, n in enumerate(plan.seq_lens)
             for b in plan.block_table[s, : -(-n // 4)]}
    assert freed & later
