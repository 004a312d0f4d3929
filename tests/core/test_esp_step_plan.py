"""``vllm_esp.core.esp.step_plan``: geometry helpers and ``local_batch``.

The property test builds random plans (1-4 instances, random requests,
block tables drawn without repeats from the global block space, random
compute tuples) and checks that the N local batches agree with each other
and with the plan: every token is computed once and stored once, every
send has a matching receive of the same size and order, and the partial
attentions of a query cover each key position exactly once.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.step_plan import (
    ESPStepPlan,
    RequestStep,
    SamplingSpec,
    blocks_per_instance,
    instance_of,
    local_batch,
    local_block,
)


# ---------------------------------------------------------------- geometry
def test_blocks_per_instance_is_ceil_and_rejects_bad_geometry():
    assert blocks_per_instance(40, 2) == 20
    assert blocks_per_instance(41, 2) == 21
    assert blocks_per_instance(3, 4) == 1
    assert blocks_per_instance(0, 3) == 0
    with pytest.raises(ValueError, match="bad geometry"):
        blocks_per_instance(10, 0)
    with pytest.raises(ValueError, match="bad geometry"):
        blocks_per_instance(-1, 2)


def test_instance_and_local_block_split_a_global_id():
    # The module docstring's example: 4 blocks per instance.
    assert [instance_of(b, 4) for b in (5, 6, 1, 9)] == [1, 1, 0, 2]
    assert [local_block(b, 4) for b in (5, 6, 1, 9)] == [1, 2, 1, 1]
    for b in range(24):
        assert instance_of(b, 6) * 6 + local_block(b, 6) == b


def _docstring_plan(compute=(0,), start=0, n=8, sample=None) -> ESPStepPlan:
    req = RequestStep(
        "r",
        start=start,
        token_ids=tuple(range(100, 100 + n)),
        block_ids=(5, 6, 1, 9),
        compute=compute,
        sample=sample,
    )
    return ESPStepPlan(
        step=0, num_instances=3, blocks_per_instance=4, block_size=2, requests=(req,)
    )


def test_holders_and_group_size_follow_the_block_table():
    plan = _docstring_plan(compute=(0,))
    req = plan.requests[0]
    assert plan.holders(req) == (0, 1, 2)
    assert [plan.storage_instance(req, p) for p in range(8)] == [1, 1, 1, 1, 0, 0, 2, 2]
    assert plan.instances_per_request() == {"r": 3}
    # Only the blocks covering [0, end) count: 3 tokens live on instance 1 only.
    short = _docstring_plan(compute=(1,), n=3)
    assert short.holders(short.requests[0]) == (1,)
    assert short.instances_per_request() == {"r": 1}
    # A computing instance that holds no KV still joins the group.
    other = _docstring_plan(compute=(2,), n=3)
    assert other.instances_per_request() == {"r": 2}


def test_docstring_example_single_compute_instance():
    spec = SamplingSpec(temperature=0.5, seed=3)
    plan = _docstring_plan(compute=(0,), sample=spec)
    b0, b1, b2 = (local_batch(plan, i) for i in range(3))
    # Instance 0 computes all 8 tokens, keeps positions 4-5 (local block 1).
    assert b0.input_ids == list(range(100, 108))
    assert b0.positions == list(range(8))
    assert b0.store_rows == [4, 5]
    assert b0.store_slots == [2, 3]
    assert b0.ship_out == {1: [0, 1, 2, 3], 2: [6, 7]}
    assert b1.ship_in == {0: ([2, 3, 4, 5], [0, 1, 2, 3])}
    assert b2.ship_in == {0: ([2, 3], [6, 7])}
    assert b1.num_rows == b2.num_rows == 0
    # Attention: local KV lengths 2 (inst 0), 4 (inst 1), 2 (inst 2).
    assert b0.own_rows == list(range(8))
    assert b0.own.kv_lens == [2] and b0.own.block_tables == [[1]]
    assert b0.query_out == {1: list(range(8)), 2: list(range(8))}
    assert b1.query_in[0].kv_lens == [4] and b1.query_in[0].block_tables == [[1, 2]]
    assert b2.query_in[0].kv_lens == [2] and b2.query_in[0].block_tables == [[1]]
    assert b1.query_in[0].cu_seqlens == [0, 8]
    assert b0.sample_rows == [("r", 7, spec, 0)]
    assert b1.sample_rows == b2.sample_rows == []


def test_docstring_example_token_stripe():
    plan = _docstring_plan(compute=(1, 2))
    b0, b1, b2 = (local_batch(plan, i) for i in range(3))
    assert b1.positions == [0, 2, 4, 6] and b2.positions == [1, 3, 5, 7]
    assert b0.num_rows == 0
    # Instance 1 keeps positions 0 and 2 and ships 4 to instance 0, outside
    # the ring; 6 reaches instance 2 around the ring, which keeps it.
    assert b1.store_rows == [0, 1] and b1.store_slots == [2, 4]
    assert b1.ship_out == {0: [2]}
    assert b2.store_rows == [3] and b2.store_slots == [3]
    assert b2.ship_out == {0: [2]}
    assert b0.ship_in == {1: ([2], [4]), 2: ([3], [5])}
    assert not b1.ship_in and not b2.ship_in and not b0.rings
    (r1,), (r2,) = b1.rings, b2.rings
    assert r1.group == r2.group == (1, 2) and (r1.rank, r2.rank) == (0, 1)
    assert r1.block_positions == r2.block_positions == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # Instance 1 keeps 1 and 3 of rank 1's stripe; instance 2 keeps 6 of rank 0's.
    assert r1.keep_rows == [[], [0, 1]] and r1.keep_slots == [[], [3, 5]]
    assert r2.keep_rows == [[3], []] and r2.keep_slots == [[2], []]
    # Nothing was computed before this step: no queries go out.
    assert not b1.query_out and not b2.query_out and b0.query_in == {}
    # A last token computed on instance 2 with sampling off: nobody samples.
    assert b0.sample_rows == b1.sample_rows == b2.sample_rows == []


def test_local_batch_rejects_a_short_block_table_and_a_bad_instance():
    req = RequestStep("short", start=3, token_ids=(1, 2, 3), block_ids=(0, 1), compute=(0,))
    plan = ESPStepPlan(
        step=0, num_instances=2, blocks_per_instance=4, block_size=2, requests=(req,)
    )
    for instance in (0, 1):
        with pytest.raises(ValueError, match=r"short.*2 blocks cannot hold 6 tokens"):
            local_batch(plan, instance)
    ok = ESPStepPlan(
        step=0,
        num_instances=2,
        blocks_per_instance=4,
        block_size=2,
        requests=(RequestStep("ok", 0, (1, 2, 3, 4), (0, 5), (0,)),),
    )
    local_batch(ok, 1)  # exactly enough blocks is fine
    with pytest.raises(ValueError, match=r"instance 2 outside 0\.\.1"):
        local_batch(ok, 2)
    with pytest.raises(ValueError, match="outside"):
        local_batch(ok, -1)


def test_empty_plan_gives_empty_batches():
    plan = ESPStepPlan(step=0, num_instances=2, blocks_per_instance=4, block_size=2, requests=())
    for i in range(2):
        b = local_batch(plan, i)
        assert b.num_rows == 0 and not b.ship_out and not b.ship_in
        assert not b.query_out and not b.query_in and b.own.num_rows == 0


# ---------------------------------------------------------------- property
@st.composite
def plans(draw):
    n = draw(st.integers(1, 4))
    bs = draw(st.sampled_from([2, 4, 32]))
    num_reqs = draw(st.integers(0, 4))
    shapes = []
    for _ in range(num_reqs):
        start = draw(st.integers(0, 60))
        length = draw(st.integers(1, 40))
        extra = draw(st.integers(0, 2))  # tables may run past the step's end
        shapes.append((start, length, -(-(start + length) // bs) + extra))
    total = sum(s[2] for s in shapes)
    nb = max(1, -(-total // n)) + draw(st.integers(0, 3))
    ids = draw(st.permutations(range(n * nb)))
    spec = st.one_of(
        st.none(),
        st.builds(
            SamplingSpec, temperature=st.floats(0, 2), seed=st.one_of(st.none(), st.integers(0, 99))
        ),
    )
    requests, used = [], 0
    for r, (start, length, num_blocks) in enumerate(shapes):
        order = draw(st.permutations(range(n)))
        dop = draw(st.integers(1, n))
        requests.append(
            RequestStep(
                req_id=f"r{r}",
                start=start,
                token_ids=tuple(
                    draw(st.lists(st.integers(0, 999), min_size=length, max_size=length))
                ),
                block_ids=tuple(ids[used : used + num_blocks]),
                compute=tuple(order[:dop]),
                sample=draw(spec),
                num_output_tokens=draw(st.integers(0, 5)),
            )
        )
        used += num_blocks
    return ESPStepPlan(
        step=draw(st.integers(0, 9)),
        num_instances=n,
        blocks_per_instance=nb,
        block_size=bs,
        requests=tuple(requests),
        ring_context_min_tokens=draw(st.sampled_from([None, 1, 10])),
    )


def _request_rows(batch, plan):
    """Map (req_id, position) -> row on this instance's batch (rows are request-major)."""
    out = {}
    row = 0
    for req in plan.requests:
        for k in range(len(req.token_ids)):
            if req.compute_instance(k) == batch.instance:
                out[(req.req_id, req.start + k)] = row
                row += 1
    assert row == batch.num_rows
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans())
def test_local_batches_agree_with_the_plan_and_each_other(plan):
    n, bs, nb = plan.num_instances, plan.block_size, plan.blocks_per_instance
    batches = [local_batch(plan, i) for i in range(n)]
    rows = [_request_rows(b, plan) for b in batches]

    # Computed exactly once, with the plan's ids and positions.
    assert sum(b.num_rows for b in batches) == sum(len(r.token_ids) for r in plan.requests)
    for req in plan.requests:
        for k, token in enumerate(req.token_ids):
            comp, pos = req.compute_instance(k), req.start + k
            row = rows[comp][(req.req_id, pos)]
            assert batches[comp].input_ids[row] == token
            assert batches[comp].positions[row] == pos

    # Stored exactly once, at its block-table slot on its storage instance.
    stored: Counter = Counter()
    for b in batches:
        assert len(b.store_rows) == len(b.store_slots)
        for row, slot in zip(b.store_rows, b.store_slots, strict=True):
            stored[(b.instance, slot, b.positions[row])] += 1
        for src, (slots, positions) in b.ship_in.items():
            assert src != b.instance
            assert len(slots) == len(positions)
            for slot, pos in zip(slots, positions, strict=True):
                stored[(b.instance, slot, pos)] += 1
        for share in b.rings:  # stripes kept as they pass
            assert share.group[share.rank] == b.instance
            assert share.keep_rows[share.rank] == []
            for origin in range(share.num_ranks):
                keep, slots = share.keep_rows[origin], share.keep_slots[origin]
                assert len(keep) == len(slots)
                for row, slot in zip(keep, slots, strict=True):
                    stored[(b.instance, slot, share.block_positions[origin][row])] += 1
    expected: Counter = Counter()
    for req in plan.requests:
        for pos in range(req.start, req.end):
            block = req.block_ids[pos // bs]
            expected[(instance_of(block, nb), local_block(block, nb) * bs + pos % bs, pos)] += 1
    assert stored == expected
    assert sum(stored.values()) == sum(len(r.token_ids) for r in plan.requests)
    slots_used = Counter((inst, slot) for inst, slot, _ in stored.elements())
    assert all(c == 1 for c in slots_used.values()), "two tokens written to one slot"

    for i, bi in enumerate(batches):
        assert i not in bi.ship_out and i not in bi.query_out and i not in bi.query_in
        for j, bj in enumerate(batches):
            if i == j:
                continue
            # KV shipped i -> j: counts and positions agree, in order.
            out_rows = bi.ship_out.get(j, [])
            in_slots, in_positions = bj.ship_in.get(i, ([], []))
            assert len(out_rows) == len(in_slots)
            assert [bi.positions[r] for r in out_rows] == in_positions
            # Queries sent i -> j.
            q_rows = bi.query_out.get(j, [])
            q_in = bj.query_in.get(i)
            assert len(q_rows) == (q_in.num_rows if q_in else 0)
            if q_in is not None:
                assert [bi.positions[r] for r in q_rows] == q_in.positions
                assert q_in.cu_seqlens[-1] == q_in.num_rows
                assert len(q_in.cu_seqlens) == len(q_in.kv_lens) + 1
                assert len(q_in.block_tables) == len(q_in.kv_lens)

    # Attention coverage: for every request and computing instance c, the
    # holders' groups for c have local KV lengths summing to the request's
    # end, and each holder's local table lists exactly its blocks.
    group_index = [Counter() for _ in range(n)]  # per receiver: (source) -> next group
    own_index = [0] * n
    for req in plan.requests:
        # A ring request attends where stored only to the earlier steps' KV.
        end = req.start if len(req.compute) > 1 else req.end
        holders = plan.holders(req, end) if end else ()
        num_rotated = 0
        if plan.rotates_context(req):  # the ring carries what its members store
            holders = tuple(h for h in holders if h not in req.compute)
            num_rotated = sum(
                instance_of(req.block_ids[pos // bs], nb) in req.compute for pos in range(end)
            )
        num_blocks = -(-end // bs)
        computing = sorted({req.compute_instance(k) for k in range(len(req.token_ids))})
        for c in computing:
            my_positions = [
                req.start + k for k in range(len(req.token_ids)) if req.compute_instance(k) == c
            ]
            kv_total = 0
            for h in holders:
                if h == c:
                    group = batches[h].own
                    g = own_index[h]
                    own_index[h] += 1
                else:
                    group = batches[h].query_in[c]
                    g = group_index[h][c]
                    group_index[h][c] += 1
                lo, hi = group.cu_seqlens[g], group.cu_seqlens[g + 1]
                assert group.positions[lo:hi] == my_positions
                local = [
                    local_block(b, nb)
                    for b in req.block_ids[:num_blocks]
                    if instance_of(b, nb) == h
                ]
                assert group.block_tables[g] == local
                assert 0 < group.kv_lens[g] <= len(local) * bs
                kv_total += group.kv_lens[g]
            assert kv_total == end - num_rotated
    for h in range(n):
        assert own_index[h] == len(batches[h].own.kv_lens)
        assert batches[h].own.num_rows == len(batches[h].own_rows)
        assert [batches[h].positions[r] for r in batches[h].own_rows] == batches[h].own.positions
        for c, count in group_index[h].items():
            assert count == len(batches[h].query_in[c].kv_lens)
        assert set(batches[h].query_in) == set(group_index[h])

    # Rings: one per compute group of more than one instance, in plan order
    # on every member; each rank's block is its stripe of every ring
    # request, and the members agree on every block.
    groups = list(dict.fromkeys(r.compute for r in plan.requests if len(r.compute) > 1))
    for i, b in enumerate(batches):
        assert [share.group for share in b.rings] == [g for g in groups if i in g]
        for share in b.rings:
            reqs = [r for r in plan.requests if r.compute == share.group]
            for origin in range(share.num_ranks):
                expected_pos = [
                    r.start + k
                    for r in reqs
                    for k in range(origin, len(r.token_ids), len(r.compute))
                ]
                assert share.block_positions[origin] == expected_pos
                assert share.block_cu_rows[origin][-1] == len(expected_pos)
                assert len(share.block_cu_rows[origin]) == len(reqs) + 1
            assert [b.positions[row] for row in share.rows] == share.block_positions[share.rank]
            # Rotated context: each member's earlier KV of each rotating
            # request, once, in request order, at its block-table slots.
            for origin, inst in enumerate(share.group):
                expected_context = [
                    (pos, local_block(r.block_ids[pos // bs], nb) * bs + pos % bs)
                    for r in reqs
                    if plan.rotates_context(r)
                    for pos in range(r.start)
                    if instance_of(r.block_ids[pos // bs], nb) == inst
                ]
                assert share.context_positions[origin] == [p for p, _ in expected_context]
                assert len(share.context_cu_rows[origin]) == len(reqs) + 1
                assert share.context_cu_rows[origin][-1] == len(expected_context)
                if origin == share.rank:
                    assert share.context_slots == [slot for _, slot in expected_context]
            peer = batches[share.send_to].rings
            assert any(
                p.group == share.group and p.block_positions == share.block_positions for p in peer
            )

    # Sampling: exactly one row, the last token, on its computing instance.
    sampled = Counter()
    for b in batches:
        for req_id, row, spec, num_out in b.sample_rows:
            sampled[req_id] += 1
            req = next(r for r in plan.requests if r.req_id == req_id)
            assert b.instance == req.compute_instance(len(req.token_ids) - 1)
            assert b.positions[row] == req.end - 1
            assert spec == req.sample and num_out == req.num_output_tokens
    assert sampled == Counter(r.req_id for r in plan.requests if r.sample is not None)
