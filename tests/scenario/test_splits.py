"""Split plans: coverage, contiguity, GQA validity, and owner/chunk agreement."""

from __future__ import annotations

import pytest

from opbench.harness.scenario.splits import (
    SequenceSplit,
    check_split,
    head_split,
    layer_owner,
    layer_split,
    ring_sources,
)


@pytest.mark.parametrize("n_layers,n_devices", [(6, 1), (6, 2), (6, 4), (7, 3), (24, 4)])
def test_layer_split_is_contiguous_and_every_later_device_starts_past_layer_0(n_layers,
                                                                              n_devices):
    ranges = layer_split(n_layers, n_devices)
    assert [layer for r in ranges for layer in r] == list(range(n_layers))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert all(r.start > 0 for r in ranges[1:])
    assert [layer_owner(layer, ranges) for layer in range(n_layers)] == sorted(
        d for d, r in enumerate(ranges) for _ in r)


def test_layer_split_rejects_more_devices_than_layers():
    with pytest.raises(ValueError, match="devices=5 must be <= n_layers=4"):
        layer_split(4, 5)


@pytest.mark.parametrize("n_heads,n_kv,n_devices", [(4, 2, 1), (4, 2, 2), (4, 2, 3), (4, 2, 4),
                                                    (8, 2, 3), (8, 8, 3), (6, 3, 5)])
def test_head_split_shards_are_valid_gqa_problems_covering_every_head_once(n_heads, n_kv,
                                                                           n_devices):
    group = n_heads // n_kv
    shards = head_split(n_heads, n_kv, n_devices)
    assert len(shards) == n_devices
    assert [h for s in shards for h in s.q_heads] == list(range(n_heads))
    for shard in shards:
        local_group = len(shard.q_heads) // len(shard.kv_heads)
        assert len(shard.q_heads) % len(shard.kv_heads) == 0
        for i, head in enumerate(shard.q_heads):
            # the attention op's local rule must read the kv head the global rule reads
            assert shard.kv_heads[i // local_group] == head // group


def test_head_split_rejects_more_devices_than_heads():
    with pytest.raises(ValueError, match="devices=5 must be <= n_heads=4"):
        head_split(4, 2, 5)


@pytest.mark.parametrize("kind", ["ring", "zigzag", "stripe"])
@pytest.mark.parametrize("n_devices", [1, 2, 3, 4])
def test_sequence_split_owner_agrees_with_the_chunks_the_ring_ships(kind, n_devices):
    split = SequenceSplit(kind, n_devices, capacity=23)
    for token in range(23):
        owner = split.owner(token)
        assert [d for d in range(n_devices) if split.holds(d, token)] == [owner]
    held = [t for d in range(n_devices) for t in split.tokens_of(d, range(23))]
    assert sorted(held) == list(range(23))


def test_zigzag_device_r_owns_chunks_r_and_2n_minus_1_minus_r():
    split = SequenceSplit("zigzag", 3, capacity=24)  # 6 chunks of 4
    assert [split.chunks_of(d) for d in range(3)] == [(0, 5), (1, 4), (2, 3)]
    assert split.tokens_of(1, range(24)) == [4, 5, 6, 7, 16, 17, 18, 19]


def test_zigzag_balances_causal_work_and_ring_does_not():
    def work(kind):  # keys each device's queries see under a causal mask
        split = SequenceSplit(kind, 4, capacity=64)
        return [sum(t + 1 for t in split.tokens_of(d, range(64))) for d in range(4)]

    assert max(work("zigzag")) - min(work("zigzag")) <= 64
    assert max(work("ring")) > 3 * min(work("ring"))


def test_stripe_is_every_nth_token():
    split = SequenceSplit("stripe", 3, capacity=10)
    assert split.tokens_of(2, range(10)) == [2, 5, 8]


def test_ring_sources_visit_every_device_once_starting_at_home():
    for n in range(1, 5):
        for d in range(n):
            sources = ring_sources(d, n)
            assert sources[0] == d and sorted(sources) == list(range(n))


def test_check_split_names_the_bad_argument():
    with pytest.raises(ValueError, match="split='diagonal' must be one of"):
        check_split("diagonal", 2)
    with pytest.raises(ValueError, match="split='none' runs on 1 device"):
        check_split("none", 2)
