"""Torch-free planning: stripes, retention packing, ring/decode schedules, migration, capacity."""

from __future__ import annotations

import itertools
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.decode_plan import (
    assign_masters_fullest_first,
    build_decode_schedule,
    plan_decode_step,
)
from vllm_esp.core.esp.directory import (
    DistributedKVDirectory,
    ESPCapacityError,
    KVPoolConfig,
    cdiv,
)
from vllm_esp.core.esp.migration_plan import plan_consolidation, plan_migration
from vllm_esp.core.esp.ring_plan import (
    RetentionPlan,
    StripeLayout,
    build_ring_schedule,
    num_stripe_rows,
    pack_fullest_first,
    schedule_ring_prefill,
    stripe_rows_in_range,
)


def test_planning_modules_do_not_import_torch() -> None:
    # The scheduler and the simulator import these; torch must stay out.
    import subprocess

    code = (
        "import sys, vllm_esp.core.esp.directory, vllm_esp.core.esp.ring_plan, vllm_esp.core.esp.decode_plan, "
        "vllm_esp.core.esp.migration_plan; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ stripes


def test_stripe_layout_matches_diagram() -> None:
    layout = StripeLayout(3, (8,))
    assert [list(layout.positions(r, 0)) for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert [layout.num_rows(r, 0) for r in range(3)] == [3, 3, 2]
    assert layout.last_token_rank(0) == 1
    assert StripeLayout(4, (2, 5)).cu_rows(3) == (0, 0, 1)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4, 5])
def test_stripe_rows_in_range_exhaustive(num_ranks: int) -> None:
    for num_tokens in range(0, 14):
        rows = [num_stripe_rows(num_tokens, r, num_ranks) for r in range(num_ranks)]
        assert sum(rows) == num_tokens
        for begin in range(0, num_tokens + 1):
            for end in range(begin, num_tokens + 1):
                got = []
                for origin in range(num_ranks):
                    i0, i1 = stripe_rows_in_range(origin, num_ranks, num_tokens, begin, end)
                    got += [origin + i * num_ranks for i in range(i0, i1)]
                assert sorted(got) == list(range(begin, end))


# ---------------------------------------------------------------------------- retention


@st.composite
def packing_inputs(draw: st.DrawFn):
    num_instances = draw(st.integers(1, 4))
    group = draw(st.permutations(range(num_instances)))
    block_size = draw(st.integers(1, 5))
    lens = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    used = {i: draw(st.integers(0, 50)) for i in group}
    free = {i: draw(st.integers(0, 12)) for i in group}
    return group, block_size, lens, used, free


@given(packing_inputs())
@settings(max_examples=300, deadline=None)
def test_pack_fullest_first_properties(inputs) -> None:
    group, block_size, lens, used, free = inputs
    req_ids = [f"r{j}" for j in range(len(lens))]
    # Greedy packing wastes nothing at instance boundaries, so it needs
    # exactly sum(cdiv(L, bs)) blocks: the minimum any placement needs.
    fits = sum(cdiv(n, block_size) for n in lens) <= sum(free.values())
    if not fits:
        with pytest.raises(ESPCapacityError, match="does not fit in group"):
            pack_fullest_first(
                req_ids,
                lens,
                group,
                num_used_tokens=used,
                num_free_blocks=free,
                block_size=block_size,
            )
        return
    plan = pack_fullest_first(
        req_ids, lens, group, num_used_tokens=used, num_free_blocks=free, block_size=block_size
    )
    # RetentionPlan.__post_init__ already proved each token is kept exactly once.
    order = [
        r
        for r in sorted(range(len(group)), key=lambda r: (-used[group[r]], r))
        if free[group[r]] > 0
    ]
    left = [free[group[r]] - plan.num_required_blocks(r, block_size) for r in range(len(group))]
    assert all(x >= 0 for x in left)
    used_ranks = [r for r in order if any(plan.kept[r])]
    # Fullest first: the instances used form a prefix of the order (skipping
    # full ones), all but the last of them filled completely.
    assert used_ranks == order[: len(used_ranks)]
    assert all(left[r] == 0 for r in used_ranks[:-1])
    assert set(plan.retaining_group()) == {group[r] for r in used_ranks}
    # At most one contiguous range per (request, instance).
    assert all(len(ranges) <= 1 for per_req in plan.kept for ranges in per_req)


def test_retention_plan_rejects_overlap_and_gap() -> None:
    with pytest.raises(ValueError, match="tile"):
        RetentionPlan((0, 1), ("a",), (4,), ((((0, 3),),), (((2, 4),),)))
    with pytest.raises(ValueError, match="cover"):
        RetentionPlan((0, 1), ("a",), (4,), ((((0, 2),),), ((),)))
    with pytest.raises(ValueError, match="distinct"):
        RetentionPlan((0, 0), ("a",), (4,), ((((0, 4),),), ((),)))


def random_retention(
    rng: random.Random, group: tuple[int, ...], req_ids: list[str], lens: list[int]
) -> RetentionPlan:
    """Any valid plan: random cuts, random owners, random local order."""
    kept = [[[] for _ in req_ids] for _ in group]
    for j, n in enumerate(lens):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 4)))) if n > 1 else []
        bounds = [0, *cuts, n]
        for b, e in itertools.pairwise(bounds):
            kept[rng.randrange(len(group))][j].append((b, e))
    for per_req in kept:
        for ranges in per_req:
            rng.shuffle(ranges)
    return RetentionPlan(
        group,
        tuple(req_ids),
        tuple(lens),
        tuple(tuple(tuple(rs) for rs in per_req) for per_req in kept),
    )


@pytest.mark.parametrize("seed", range(40))
def test_ring_schedule_copies_every_kept_token_once_into_its_directory_slot(seed: int) -> None:
    rng = random.Random(seed)
    num_instances = rng.randint(1, 4)
    group = tuple(rng.sample(range(num_instances), rng.randint(1, num_instances)))
    lens = [rng.randint(1, 30) for _ in range(rng.randint(1, 3))]
    req_ids = [f"r{j}" for j in range(len(lens))]
    d = DistributedKVDirectory(KVPoolConfig.uniform(num_instances, 64, rng.randint(1, 5)))
    retention = random_retention(rng, group, req_ids, lens) if seed % 2 else None
    plan = schedule_ring_prefill(d, req_ids, lens, group, retention)
    d.check_invariants()
    n = len(group)
    stripes = StripeLayout(n, tuple(lens))
    for r, inst in enumerate(group):
        sched = build_ring_schedule(plan, r)
        assert [h.origin_rank for h in sched.hops] == [(r - s) % n for s in range(n)]
        assert sched.send_to == group[(r + 1) % n] and sched.recv_from == group[(r - 1) % n]
        assert list(sched.q_positions) == [
            p for j in range(len(lens)) for p in stripes.positions(r, j)
        ]
        copied: dict[int, tuple[str, int]] = {}
        for hop in sched.hops:
            # Block rows are request-major stripes of the origin rank.
            row_to_token = [
                (req_ids[j], p)
                for j in range(len(lens))
                for p in stripes.positions(hop.origin_rank, j)
            ]
            for row, slot in zip(hop.keep_rows, hop.keep_slots):
                assert slot not in copied
                copied[slot] = row_to_token[row]
        expected = {}
        for req_id in req_ids:
            if inst in d.instances(req_id):
                shard = d.shard(req_id, inst)
                expected.update(
                    zip(d.slots(req_id, inst), ((req_id, p) for p in shard.positions()))
                )
        assert copied == expected
        for j, row in sched.last_token_rows:
            assert sched.q_positions[row] == lens[j] - 1
    assert sorted(
        j for r in range(n) for j, _ in build_ring_schedule(plan, r).last_token_rows
    ) == list(range(len(lens)))


# ------------------------------------------------------------------------------ capacity


def test_request_larger_than_any_pool_is_split_over_the_group() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(3, 8, 4))  # 32 tokens per instance
    d.allocate_prefill({"old": 10}, {"old": {2: [(0, 10)]}})
    plan = schedule_ring_prefill(d, ["big"], [70], (0, 1, 2))
    # Fullest first: instance 2 (10 used) fills its 5 free blocks, then 0, then 1.
    assert plan.retention.placement()["big"] == {2: ((0, 20),), 0: ((20, 52),), 1: ((52, 70),)}
    assert d.holders("big") == (0, 1, 2)
    d.check_invariants()


def test_request_larger_than_all_pools_raises_and_leaves_directory_unchanged() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(3, 8, 4))
    d.allocate_prefill({"old": 10}, {"old": {2: [(0, 10)]}})
    before = d.snapshot()
    with pytest.raises(
        ESPCapacityError,
        match=r"prefill of 87 tokens .* group \(0, 1, 2\): "
        r"84 free token slots in total, at most 32",
    ):
        schedule_ring_prefill(d, ["huge"], [87], (0, 1, 2))
    assert d.snapshot() == before
    d.check_invariants()


# -------------------------------------------------------------------------------- decode


def _prefilled(seed: int) -> tuple[DistributedKVDirectory, list[str]]:
    rng = random.Random(seed)
    num_instances = rng.randint(1, 4)
    d = DistributedKVDirectory(KVPoolConfig.uniform(num_instances, 200, rng.randint(1, 4)))
    lens = [rng.randint(1, 25) for _ in range(rng.randint(1, 5))]
    req_ids = [f"r{j}" for j in range(len(lens))]
    group = tuple(rng.sample(range(num_instances), rng.randint(1, num_instances)))
    schedule_ring_prefill(d, req_ids, lens, group, random_retention(rng, group, req_ids, lens))
    return d, req_ids


@pytest.mark.parametrize("seed", range(40))
def test_decode_schedules_agree_between_masters_and_participants(seed: int) -> None:
    rng = random.Random(seed)
    d, req_ids = _prefilled(seed)
    for _ in range(3):
        masters = {r: rng.randrange(d.num_instances) for r in req_ids}  # may scale up
        lengths = {r: d.num_tokens(r) for r in req_ids}
        plan = plan_decode_step(d, masters)
        d.check_invariants()
        scheds = {i: build_decode_schedule(plan, i) for i in range(d.num_instances)}
        # Simulate the two exchanges with request ids as payloads.
        inbox: dict[tuple[int, int], list[str]] = {}
        for i, s in scheds.items():
            for peer, rows in s.q_sends:
                inbox[(i, peer)] = [plan.requests[s.mastered[a]].req_id for a in rows]
        for i, s in scheds.items():
            got = [q for m, n in s.q_recvs for q in inbox.pop((m, i))[:n]]
            assert got == [plan.requests[k].req_id for k in s.foreign]
            assert all(plan.requests[k].master != i for k in s.foreign)
            for k, kv_len in zip(s.foreign, s.foreign_kv_lens):
                assert kv_len == d.num_local_tokens(plan.requests[k].req_id, i)
        assert not inbox
        for i, s in scheds.items():
            replies = [(peer, a) for peer, rows in s.q_sends for a in rows]
            for a, k in enumerate(s.mastered):
                req = plan.requests[k]
                assert req.position == lengths[req.req_id]
                assert req.master == i and s.local_kv_lens[a] == d.num_local_tokens(req.req_id, i)
                assert d.slots(req.req_id, i)[-1] == req.new_slot
                sources = sorted(
                    replies[row][0]
                    for row in (slot_rows[a] for slot_rows in s.merge_rows)
                    if row >= 0
                )
                assert sources == sorted(req.participants)
                assert all(
                    replies[slot_rows[a]][1] == a for slot_rows in s.merge_rows if slot_rows[a] >= 0
                )
        # Every participant gets the query, even when it holds no token (lse = -inf there).
        for req in plan.requests:
            assert set(req.participants) | {req.master} == set(d.instances(req.req_id))


def test_decode_step_capacity_error_is_all_or_nothing() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 2, 2))
    d.allocate_prefill({"a": 2, "b": 1}, {"a": {0: [(0, 2)]}, "b": {0: [(0, 1)]}})
    before = d.snapshot()
    with pytest.raises(ESPCapacityError, match="master 0 needs 1 block"):
        plan_decode_step(d, {"b": 0, "a": 0})  # b fits in its tail, a needs a block
    assert d.snapshot() == before
    plan = plan_decode_step(d, {"b": 0, "a": 1})  # scale-up: a's new token on instance 1
    assert plan.requests[1].master == 1 and d.instances("a") == (0, 1)
    assert plan.requests[1].participants == (0,)
    d.check_invariants()


def test_assign_masters_fullest_first_contiguous_and_scale_up_hint() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(3, 4, 2))
    d.allocate_prefill(
        {f"r{j}": 2 for j in range(4)},
        {"r0": {1: [(0, 2)]}, "r1": {1: [(0, 2)]}, "r2": {1: [(0, 2)]}, "r3": {0: [(0, 2)]}},
    )
    masters = assign_masters_fullest_first(d, [f"r{j}" for j in range(4)], (0, 1))
    # Instance 1 is fullest (6 tokens) but has one free block: it takes r0 only.
    assert masters == {"r0": 1, "r1": 0, "r2": 0, "r3": 0}
    d2 = DistributedKVDirectory(KVPoolConfig.uniform(2, 1, 2))
    d2.allocate_prefill({"x": 2}, {"x": {0: [(0, 2)]}})
    with pytest.raises(ESPCapacityError, match="scale up"):
        assign_masters_fullest_first(d2, ["x"], (0,))
    assert assign_masters_fullest_first(d2, ["x"], (0, 1)) == {"x": 1}


# ----------------------------------------------------------------------------- migration


@pytest.mark.parametrize("seed", range(30))
def test_migration_chunks_move_the_tail_in_bounded_pieces(seed: int) -> None:
    rng = random.Random(seed)
    d, req_ids = _prefilled(seed)
    if d.num_instances == 1:
        return
    req_id = rng.choice(req_ids)
    src = rng.choice(d.holders(req_id))
    dst = rng.choice([i for i in range(d.num_instances) if i != src])
    n = rng.randint(1, d.num_local_tokens(req_id, src))
    tail_positions = d.shard(req_id, src).positions()[-n:]
    tail_slots = d.slots(req_id, src)[-n:]
    max_chunk = rng.randint(1, 6)
    plan = plan_migration(d, [(req_id, src, dst, n)], max_chunk)
    d.check_invariants()
    assert all(0 < c.num_tokens <= max_chunk for c in plan.chunks)
    assert plan.num_tokens == n
    moved = [p for c in plan.chunks for b, e in c.position_ranges for p in range(b, e)]
    assert sorted(moved) == sorted(tail_positions)
    # Every source slot read was part of the tail before the plan.
    assert sorted(s for c in plan.chunks for s in c.src_slots) == sorted(tail_slots)
    assert d.shard(req_id, dst).positions()[-n:] == moved


def test_migration_capacity_error_is_all_or_nothing() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 2, 2))
    d.allocate_prefill({"a": 4, "b": 2}, {"a": {0: [(0, 4)]}, "b": {1: [(0, 2)]}})
    before = d.snapshot()
    # The first move takes instance 1's last free block; the second finds none.
    with pytest.raises(ESPCapacityError, match="cannot receive"):
        plan_migration(d, [("a", 0, 1, 2), ("a", 0, 1, 2)], 1)
    assert d.snapshot() == before


def test_consolidation_empties_least_used_instance() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(3, 6, 2))
    d.allocate_prefill({"a": 9, "b": 4}, {"a": {0: [(0, 6)], 1: [(6, 9)]}, "b": {2: [(0, 4)]}})
    result = plan_consolidation(d, (0, 1, 2), max_chunk_tokens=2)
    assert result is not None
    freed, plan = result
    assert freed == 1 and d.num_used_blocks(1) == 0
    assert all(1 not in d.instances(r) for r in d.req_ids)
    assert sorted(d.shard("a", 0).positions()) == list(range(9))
    assert all(c.num_tokens <= 2 for c in plan.chunks)
    d.check_invariants()
    # Nothing left to consolidate into: two holders whose KV cannot merge.
    full = DistributedKVDirectory(KVPoolConfig.uniform(2, 2, 2))
    full.allocate_prefill({"a": 4, "b": 4}, {"a": {0: [(0, 4)]}, "b": {1: [(0, 4)]}})
    before = full.snapshot()
    assert plan_consolidation(full, (0, 1), 4) is None
    assert full.snapshot() == before
