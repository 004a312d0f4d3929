"""Distributed paged KV directory: which instance holds which blocks of which request.

A global view of every instance's KV pool, in torch-free plain Python. The
library planners (``ring_plan.py``, ``decode_plan.py``, ``migration_plan.py``)
plan against it; their users are the ESP kernel tests
(``tests/kernels/test_esp_multiproc.py``), the plan tests under
``tests/core/`` and ``benchmarks/esp_core.py``. The engine's ESP scheduler
does not use it: it keeps placement in vLLM's own block tables over one
global block space (``step_plan.py``).

Model
-----
* Each instance ``i`` owns a pool of ``num_blocks_per_instance[i]`` blocks of
  ``block_size`` token slots, in vLLM's paged layout: ``slot = block_id *
  block_size + offset``.
* A request's KV may be split over any set of instances. Its part on one
  instance is a *shard*: a list of blocks filled front to back with
  ``num_tokens`` tokens. The token order inside a shard is arbitrary
  (RoPE is applied before caching and every slot stores its global
  position), so a shard records the global positions it holds as
  ``position_ranges`` in local order::

      shard on instance 1:  block_ids = [7, 2, 9]     block_size = 4
      local index:           0 1 2 3 | 4 5 6 7 | 8 9
      slot:                 28 .. 31 | 8 .. 11 | 36 37
      position_ranges:      [(0, 6), (40, 44)]   -> positions 0..5, 40..43

* A shard may be *registered but empty* (0 tokens, 0 blocks): elastic
  scale-up registers a request on a new instance before that instance
  becomes its decode master.
* Every request's shards together hold each position in
  ``[0, num_tokens(req))`` exactly once.

Every mutation is all-or-nothing: it validates first and raises
(``ESPCapacityError`` for lack of space, ``ValueError``/``KeyError`` for
misuse) before touching any state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

TokenRange = tuple[int, int]
"""Half-open range ``[begin, end)`` of global token positions."""


class ESPCapacityError(RuntimeError):
    """Raised when KV does not fit in the free blocks of the instances offered."""


class ESPInvariantError(AssertionError):
    """Raised by ``check_invariants`` when the directory's bookkeeping is corrupt."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVPoolConfig:
    """Shape of the per-instance KV pools (block granularity, as in vLLM)."""

    num_blocks_per_instance: tuple[int, ...]
    block_size: int

    def __post_init__(self) -> None:
        if not self.num_blocks_per_instance:
            raise ValueError("at least one instance is required")
        if any(n < 0 for n in self.num_blocks_per_instance):
            raise ValueError(f"negative pool size in {self.num_blocks_per_instance}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @classmethod
    def uniform(cls, num_instances: int, num_blocks: int, block_size: int) -> KVPoolConfig:
        return cls((num_blocks,) * num_instances, block_size)

    @property
    def num_instances(self) -> int:
        return len(self.num_blocks_per_instance)

    def num_capacity_tokens(self, instance: int) -> int:
        return self.num_blocks_per_instance[instance] * self.block_size


@dataclass(frozen=True)
class ShardView:
    """Read-only snapshot of one request's KV on one instance."""

    instance: int
    block_ids: tuple[int, ...]
    num_tokens: int
    position_ranges: tuple[TokenRange, ...]

    def positions(self) -> list[int]:
        """Global positions of the shard's tokens, in local (slot) order."""
        return [p for b, e in self.position_ranges for p in range(b, e)]


@dataclass(frozen=True)
class DirectorySnapshot:
    """Hashable, comparable copy of the whole directory state (for tests and logs)."""

    free_blocks: tuple[tuple[int, ...], ...]
    shards: tuple[tuple[str, int, ShardView], ...]
    num_tokens: tuple[tuple[str, int], ...]


@dataclass
class _Shard:
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    position_ranges: list[TokenRange] = field(default_factory=list)

    def view(self, instance: int) -> ShardView:
        return ShardView(
            instance, tuple(self.block_ids), self.num_tokens, tuple(self.position_ranges)
        )


def _append_range(ranges: list[TokenRange], begin: int, end: int) -> None:
    """Append ``[begin, end)`` to a local-order range list, coalescing with the tail."""
    if begin >= end:
        return
    if ranges and ranges[-1][1] == begin:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((begin, end))


def _pop_tail_ranges(ranges: list[TokenRange], num_tokens: int) -> list[TokenRange]:
    """Remove the last ``num_tokens`` positions (local order); return them in local order."""
    popped: list[TokenRange] = []
    remaining = num_tokens
    while remaining > 0:
        begin, end = ranges[-1]
        take = min(remaining, end - begin)
        popped.append((end - take, end))
        if take == end - begin:
            ranges.pop()
        else:
            ranges[-1] = (begin, end - take)
        remaining -= take
    popped.reverse()
    return popped


class DistributedKVDirectory:
    """Global map of requests' KV blocks over the per-instance pools.

    Owns one free list per instance and, per request, one shard per instance
    the request is registered on. Methods that return slots return them in
    the shard's local order, which is the order the worker writes them in.
    """

    def __init__(self, config: KVPoolConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        # Stack with the lowest block id on top: allocation is deterministic.
        self._free: list[list[int]] = [
            list(range(n - 1, -1, -1)) for n in config.num_blocks_per_instance
        ]
        self._shards: dict[str, dict[int, _Shard]] = {}
        self._num_tokens: dict[str, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_instances(self) -> int:
        return self.config.num_instances

    @property
    def req_ids(self) -> tuple[str, ...]:
        return tuple(self._shards)

    def has_request(self, req_id: str) -> bool:
        return req_id in self._shards

    def num_capacity_blocks(self, instance: int) -> int:
        return self.config.num_blocks_per_instance[instance]

    def num_free_blocks(self, instance: int) -> int:
        return len(self._free[instance])

    def num_used_blocks(self, instance: int) -> int:
        return self.num_capacity_blocks(instance) - self.num_free_blocks(instance)

    def num_used_tokens(self, instance: int) -> int:
        return sum(s[instance].num_tokens for s in self._shards.values() if instance in s)

    def num_tokens(self, req_id: str) -> int:
        """Total tokens of the request over all instances (= next position)."""
        return self._num_tokens[req_id]

    def instances(self, req_id: str) -> tuple[int, ...]:
        """Instances the request is registered on (some may hold 0 tokens), sorted."""
        return tuple(sorted(self._shards[req_id]))

    def holders(self, req_id: str) -> tuple[int, ...]:
        """Instances holding at least one token of the request, sorted."""
        return tuple(i for i in self.instances(req_id) if self._shards[req_id][i].num_tokens > 0)

    def shard(self, req_id: str, instance: int) -> ShardView:
        return self._shards[req_id][instance].view(instance)

    def num_local_tokens(self, req_id: str, instance: int) -> int:
        shard = self._shards[req_id].get(instance)
        return 0 if shard is None else shard.num_tokens

    def slots(
        self, req_id: str, instance: int, start: int = 0, stop: int | None = None
    ) -> list[int]:
        """Slot ids of local indices ``[start, stop)`` of the request's shard."""
        shard = self._shards[req_id][instance]
        stop = shard.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= shard.num_tokens:
            raise ValueError(
                f"local range [{start}, {stop}) outside shard of {shard.num_tokens} tokens"
            )
        bs = self.block_size
        return [shard.block_ids[j // bs] * bs + j % bs for j in range(start, stop)]

    def num_blocks_to_append(self, req_id: str, instance: int, num_new_tokens: int) -> int:
        """Blocks that appending ``num_new_tokens`` to the shard would allocate."""
        have = self.num_local_tokens(req_id, instance)
        return cdiv(have + num_new_tokens, self.block_size) - cdiv(have, self.block_size)

    def num_appendable_tokens(self, req_id: str, instance: int) -> int:
        """Tokens the request's shard on ``instance`` can still grow by (tail room + free)."""
        tail_room = -self.num_local_tokens(req_id, instance) % self.block_size
        return tail_room + self.num_free_blocks(instance) * self.block_size

    def can_append(self, req_id: str, instance: int, num_new_tokens: int = 1) -> bool:
        return self.num_blocks_to_append(req_id, instance, num_new_tokens) <= self.num_free_blocks(
            instance
        )

    def snapshot(self) -> DirectorySnapshot:
        return DirectorySnapshot(
            free_blocks=tuple(tuple(f) for f in self._free),
            shards=tuple(
                (r, i, s.view(i)) for r, per in self._shards.items() for i, s in sorted(per.items())
            ),
            num_tokens=tuple(self._num_tokens.items()),
        )

    # ---------------------------------------------------------------- mutations
    def allocate_prefill(
        self,
        num_prompt_tokens: Mapping[str, int],
        placement: Mapping[str, Mapping[int, Sequence[TokenRange]]],
    ) -> None:
        """Register new requests with their KV placed as ``placement`` says.

        ``placement[req][instance]`` lists the global ranges the instance keeps,
        in the local order it will write them. The ranges of a request must
        tile ``[0, num_prompt_tokens[req])`` exactly. Instances listed with no
        ranges are registered empty. All-or-nothing.
        """
        if set(placement) != set(num_prompt_tokens):
            raise ValueError("placement and num_prompt_tokens name different requests")
        for req_id, num_tokens in num_prompt_tokens.items():
            if num_tokens <= 0:
                raise ValueError(f"request {req_id!r} has no prompt tokens")
            if req_id in self._shards:
                raise ValueError(f"request {req_id!r} is already in the directory")
            all_ranges = [r for rs in placement[req_id].values() for r in rs]
            check_tiling(req_id, all_ranges, num_tokens)
            for instance in placement[req_id]:
                self._check_instance(instance)
        needed = [0] * self.num_instances
        for per in placement.values():
            for instance, ranges in per.items():
                needed[instance] += cdiv(sum(e - b for b, e in ranges), self.block_size)
        short = [i for i in range(self.num_instances) if needed[i] > self.num_free_blocks(i)]
        if short:
            detail = ", ".join(
                f"instance {i} needs {needed[i]} blocks, has {self.num_free_blocks(i)} free"
                for i in short
            )
            raise ESPCapacityError(f"prefill placement does not fit: {detail}")
        for req_id, num_tokens in num_prompt_tokens.items():
            self._shards[req_id] = {}
            self._num_tokens[req_id] = num_tokens
            for instance, ranges in placement[req_id].items():
                shard = _Shard()
                for begin, end in ranges:
                    _append_range(shard.position_ranges, begin, end)
                self._shards[req_id][instance] = shard
                self._grow(shard, instance, sum(e - b for b, e in ranges))

    def register(self, req_id: str, instance: int) -> None:
        """Register the request on ``instance`` with no KV (elastic scale-up)."""
        self._check_instance(instance)
        self._shards[req_id].setdefault(instance, _Shard())

    def unregister(self, req_id: str, instance: int) -> None:
        """Drop an empty shard (the instance leaves the request's group)."""
        shard = self._shards[req_id][instance]
        if shard.num_tokens:
            raise ValueError(
                f"instance {instance} still holds {shard.num_tokens} tokens of {req_id!r}"
            )
        del self._shards[req_id][instance]

    def append_tokens(self, req_id: str, instance: int, num_new_tokens: int = 1) -> list[int]:
        """Grow the request by ``num_new_tokens`` new positions stored on ``instance``.

        The instance must be registered for the request. Returns the new
        tokens' slots; their positions are ``num_tokens(req) ..`` before the call.
        """
        shard = self._shards[req_id].get(instance)
        if shard is None:
            raise KeyError(f"request {req_id!r} is not registered on instance {instance}")
        needed = self.num_blocks_to_append(req_id, instance, num_new_tokens)
        if needed > self.num_free_blocks(instance):
            raise ESPCapacityError(
                f"instance {instance} cannot take {num_new_tokens} new token(s) of "
                f"{req_id!r}: needs {needed} block(s), has {self.num_free_blocks(instance)} free"
            )
        first_position = self._num_tokens[req_id]
        start = shard.num_tokens
        self._grow(shard, instance, num_new_tokens)
        _append_range(shard.position_ranges, first_position, first_position + num_new_tokens)
        self._num_tokens[req_id] += num_new_tokens
        return self.slots(req_id, instance, start, start + num_new_tokens)

    def migrate_tail(
        self, req_id: str, src: int, dst: int, num_tokens: int
    ) -> tuple[list[int], list[int], list[TokenRange]]:
        """Move the last ``num_tokens`` local tokens of the request from ``src`` to ``dst``.

        They are appended at the end of ``dst``'s shard (registering it if
        needed); ``src`` blocks that become empty return to its free list.
        Returns ``(src_slots, dst_slots, position_ranges)`` in matching order.
        The source slots may be reused by later allocations, so the worker
        must read them before executing anything planned after this call.
        """
        if src == dst:
            raise ValueError("migration source and destination are the same instance")
        self._check_instance(dst)
        src_shard = self._shards[req_id].get(src)
        if src_shard is None or not 0 < num_tokens <= src_shard.num_tokens:
            have = 0 if src_shard is None else src_shard.num_tokens
            raise ValueError(
                f"cannot migrate {num_tokens} tokens of {req_id!r} from "
                f"instance {src}, which holds {have}"
            )
        needed = self.num_blocks_to_append(req_id, dst, num_tokens)
        if needed > self.num_free_blocks(dst):
            raise ESPCapacityError(
                f"instance {dst} cannot receive {num_tokens} tokens of {req_id!r}: needs "
                f"{needed} block(s), has {self.num_free_blocks(dst)} free"
            )
        keep = src_shard.num_tokens - num_tokens
        src_slots = self.slots(req_id, src, keep, src_shard.num_tokens)
        moved = _pop_tail_ranges(src_shard.position_ranges, num_tokens)
        src_shard.num_tokens = keep
        num_keep_blocks = cdiv(keep, self.block_size)
        freed = src_shard.block_ids[num_keep_blocks:]
        del src_shard.block_ids[num_keep_blocks:]
        # Reversed so that the freed blocks are popped again in ascending order.
        self._free[src].extend(reversed(freed))
        dst_shard = self._shards[req_id].setdefault(dst, _Shard())
        start = dst_shard.num_tokens
        self._grow(dst_shard, dst, num_tokens)
        for begin, end in moved:
            _append_range(dst_shard.position_ranges, begin, end)
        return src_slots, self.slots(req_id, dst, start, start + num_tokens), moved

    def free_request(self, req_id: str) -> int:
        """Release every block of the request on every instance; returns the block count."""
        num_freed = 0
        for instance, shard in self._shards.pop(req_id).items():
            self._free[instance].extend(reversed(shard.block_ids))
            num_freed += len(shard.block_ids)
        del self._num_tokens[req_id]
        return num_freed

    # --------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise ``ESPInvariantError`` unless the bookkeeping is consistent.

        Checks: every block of every pool is either free or owned by exactly
        one shard (so per-instance used + free = capacity); every shard has
        exactly ``cdiv(num_tokens, block_size)`` blocks and as many positions
        as tokens; every request's shards tile ``[0, num_tokens(req))``.
        """
        owner: list[dict[int, str]] = [dict() for _ in range(self.num_instances)]
        for req_id, per in self._shards.items():
            positions: list[TokenRange] = []
            for instance, shard in per.items():
                _require(0 <= instance < self.num_instances, f"bad instance {instance}")
                _require(
                    len(shard.block_ids) == cdiv(shard.num_tokens, self.block_size),
                    f"{req_id!r}@{instance}: {len(shard.block_ids)} blocks for "
                    f"{shard.num_tokens} tokens",
                )
                _require(
                    sum(e - b for b, e in shard.position_ranges) == shard.num_tokens,
                    f"{req_id!r}@{instance}: positions do not match token count",
                )
                _require(
                    all(b < e for b, e in shard.position_ranges),
                    f"{req_id!r}@{instance}: empty position range",
                )
                positions.extend(shard.position_ranges)
                for block in shard.block_ids:
                    _require(
                        0 <= block < self.num_capacity_blocks(instance),
                        f"block {block} outside pool of instance {instance}",
                    )
                    prev = owner[instance].setdefault(block, req_id)
                    _require(
                        prev == req_id, f"block {block}@{instance} owned by {prev!r} and {req_id!r}"
                    )
                _require(
                    len(set(shard.block_ids)) == len(shard.block_ids),
                    f"{req_id!r}@{instance}: a block appears twice in the shard",
                )
            try:
                check_tiling(req_id, positions, self._num_tokens[req_id])
            except ValueError as exc:
                raise ESPInvariantError(str(exc)) from exc
        _require(set(self._num_tokens) == set(self._shards), "token counts out of sync")
        for instance in range(self.num_instances):
            free = self._free[instance]
            _require(len(set(free)) == len(free), f"duplicate free block on {instance}")
            both = set(free) & set(owner[instance])
            _require(not both, f"blocks {sorted(both)} on {instance} both free and owned")
            _require(
                len(free) + len(owner[instance]) == self.num_capacity_blocks(instance),
                f"instance {instance}: used {len(owner[instance])} + free {len(free)} "
                f"!= capacity {self.num_capacity_blocks(instance)}",
            )

    # ---------------------------------------------------------------- internals
    def _check_instance(self, instance: int) -> None:
        if not 0 <= instance < self.num_instances:
            raise ValueError(f"instance {instance} outside [0, {self.num_instances})")

    def _grow(self, shard: _Shard, instance: int, num_new_tokens: int) -> None:
        # Callers have checked capacity; popping can therefore not fail.
        num_new_blocks = cdiv(shard.num_tokens + num_new_tokens, self.block_size) - len(
            shard.block_ids
        )
        free = self._free[instance]
        shard.block_ids.extend(free.pop() for _ in range(num_new_blocks))
        shard.num_tokens += num_new_tokens


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ESPInvariantError(message)


def check_tiling(req_id: str, ranges: Iterable[TokenRange], num_tokens: int) -> None:
    """Raise ``ValueError`` unless ``ranges`` tile ``[0, num_tokens)`` exactly once."""
    cursor = 0
    for begin, end in sorted(ranges):
        if begin != cursor or end <= begin:
            raise ValueError(
                f"ranges of {req_id!r} do not tile [0, {num_tokens}): "
                f"gap or overlap at position {min(begin, cursor)}"
            )
        cursor = end
    if cursor != num_tokens:
        raise ValueError(f"ranges of {req_id!r} cover [0, {cursor}), expected [0, {num_tokens})")
