"""DistributedKVDirectory: bookkeeping against a reference model, invariants, errors."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vllm_esp.core.esp.directory import (
    DistributedKVDirectory,
    ESPCapacityError,
    ESPInvariantError,
    KVPoolConfig,
    cdiv,
)


class DirectoryMachine(RuleBasedStateMachine):
    """Random allocate/register/grow/migrate/free sequences against a plain model.

    The model keeps, per (request, instance), the list of global positions in
    local order; block usage follows as ``cdiv(len, block_size)``. Failed
    operations must leave the directory exactly as it was.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory: DistributedKVDirectory
        self.model: dict[str, dict[int, list[int]]] = {}
        self.next_req = 0

    @initialize(
        num_instances=st.integers(1, 4),
        num_blocks=st.integers(0, 12),
        block_size=st.sampled_from([1, 2, 3, 4]),
    )
    def init(self, num_instances: int, num_blocks: int, block_size: int) -> None:
        self.directory = DistributedKVDirectory(
            KVPoolConfig.uniform(num_instances, num_blocks, block_size)
        )

    def _expect_failure_unchanged(self, exc: type[Exception], fn, *args) -> None:
        before = self.directory.snapshot()
        with pytest.raises(exc):
            fn(*args)
        assert self.directory.snapshot() == before

    @rule(data=st.data())
    def allocate_prefill(self, data: st.DataObject) -> None:
        d = self.directory
        num_reqs = data.draw(st.integers(1, 2))
        lens, placement = {}, {}
        for _ in range(num_reqs):
            req_id = f"r{self.next_req}"
            self.next_req += 1
            length = data.draw(st.integers(1, 20))
            cuts = sorted(
                data.draw(st.sets(st.integers(1, length - 1), max_size=4)) if length > 1 else set()
            )
            bounds = [0, *cuts, length]
            per: dict[int, list[tuple[int, int]]] = {}
            for b, e in itertools.pairwise(bounds):
                per.setdefault(data.draw(st.integers(0, d.num_instances - 1)), []).append((b, e))
            # Shuffle local order within a shard: any order is legal.
            for ranges in per.values():
                data.draw(st.randoms()).shuffle(ranges)
            lens[req_id], placement[req_id] = length, per
        needed = [0] * d.num_instances
        for per in placement.values():
            for inst, ranges in per.items():
                needed[inst] += cdiv(sum(e - b for b, e in ranges), d.block_size)
        if any(needed[i] > d.num_free_blocks(i) for i in range(d.num_instances)):
            self._expect_failure_unchanged(ESPCapacityError, d.allocate_prefill, lens, placement)
            return
        d.allocate_prefill(lens, placement)
        for req_id, per in placement.items():
            self.model[req_id] = {
                i: [p for b, e in rs for p in range(b, e)] for i, rs in per.items()
            }

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model))
    def register(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.model)))
        inst = data.draw(st.integers(0, self.directory.num_instances - 1))
        self.directory.register(req_id, inst)
        self.model[req_id].setdefault(inst, [])

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model))
    def append(self, data: st.DataObject) -> None:
        d = self.directory
        req_id = data.draw(st.sampled_from(sorted(self.model)))
        inst = data.draw(st.sampled_from(sorted(self.model[req_id])))
        n = data.draw(st.integers(1, 5))
        have = len(self.model[req_id][inst])
        needed = cdiv(have + n, d.block_size) - cdiv(have, d.block_size)
        if needed > d.num_free_blocks(inst):
            assert not d.can_append(req_id, inst, n)
            self._expect_failure_unchanged(ESPCapacityError, d.append_tokens, req_id, inst, n)
            return
        total = sum(len(p) for p in self.model[req_id].values())
        slots = d.append_tokens(req_id, inst, n)
        assert slots == d.slots(req_id, inst)[have:]
        self.model[req_id][inst] += list(range(total, total + n))

    @rule(data=st.data())
    @precondition(
        lambda self: any(len(self.model[r]) and any(self.model[r].values()) for r in self.model)
    )
    def migrate(self, data: st.DataObject) -> None:
        d = self.directory
        candidates = [(r, i) for r in sorted(self.model) for i, p in self.model[r].items() if p]
        req_id, src = data.draw(st.sampled_from(candidates))
        if d.num_instances == 1:
            self._expect_failure_unchanged(ValueError, d.migrate_tail, req_id, src, src, 1)
            return
        dst = data.draw(st.sampled_from([i for i in range(d.num_instances) if i != src]))
        n = data.draw(st.integers(1, len(self.model[req_id][src])))
        have = len(self.model[req_id].get(dst, []))
        needed = cdiv(have + n, d.block_size) - cdiv(have, d.block_size)
        if needed > d.num_free_blocks(dst):
            self._expect_failure_unchanged(ESPCapacityError, d.migrate_tail, req_id, src, dst, n)
            return
        src_slots_before = d.slots(req_id, src)
        src_slots, dst_slots, ranges = d.migrate_tail(req_id, src, dst, n)
        moved = self.model[req_id][src][-n:]
        assert src_slots == src_slots_before[-n:]
        assert [p for b, e in ranges for p in range(b, e)] == moved
        assert dst_slots == d.slots(req_id, dst)[have:]
        del self.model[req_id][src][-n:]
        self.model[req_id].setdefault(dst, []).extend(moved)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model))
    def unregister_empty(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.model)))
        inst = data.draw(st.sampled_from(sorted(self.model[req_id])))
        if self.model[req_id][inst]:
            self._expect_failure_unchanged(ValueError, self.directory.unregister, req_id, inst)
        else:
            self.directory.unregister(req_id, inst)
            del self.model[req_id][inst]

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model))
    def free(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.model)))
        expected = sum(cdiv(len(p), self.directory.block_size) for p in self.model[req_id].values())
        assert self.directory.free_request(req_id) == expected
        del self.model[req_id]

    @invariant()
    def matches_model(self) -> None:
        d = self.directory
        d.check_invariants()
        assert set(d.req_ids) == set(self.model)
        for inst in range(d.num_instances):
            used = sum(cdiv(len(per.get(inst, [])), d.block_size) for per in self.model.values())
            assert d.num_used_blocks(inst) == used
            assert d.num_used_blocks(inst) + d.num_free_blocks(inst) == d.num_capacity_blocks(inst)
        for req_id, per in self.model.items():
            assert d.instances(req_id) == tuple(sorted(per))
            assert d.num_tokens(req_id) == sum(len(p) for p in per.values())
            for inst, positions in per.items():
                assert d.shard(req_id, inst).positions() == positions


TestDirectoryMachine = DirectoryMachine.TestCase
TestDirectoryMachine.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ----------------------------------------------------------------------------------------
# check_invariants must catch corruption (otherwise the property tests prove nothing).


def _populated() -> DistributedKVDirectory:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 6, 2))
    d.allocate_prefill({"a": 5, "b": 3}, {"a": {0: [(0, 3)], 1: [(3, 5)]}, "b": {1: [(0, 3)]}})
    d.check_invariants()
    return d


def test_invariants_detect_block_both_free_and_owned() -> None:
    d = _populated()
    d._free[0].append(d.shard("a", 0).block_ids[0])
    with pytest.raises(ESPInvariantError, match=r"both free and owned|duplicate|capacity"):
        d.check_invariants()


def test_invariants_detect_block_with_two_owners() -> None:
    d = _populated()
    d._shards["b"][1].block_ids[0] = d.shard("a", 1).block_ids[0]
    with pytest.raises(ESPInvariantError, match="owned by"):
        d.check_invariants()


def test_invariants_detect_leaked_block() -> None:
    d = _populated()
    d._free[1].pop()
    with pytest.raises(ESPInvariantError, match="capacity"):
        d.check_invariants()


def test_invariants_detect_position_gap_and_overlap() -> None:
    d = _populated()
    d._shards["a"][1].position_ranges[0] = (2, 4)
    with pytest.raises(ESPInvariantError, match="tile"):
        d.check_invariants()


def test_invariants_detect_wrong_block_count() -> None:
    d = _populated()
    d._shards["a"][0].num_tokens = 5
    d._shards["a"][0].position_ranges[0] = (0, 5)
    with pytest.raises(ESPInvariantError, match="blocks for"):
        d.check_invariants()


# ----------------------------------------------------------------------------------------
# Slot arithmetic and error messages.


def test_slots_follow_block_table_and_positions_follow_local_order() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 8, 4))
    d.allocate_prefill({"x": 10}, {"x": {1: [(6, 10), (0, 6)]}})
    shard = d.shard("x", 1)
    assert shard.block_ids == (0, 1, 2)
    assert d.slots("x", 1) == list(range(10))
    assert shard.positions() == [6, 7, 8, 9, 0, 1, 2, 3, 4, 5]
    assert shard.position_ranges == ((6, 10), (0, 6))
    # Growth continues the local order on the partially filled block.
    assert d.append_tokens("x", 1, 3) == [10, 11, 12]
    assert d.shard("x", 1).positions()[-3:] == [10, 11, 12]


def test_capacity_error_names_instance_and_leaves_directory_unchanged() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 2, 4))
    before = d.snapshot()
    with pytest.raises(ESPCapacityError, match=r"instance 0 needs 3 blocks, has 2 free"):
        d.allocate_prefill({"big": 12}, {"big": {0: [(0, 12)]}})
    assert d.snapshot() == before
    d.check_invariants()


def test_allocate_rejects_bad_tiling_and_duplicates() -> None:
    d = DistributedKVDirectory(KVPoolConfig.uniform(2, 8, 4))
    with pytest.raises(ValueError, match="tile"):
        d.allocate_prefill({"x": 6}, {"x": {0: [(0, 3)], 1: [(2, 6)]}})
    with pytest.raises(ValueError, match=r"cover \[0, 5\)"):
        d.allocate_prefill({"x": 6}, {"x": {0: [(0, 5)]}})
    d.allocate_prefill({"x": 6}, {"x": {0: [(0, 6)]}})
    with pytest.raises(ValueError, match="already"):
        d.allocate_prefill({"x": 1}, {"x": {0: [(0, 1)]}})
    with pytest.raises(KeyError, match="not registered"):
        d.append_tokens("x", 1)
