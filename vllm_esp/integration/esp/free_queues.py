"""Per-instance free-block queues behind vLLM's ``BlockPool``.

vLLM's ``BlockPool`` keeps one ``FreeKVCacheBlockQueue`` (a linked list in
eviction order) and pops from its head. ESP needs to choose *which
instance* new blocks come from, so :class:`InstanceFreeQueues` replaces
``block_pool.free_block_queue`` with one vLLM queue per instance and the
same methods. The ESP scheduler sets :attr:`InstanceFreeQueues.placement`
around each ``allocate_slots`` call; with none set, blocks come from the
instance with the most free blocks. Everything else in vLLM (prefix-cache
hits removing a block from the middle, LRU order on free, the free count
the scheduler checks) keeps working per instance, and the total free count
is the sum, so "does it fit" means "does it fit on the N instances".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from vllm_esp.core.esp.placement import StoragePlacement
from vllm_esp.core.esp.step_plan import instance_of

__all__ = ["InstanceFreeQueues", "StoragePlacement"]


class InstanceFreeQueues:
    """Drop-in for ``FreeKVCacheBlockQueue`` with one queue per instance."""

    def __init__(
        self,
        blocks: Sequence[Any],
        num_instances: int,
        blocks_per_instance: int,
        exclude: Iterable[Any] = (),
    ) -> None:
        from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

        if len(blocks) > num_instances * blocks_per_instance:
            raise ValueError(
                f"{len(blocks)} blocks do not fit {num_instances} x {blocks_per_instance}"
            )
        excluded = {id(b) for b in exclude}
        per_instance: list[list[Any]] = [[] for _ in range(num_instances)]
        for block in blocks:
            if id(block) not in excluded:
                per_instance[instance_of(block.block_id, blocks_per_instance)].append(block)
        self.num_instances = num_instances
        self.blocks_per_instance = blocks_per_instance
        self.queues = [FreeKVCacheBlockQueue(bl) for bl in per_instance]
        self.placement: StoragePlacement | None = None
        #: Blocks handed out per instance since start (metrics).
        self.num_allocated = [0] * num_instances

    # ------------------------------------------------------------ counts
    @property
    def num_free_blocks(self) -> int:
        return sum(q.num_free_blocks for q in self.queues)

    def free_per_instance(self) -> list[int]:
        return [q.num_free_blocks for q in self.queues]

    def _queue(self, block: Any):
        return self.queues[instance_of(block.block_id, self.blocks_per_instance)]

    # ------------------------------------------------------------ allocation
    def popleft(self) -> Any:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[Any]:
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks: {self.num_free_blocks} free")
        counts = self.take_counts(n, self.placement, self.free_per_instance())
        taken: list[Any] = []
        for inst, count in counts:
            taken.extend(self.queues[inst].popleft_n(count))
            self.num_allocated[inst] += count
        return taken

    @staticmethod
    def take_counts(
        n: int, placement: StoragePlacement | None, free: list[int]
    ) -> list[tuple[int, int]]:
        """``[(instance, count), ...]`` in block-table order for ``n`` blocks.

        Plain numbers in and out (no vLLM blocks), so
        ``tests/integration/test_esp_placement.py`` checks it on lists.
        """
        free = list(free)
        order: list[int] = []  # one instance per block, in table order
        preferred = [i for i in (placement.instances if placement else ()) if 0 <= i < len(free)]
        if placement is not None and placement.stripe and preferred:
            while len(order) < n and any(free[i] > 0 for i in preferred):
                for i in preferred:
                    if len(order) < n and free[i] > 0:
                        order.append(i)
                        free[i] -= 1
        else:
            for i in preferred:
                take = min(free[i], n - len(order))
                order.extend([i] * take)
                free[i] -= take
        while len(order) < n:  # spill over: most free first
            i = max(range(len(free)), key=lambda j: (free[j], -j))
            if free[i] == 0:
                raise ValueError("not enough free blocks")
            take = min(free[i], n - len(order))
            order.extend([i] * take)
            free[i] -= take
        # Run-length encode, keeping table order.
        counts: list[tuple[int, int]] = []
        for i in order:
            if counts and counts[-1][0] == i:
                counts[-1] = (i, counts[-1][1] + 1)
            else:
                counts.append((i, 1))
        return counts

    # ------------------------------------------------------------ vLLM queue API
    def remove(self, block: Any) -> None:
        self._queue(block).remove(block)

    def append(self, block: Any) -> None:
        self._queue(block).append(block)

    def append_n(self, blocks: list[Any]) -> None:
        for inst, group in self._by_instance(blocks):
            self.queues[inst].append_n(group)

    def prepend_n(self, blocks: list[Any]) -> None:
        for inst, group in self._by_instance(blocks):
            self.queues[inst].prepend_n(group)

    def get_all_free_blocks(self) -> list[Any]:
        return [b for q in self.queues for b in q.get_all_free_blocks()]

    def iter_blocks_after(self, cursor: Any) -> Iterator[Any]:
        raise NotImplementedError(
            "ESP's per-instance free queues have no single eviction "
            "order (used only by vLLM's simple CPU offload)"
        )

    def _by_instance(self, blocks: list[Any]) -> list[tuple[int, list[Any]]]:
        groups: dict[int, list[Any]] = {}
        for block in blocks:  # keeps each instance's relative (eviction) order
            groups.setdefault(instance_of(block.block_id, self.blocks_per_instance), []).append(
                block
            )
        return sorted(groups.items())
