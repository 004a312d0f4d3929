"""Head-major copies of paged KV kept across steps, for the CPU partial kernel.

The fused CPU kernel (``cpu_fused.py``) reads K/V as head-major rows
``[Hkv, keys, D]``; the paged cache holds them per block in vLLM's layout
(AMX packs K in 16-token VNNI groups), so each partial gathers and reorders
a sequence's blocks first. For a decode over 4K keys that copy is about
four fifths of the partial's time, and the next step copies the same blocks
again: only the last block changed.

A :class:`HeadMajorMirror` keeps, per sequence, the reordered copy of its
blocks and the version of each block it copied. Each use re-gathers only
the blocks whose id or version changed (the block the step appended to, a
reused or migrated block)::

    table row:      [ 7 | 3 | 9 | 12 ]      versions now: 4 4 5 9
    mirror entry:   [ 7 | 3 | 9 | 12 ]      versions seen: 4 4 5 8
                                                           stale: ---^
    copy out:  block 12 only -> its rows of the entry's [Hkv, 4*bs, D]

Correctness rests on one rule: **every write into the cache marks the
blocks it wrote** in the shared :class:`BlockVersions` (``PagedKVCache``'s
own writes do; writers that bypass it call ``PagedKVCache.mark_written``).
All layers of a step write the same slots, so a step marks with one
version: a block copied at layer ``l`` after its write at ``l`` stays valid
when later layers write the same slots.

Entries are keyed by a sequence's first block id (two sequences sharing it
through the prefix cache share an entry and re-gather where they differ),
and the mirrors of all entries together are bounded by ``max_tokens``
(least recently used go first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_esp.kernels.attention.paged_cache import PagedKVCache

__all__ = ["BlockVersions", "HeadMajorMirror"]


class BlockVersions:
    """Write version of every block of a cache, shared by its layers."""

    def __init__(self, num_blocks: int, device: torch.device | str) -> None:
        self.versions = torch.zeros(num_blocks, dtype=torch.int64, device=device)
        self.current = 1

    def new_step(self) -> None:
        """Writes from now on carry a new version (once per step, before
        any of its writes: layers of one step share a version)."""
        self.current += 1

    def mark(self, block_ids: torch.Tensor) -> None:
        self.versions[block_ids.to(device=self.versions.device, dtype=torch.int64)] = self.current


@dataclass
class _Entry:
    k: torch.Tensor  # [Hkv, capacity * bs, D]
    v: torch.Tensor
    positions: torch.Tensor  # [capacity * bs]
    block_ids: torch.Tensor  # [capacity], -1: not copied
    versions: torch.Tensor  # [capacity]
    last_used: int

    @property
    def capacity(self) -> int:
        return self.block_ids.shape[0]


class HeadMajorMirror:
    """Per-sequence head-major copies of one layer's paged KV (module docstring)."""

    def __init__(self, versions: BlockVersions, max_tokens: int) -> None:
        self.versions = versions
        self.max_tokens = max_tokens
        self._entries: dict[int, _Entry] = {}
        self._num_tokens = 0
        self._clock = 0
        #: Blocks copied out of the cache, and blocks served without a copy.
        self.num_blocks_copied = 0
        self.num_blocks_reused = 0

    def can_hold(self, cache: PagedKVCache, kv_len: int) -> bool:
        """Whether a sequence of ``kv_len`` slots fits the bound at all (a
        longer one is gathered in key chunks, as without a mirror)."""
        return -(-kv_len // cache.block_size) * cache.block_size <= self.max_tokens

    def head_major(
        self, cache: PagedKVCache, block_table_row: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v [Hkv, kv_len, D], positions [kv_len])`` of a sequence's
        first ``kv_len`` slots, copying only blocks changed since last time."""
        from vllm_esp.kernels.attention.cpu_fused import gather_blocks_head_major

        bs = cache.block_size
        num_blocks = -(-kv_len // bs)
        ids = block_table_row[:num_blocks].to(device=cache.device, dtype=torch.int64)
        entry = self._entry(cache, int(ids[0]), num_blocks)
        current = self.versions.versions[ids]
        stale = (entry.block_ids[:num_blocks] != ids) | (entry.versions[:num_blocks] != current)
        where = stale.nonzero().flatten()
        num_stale = where.shape[0]
        if num_stale:
            k_new, v_new, pos_new = gather_blocks_head_major(cache, ids[where])
            heads, _, dim = k_new.shape
            entry.k.view(heads, entry.capacity, bs, dim)[:, where] = k_new.view(
                heads, num_stale, bs, dim
            )
            entry.v.view(heads, entry.capacity, bs, dim)[:, where] = v_new.view(
                heads, num_stale, bs, dim
            )
            entry.positions.view(entry.capacity, bs)[where] = pos_new.view(num_stale, bs)
            entry.block_ids[where] = ids[where]
            entry.versions[where] = current[where]
        self.num_blocks_copied += num_stale
        self.num_blocks_reused += num_blocks - num_stale
        return entry.k[:, :kv_len], entry.v[:, :kv_len], entry.positions[:kv_len]

    def _entry(self, cache: PagedKVCache, key: int, num_blocks: int) -> _Entry:
        self._clock += 1
        entry = self._entries.get(key)
        if entry is not None and entry.capacity >= num_blocks:
            entry.last_used = self._clock
            return entry
        # New, or grown (doubling, so a decode grows it log-many times, up
        # to the bound): what was copied moves over.
        bs, heads, dim = cache.block_size, cache.num_kv_heads, cache.head_size
        doubled = 2 * entry.capacity if entry is not None else num_blocks
        capacity = max(num_blocks, min(doubled, self.max_tokens // bs))
        device = cache.device
        grown = _Entry(
            k=torch.empty((heads, capacity * bs, dim), dtype=cache.dtype, device=device),
            v=torch.empty((heads, capacity * bs, dim), dtype=cache.dtype, device=device),
            positions=torch.empty(capacity * bs, dtype=torch.int64, device=device),
            block_ids=torch.full((capacity,), -1, dtype=torch.int64, device=device),
            versions=torch.zeros(capacity, dtype=torch.int64, device=device),
            last_used=self._clock,
        )
        if entry is not None:
            num_old = entry.capacity * bs
            grown.k[:, :num_old] = entry.k
            grown.v[:, :num_old] = entry.v
            grown.positions[:num_old] = entry.positions
            grown.block_ids[: entry.capacity] = entry.block_ids
            grown.versions[: entry.capacity] = entry.versions
            self._drop(key)
        self._entries[key] = grown
        self._num_tokens += capacity * bs
        self._evict_beyond_budget(keep=key)
        return grown

    def _evict_beyond_budget(self, keep: int) -> None:
        if self._num_tokens <= self.max_tokens:
            return
        for key in sorted(self._entries, key=lambda k: self._entries[k].last_used):
            if self._num_tokens <= self.max_tokens:
                break
            if key != keep:
                self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self._num_tokens -= entry.k.shape[1]

    @property
    def num_tokens(self) -> int:
        """Token rows held by all entries (their capacity)."""
        return self._num_tokens
