"""Where ESP puts blocks: the per-instance free queues.

* ``InstanceFreeQueues.take_counts`` (pure): stripe / fill / spill.
* ``InstanceFreeQueues`` over real vLLM ``KVCacheBlock`` objects: the
  placement is honoured and the per-instance queues keep their counts
  through vLLM's queue API.

The placement policies themselves are tested without vLLM in
``tests/core/test_esp_placement_policy.py``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from vllm_esp.core.esp.placement import StoragePlacement
from vllm_esp.core.esp.step_plan import instance_of
from vllm_esp.integration.esp.free_queues import InstanceFreeQueues

take_counts = InstanceFreeQueues.take_counts


def expand(counts):
    return [i for i, c in counts for _ in range(c)]


# ------------------------------------------------------------------ take_counts
def test_take_counts_without_placement_takes_the_most_free_first():
    assert take_counts(4, None, [3, 5, 2]) == [(1, 4)]
    assert take_counts(6, None, [3, 5, 2]) == [(1, 5), (0, 1)]
    # Ties go to the lowest instance.
    assert take_counts(2, None, [4, 4]) == [(0, 2)]
    assert take_counts(0, None, [1, 1]) == []


def test_take_counts_fill_follows_the_preference_order():
    fill = StoragePlacement((2, 0))
    assert take_counts(2, fill, [3, 5, 2]) == [(2, 2)]
    assert take_counts(4, fill, [3, 5, 2]) == [(2, 2), (0, 2)]
    # Both preferred exhausted: the rest spills to the most free (instance 1).
    assert take_counts(7, fill, [3, 5, 2]) == [(2, 2), (0, 3), (1, 2)]


def test_take_counts_stripe_deals_round_robin():
    stripe = StoragePlacement((0, 1), stripe=True)
    assert take_counts(5, stripe, [3, 5, 2]) == [(0, 1), (1, 1), (0, 1), (1, 1), (0, 1)]
    # An exhausted instance drops out of the round.
    assert take_counts(4, stripe, [1, 5]) == [(0, 1), (1, 3)]
    # Preference order is the dealing order.
    assert expand(take_counts(4, StoragePlacement((2, 0), stripe=True), [9, 9, 9])) == [2, 0, 2, 0]


def test_take_counts_spill_ignores_unknown_instances_and_does_not_mutate():
    free = [1, 1]
    assert take_counts(2, StoragePlacement((7, -1)), free) == [(0, 1), (1, 1)]
    assert free == [1, 1]
    assert take_counts(3, StoragePlacement((0,)), [2, 1, 4]) == [(0, 2), (2, 1)]
    # Spill: most free first, whole runs, then the next most free.
    assert take_counts(6, StoragePlacement((0,)), [1, 2, 4]) == [(0, 1), (2, 4), (1, 1)]


def test_take_counts_raises_when_blocks_run_out():
    with pytest.raises(ValueError, match="not enough free blocks"):
        take_counts(4, None, [1, 2])
    with pytest.raises(ValueError, match="not enough free blocks"):
        take_counts(4, StoragePlacement((0, 1), stripe=True), [1, 2])
    with pytest.raises(ValueError):
        take_counts(1, StoragePlacement((0,)), [0, 0])


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    free=st.lists(st.integers(0, 8), min_size=1, max_size=5),
    stripe=st.booleans(),
    use_placement=st.booleans(),
)
def test_take_counts_properties(data, free, stripe, use_placement):
    n = data.draw(st.integers(0, sum(free)))
    preferred = []
    placement = None
    if use_placement:
        preferred = data.draw(st.permutations(range(len(free))))
        preferred = preferred[: data.draw(st.integers(0, len(free)))]
        placement = StoragePlacement(tuple(preferred), stripe=stripe)
    counts = take_counts(n, placement, free)
    assert all(c > 0 for _, c in counts)
    assert all(a[0] != b[0] for a, b in itertools.pairwise(counts))  # run-length encoded
    order = expand(counts)
    assert len(order) == n
    got = [order.count(i) for i in range(len(free))]
    assert all(g <= f for g, f in zip(got, free)), "took more than free"
    # The preferred instances give what they have before anyone else does.
    from_preferred = sum(got[i] for i in preferred)
    assert from_preferred == min(n, sum(free[i] for i in preferred))
    spill = [i for i in order if i not in preferred]
    if spill:
        assert order[:from_preferred] == [i for i in order if i in preferred]
        # The first spill instance had the most free blocks among the others.
        others = [i for i in range(len(free)) if i not in preferred]
        assert free[spill[0]] == max(free[i] for i in others)
    if placement is not None and not stripe:
        # Fill: an instance is used only once every earlier one is exhausted.
        for k, i in enumerate(preferred):
            if got[i] and k:
                assert all(got[p] == free[p] for p in preferred[:k])
        assert order[:from_preferred] == sorted(order[:from_preferred], key=preferred.index)
    if placement is not None and stripe:
        # Round-robin: counts differ by more than one only for exhausted instances.
        for p in preferred:
            for q in preferred:
                if got[p] + 1 < got[q]:
                    assert got[p] == free[p]
        head = order[: min(n, sum(1 for p in preferred if free[p] > 0))]
        assert len(set(head)) == len(head)


def test_take_counts_with_an_empty_preference_spills():
    assert take_counts(0, StoragePlacement(()), []) == []
    assert take_counts(2, StoragePlacement((), stripe=True), [0, 2]) == [(1, 2)]


# ------------------------------------------------------------------ queues
N, B = 3, 4


def make_queues(num_instances=N, per_instance=B, num_blocks=None):
    num_blocks = num_instances * per_instance if num_blocks is None else num_blocks
    blocks = [KVCacheBlock(i) for i in range(num_blocks)]
    queues = InstanceFreeQueues(blocks, num_instances, per_instance, exclude=[blocks[0]])
    return blocks, queues


def free_ids(queues):
    return [[b.block_id for b in q.get_all_free_blocks()] for q in queues.queues]


def test_queues_split_blocks_by_instance_and_exclude_the_null_block():
    _, q = make_queues()
    assert q.free_per_instance() == [B - 1, B, B]
    assert q.num_free_blocks == N * B - 1
    assert free_ids(q) == [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(b.block_id for b in q.get_all_free_blocks()) == list(range(1, N * B))
    # Fewer global blocks than N x B: the last instance is short.
    _, short = make_queues(num_blocks=10)
    assert short.free_per_instance() == [3, 4, 2]
    with pytest.raises(ValueError, match="do not fit"):
        InstanceFreeQueues([KVCacheBlock(i) for i in range(13)], N, B)


def test_popleft_n_honours_the_placement():
    _, q = make_queues()
    q.placement = StoragePlacement((2,))
    got = q.popleft_n(3)
    assert [b.block_id for b in got] == [8, 9, 10]
    assert q.free_per_instance() == [3, 4, 1]
    q.placement = StoragePlacement((0, 1), stripe=True)
    got = q.popleft_n(4)
    assert [instance_of(b.block_id, B) for b in got] == [0, 1, 0, 1]
    q.placement = StoragePlacement((2,))  # 1 left there, then spill to the most free
    got = q.popleft_n(3)
    assert [instance_of(b.block_id, B) for b in got] == [2, 1, 1]
    assert q.num_allocated == [2, 4, 4]
    q.placement = None
    assert instance_of(q.popleft().block_id, B) == 0  # [1, 0, 0] free: the most free
    assert q.num_free_blocks == 0 and q.free_per_instance() == [0, 0, 0]
    with pytest.raises(ValueError, match="cannot pop 1 blocks: 0 free"):
        q.popleft_n(1)


def test_vllm_queue_api_keeps_per_instance_counts():
    blocks, q = make_queues()
    # remove() from the middle of an instance's queue (a prefix-cache hit).
    q.remove(blocks[5])
    assert q.free_per_instance() == [3, 3, 4]
    assert free_ids(q)[1] == [4, 6, 7]
    q.append(blocks[5])
    assert free_ids(q)[1] == [4, 6, 7, 5]
    # Take everything, give back in mixed order.
    q.placement = None
    taken = q.popleft_n(q.num_free_blocks)
    assert q.free_per_instance() == [0, 0, 0]
    assert sorted(b.block_id for b in taken) == list(range(1, N * B))
    q.append_n([blocks[9], blocks[1], blocks[8], blocks[2]])
    assert q.free_per_instance() == [2, 0, 2]
    assert free_ids(q) == [[1, 2], [], [9, 8]]
    # prepend_n puts blocks at the head of their own instance's queue.
    q.prepend_n([blocks[4], blocks[10], blocks[3]])
    assert free_ids(q) == [[3, 1, 2], [4], [10, 9, 8]]
    assert q.num_free_blocks == 7
    q.placement = StoragePlacement((2,))
    assert [b.block_id for b in q.popleft_n(2)] == [10, 9]
    q.placement = StoragePlacement((0,))
    assert q.popleft().block_id == 3
    q.append_n([])
    q.prepend_n([])
    assert q.free_per_instance() == [2, 1, 1]
    with pytest.raises(NotImplementedError):
        list(q.iter_blocks_after(None))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["pop", "free", "prepend", "remove"]),
            st.integers(0, 5),
            st.lists(st.integers(0, N - 1), max_size=3),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_random_queue_ops_match_a_model(ops):
    blocks, q = make_queues()
    free = {b.block_id for b in blocks[1:]}
    for op, k, preferred, stripe in ops:
        if op == "pop":
            n = min(k, len(free))
            q.placement = StoragePlacement(tuple(preferred), stripe=stripe) if preferred else None
            before = q.free_per_instance()
            got = q.popleft_n(n)
            expected = expand(take_counts(n, q.placement, before))
            assert [instance_of(b.block_id, B) for b in got] == expected
            free -= {b.block_id for b in got}
        elif op in ("free", "prepend"):
            held = sorted(set(range(1, N * B)) - free)[:k]
            back = [blocks[i] for i in held]
            (q.append_n if op == "free" else q.prepend_n)(back)
            free |= set(held)
        elif free:
            victim = sorted(free)[k % len(free)]
            q.remove(blocks[victim])
            free.discard(victim)
        assert q.num_free_blocks == len(free)
        assert {b.block_id for b in q.get_all_free_blocks()} == free
        assert q.free_per_instance() == [
            sum(1 for b in free if instance_of(b, B) == i) for i in range(N)
        ]
