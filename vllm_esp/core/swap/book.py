"""Scheduler-side bookkeeping of the host KV pool: torch-free, vLLM-free.

The host pool is a second block space, ``num_host_blocks`` slots of one KV
block each (all layers). The scheduler decides which request's blocks go
to which slot; the worker (``vllm_esp/kernels/swap_copy.py``) only executes
the resulting :class:`StepTransfers`. Everything here is plain data, so the
planner, the connector and the tests share it without an engine.

A request's host copy goes through these states::

    swap_out()            plan_load(async)          load_finished()
    ───────────► SWAPPED ─────────────────► PREFETCHING ──────────► PREFETCHED
                  │  ▲                                                  │  │
   plan_load(sync)│  └──────────────────── unprefetch() ────────────────┘  │
   drop(), reset()│                          (device copy freed)           │
                  ▼                                                resumed()
              released ◄───────────────────────────────────────────────────┘

``released`` slots are not free at once: they go to a pending list that
:meth:`SwapBook.take_step` recycles *after* it has handed out the step's
copies. The worker runs a step's swap-outs (``handle_preemptions``) before
its swap-ins (``start_load_kv``), so a slot freed by a swap-in planned in
step N must not receive a swap-out planned in the same step N; deferring
the recycling to the end of step N's plan guarantees that, and a slot a
step-N swap-out writes is only ever read by a load of a later step or of
the same step (which runs after it).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "BlockCopy",
    "HostBlockPool",
    "HostRun",
    "StepTransfers",
    "SwapBook",
    "SwapCounters",
    "SwapEntry",
    "SwapState",
    "host_runs",
]


def _runs(sorted_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive ids."""
    if not sorted_ids:
        return
    start = prev = sorted_ids[0]
    for b in sorted_ids[1:]:
        if b == prev + 1:
            prev = b
            continue
        yield start, prev - start + 1
        start = prev = b
    yield start, prev - start + 1


class HostBlockPool:
    """Host slots, handed out first-fit (lowest address) from free extents.

    First-fit keeps the swap-outs of one step in one contiguous range
    whenever the pool is not fragmented, which lets the worker move them
    with one copy per layer (:func:`host_runs`). A request larger than
    every free extent spans several extents, lowest addresses first.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        # Parallel sorted lists: merged, non-adjacent free extents.
        self._starts: list[int] = [0] if num_blocks else []
        self._lengths: list[int] = [num_blocks] if num_blocks else []
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_extents(self) -> int:
        """Free extents (1 = unfragmented)."""
        return len(self._starts)

    def allocate(self, num: int) -> list[int] | None:
        """``num`` slots (ascending), or ``None`` if fewer are free."""
        if num < 0:
            raise ValueError(f"cannot allocate {num} blocks")
        if num > self._num_free:
            return None
        if num == 0:
            return []
        for i, length in enumerate(self._lengths):
            if length >= num:  # first extent that holds all of it
                start = self._starts[i]
                self._take(i, num)
                self._num_free -= num
                return list(range(start, start + num))
        out: list[int] = []
        while len(out) < num:  # fragmented: lowest extents first
            start, length = self._starts[0], self._lengths[0]
            take = min(length, num - len(out))
            out.extend(range(start, start + take))
            self._take(0, take)
        self._num_free -= num
        return out

    def _take(self, i: int, num: int) -> None:
        if self._lengths[i] == num:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += num
            self._lengths[i] -= num

    def free(self, block_ids: Iterable[int]) -> None:
        """Return slots; a slot that is already free is a ``ValueError``."""
        ids = sorted(block_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate slot in free()")
        for start, length in _runs(ids):
            if start < 0 or start + length > self.num_blocks:
                raise ValueError(f"slot range [{start}, {start + length}) out of pool")
            self._insert(start, length)
        self._num_free += len(ids)

    def _insert(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        end = start + length
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start:
            raise ValueError(f"double free of host slot {start}")
        if i < len(self._starts) and self._starts[i] < end:
            raise ValueError(f"double free of host slot {self._starts[i]}")
        merge_prev = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start
        merge_next = i < len(self._starts) and self._starts[i] == end
        if merge_prev and merge_next:
            self._lengths[i - 1] += length + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif merge_prev:
            self._lengths[i - 1] += length
        elif merge_next:
            self._starts[i] = start
            self._lengths[i] += length
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, length)

    def free_block_ids(self) -> set[int]:
        return {b for s, n in zip(self._starts, self._lengths) for b in range(s, s + n)}

    def check_invariants(self) -> None:
        assert len(self._starts) == len(self._lengths)
        prev_end = -1
        for s, n in zip(self._starts, self._lengths):
            assert n > 0, "empty extent"
            assert s > prev_end, "extents overlap or were not merged"
            prev_end = s + n
        assert prev_end <= self.num_blocks, "extent beyond the pool"
        assert sum(self._lengths) == self._num_free, "free count out of sync"


class SwapState(enum.Enum):
    """Where a request's host copy is in its life (see the module diagram)."""

    SWAPPED = "swapped"
    PREFETCHING = "prefetching"
    PREFETCHED = "prefetched"


@dataclass
class SwapEntry:
    """One request's host copy."""

    request_id: str
    #: ``host_blocks[i]`` holds the request's block ``i`` (all layers).
    host_blocks: list[int]
    #: Tokens whose KV the copy holds (a prefix of the request).
    num_tokens: int
    state: SwapState = SwapState.SWAPPED
    #: The request ended while its prefetch was in flight: free the slots
    #: when the worker reports the load done (it is still reading them).
    finished: bool = False


@dataclass(frozen=True)
class BlockCopy:
    """One request's blocks moved in one direction in one step."""

    request_id: str
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.device_blocks) != len(self.host_blocks):
            raise ValueError("device and host block lists differ in length")


@dataclass(frozen=True)
class StepTransfers:
    """A step's copies, in the order the worker runs them."""

    #: Device -> host, in ``handle_preemptions`` (before freed blocks are reused).
    swap_out: tuple[BlockCopy, ...] = ()
    #: Host -> device, before this step's forward (the request runs now).
    swap_in: tuple[BlockCopy, ...] = ()
    #: Host -> device, asynchronous; reported done through ``get_finished``.
    prefetch: tuple[BlockCopy, ...] = ()

    @property
    def num_blocks(self) -> int:
        return sum(len(c.device_blocks) for c in (*self.swap_out, *self.swap_in, *self.prefetch))


@dataclass(frozen=True)
class HostRun:
    """Consecutive host slots ``host_start, host_start + 1, ...`` paired
    with arbitrary device blocks: one copy per layer moves all of them."""

    host_start: int
    device_blocks: tuple[int, ...]


def host_runs(copies: Iterable[BlockCopy]) -> list[HostRun]:
    """Merge the copies of one direction into contiguous host runs.

    ::

        r1: device [7, 3, 9] -> host [4, 5, 6]      sorted by host slot:
        r2: device [12, 2]   -> host [7, 8]         4:7 5:3 6:9 7:12 8:2 | 12:40
        r3: device [40]      -> host [12]
                                                    runs: host 4..8  <- device [7, 3, 9, 12, 2]
                                                          host 12    <- device [40]

    The worker then issues, per layer, one gather/scatter per run (usually
    one: first-fit allocation keeps a step's slots together).
    """
    copies = [c for c in copies if c.host_blocks]
    # Fast path, the common case: every copy's slots are one ascending range
    # (first-fit). Merging whole copies avoids a per-block Python loop in the
    # worker, which runs right after large copies have cooled its caches.
    if all(
        c.host_blocks == tuple(range(c.host_blocks[0], c.host_blocks[0] + len(c.host_blocks)))
        for c in copies
    ):
        merged: list[HostRun] = []
        for c in sorted(copies, key=lambda c: c.host_blocks[0]):
            if merged:
                last = merged[-1]
                end = last.host_start + len(last.device_blocks)
                if c.host_blocks[0] < end:
                    raise ValueError(
                        f"host slot {c.host_blocks[0]} used twice in one step and direction"
                    )
                if c.host_blocks[0] == end:
                    merged[-1] = HostRun(last.host_start, last.device_blocks + c.device_blocks)
                    continue
            merged.append(HostRun(c.host_blocks[0], c.device_blocks))
        return merged
    pairs = sorted((h, d) for c in copies for h, d in zip(c.host_blocks, c.device_blocks))
    runs: list[tuple[int, list[int]]] = []
    for i, (h, d) in enumerate(pairs):
        if i and h == pairs[i - 1][0]:
            raise ValueError(f"host slot {h} used twice in one step and direction")
        if runs and h == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(d)
        else:
            runs.append((h, [d]))
    return [HostRun(h, tuple(ds)) for h, ds in runs]


@dataclass
class SwapCounters:
    """Cumulative swap counters (exported as ``vllm_esp:swap_*``)."""

    swap_out_requests: int = 0
    swap_out_blocks: int = 0
    #: Loads of either kind (sync resume or prefetch).
    swap_in_requests: int = 0
    swap_in_blocks: int = 0
    prefetches: int = 0
    #: Prefetched copies given back (device blocks freed, host copy kept).
    unprefetches: int = 0
    #: Preemptions that recomputed because the host pool was full.
    recompute_fallbacks: int = 0
    #: Host copies released unused (the prefix cache already held the KV,
    #: the request cannot read cached KV, or the cache was reset).
    dropped: int = 0


class SwapBook:
    """Per-request host copies, the host pool and the step's copy plan."""

    def __init__(self, num_host_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = HostBlockPool(num_host_blocks)
        self.block_size = block_size
        self.counters = SwapCounters()
        self._entries: dict[str, SwapEntry] = {}
        self._pending_free: list[int] = []
        self._out: list[BlockCopy] = []
        self._in: list[BlockCopy] = []
        self._prefetch: list[BlockCopy] = []

    # ----------------------------------------------------------- queries
    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def entry(self, request_id: str) -> SwapEntry | None:
        return self._entries.get(request_id)

    def state(self, request_id: str) -> SwapState | None:
        entry = self._entries.get(request_id)
        return None if entry is None else entry.state

    def entries(self) -> Iterator[SwapEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_used_blocks(self) -> int:
        """Slots holding a live copy."""
        return sum(len(e.host_blocks) for e in self._entries.values())

    @property
    def num_pending_free_blocks(self) -> int:
        """Slots released but not yet reusable (see the module docstring)."""
        return len(self._pending_free)

    def num_in_state(self, state: SwapState) -> int:
        return sum(1 for e in self._entries.values() if e.state is state)

    def swapped_tokens(self, request_id: str) -> int:
        """Tokens a resumed request can load (0 unless the copy is SWAPPED)."""
        entry = self._entries.get(request_id)
        return entry.num_tokens if entry is not None and entry.state is SwapState.SWAPPED else 0

    # ----------------------------------------------------------- changes
    def swap_out(self, request_id: str, device_blocks: Sequence[int], num_tokens: int) -> bool:
        """Plan copying the KV of the first ``num_tokens`` tokens (held in
        ``device_blocks``) to host. False (and a counted recompute fallback)
        if the pool cannot hold it; False without counting if there is
        nothing to copy."""
        if request_id in self._entries:
            # A request is only preempted while running, i.e. after its
            # previous copy was loaded or released; a leftover copy is stale.
            self._release(request_id)
        num = self.num_blocks(num_tokens)
        if num == 0:
            return False
        if num > len(device_blocks):
            raise ValueError(
                f"{request_id}: {num_tokens} tokens need {num} blocks, request holds {len(device_blocks)}"
            )
        host = self.pool.allocate(num)
        if host is None:
            self.counters.recompute_fallbacks += 1
            return False
        self._entries[request_id] = SwapEntry(request_id, host, num_tokens)
        self._out.append(BlockCopy(request_id, tuple(device_blocks[:num]), tuple(host)))
        self.counters.swap_out_requests += 1
        self.counters.swap_out_blocks += num
        return True

    def plan_load(
        self,
        request_id: str,
        device_blocks: Sequence[int],
        num_local_tokens: int,
        num_load_tokens: int,
        *,
        asynchronous: bool,
    ) -> BlockCopy:
        """Plan loading tokens ``[num_local_tokens, num_local_tokens +
        num_load_tokens)`` into the request's newly allocated blocks.

        ``device_blocks`` is the request's whole block table; the first
        ``num_local_tokens`` tokens are a (block-aligned) prefix-cache hit
        whose blocks may be shared with other requests and are never
        written::

            block index:   0    1    2  |  3    4    5        (block_size 16)
            device table: [a]  [b]  [c] | [x]  [y]  [z]       a,b,c: prefix-cache hit
            host copy:    [h0] [h1] [h2]| [h3] [h4] [h5]      local = 48 tokens
                                        └── copy h3..h5 -> x, y, z
        """
        entry = self._entries.get(request_id)
        if entry is None or entry.state is not SwapState.SWAPPED:
            raise ValueError(f"{request_id} has no swapped-out copy to load")
        if num_local_tokens % self.block_size:
            raise ValueError(f"local hit of {num_local_tokens} tokens is not block-aligned")
        if num_load_tokens <= 0 or num_local_tokens + num_load_tokens > entry.num_tokens:
            raise ValueError(
                f"{request_id}: cannot load {num_load_tokens} tokens after {num_local_tokens} "
                f"from a copy of {entry.num_tokens}"
            )
        first = num_local_tokens // self.block_size
        last = self.num_blocks(num_local_tokens + num_load_tokens)
        if last > len(device_blocks):
            raise ValueError(f"{request_id}: {last} blocks to load, {len(device_blocks)} allocated")
        copy = BlockCopy(
            request_id, tuple(device_blocks[first:last]), tuple(entry.host_blocks[first:last])
        )
        self.counters.swap_in_requests += 1
        self.counters.swap_in_blocks += last - first
        if asynchronous:
            entry.state = SwapState.PREFETCHING
            self._prefetch.append(copy)
            self.counters.prefetches += 1
        else:
            self._in.append(copy)
            self._release(request_id)
        return copy

    def load_finished(self, request_id: str) -> None:
        """The worker finished a prefetch."""
        entry = self._entries.get(request_id)
        if entry is None or entry.state is not SwapState.PREFETCHING:
            return
        if entry.finished:
            self._release(request_id)
        else:
            entry.state = SwapState.PREFETCHED

    def unprefetch(self, request_id: str) -> None:
        """A prefetched request gave its device blocks back; the host copy
        (still valid) makes it SWAPPED again, at no copy cost."""
        entry = self._require(request_id, SwapState.PREFETCHED)
        entry.state = SwapState.SWAPPED
        self.counters.unprefetches += 1

    def resumed(self, request_id: str) -> None:
        """A prefetched request runs: its host copy is no longer needed."""
        self._require(request_id, SwapState.PREFETCHED)
        self._release(request_id)

    def drop(self, request_id: str) -> None:
        """Give up a SWAPPED copy unused."""
        self._require(request_id, SwapState.SWAPPED)
        self._release(request_id)
        self.counters.dropped += 1

    def finished(self, request_id: str) -> None:
        """The request finished or was aborted, in whatever state."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        if entry.state is SwapState.PREFETCHING:
            entry.finished = True  # freed by load_finished()
        else:
            self._release(request_id)

    def reset(self) -> bool:
        """Drop every SWAPPED copy; False (nothing dropped) while a
        prefetch holds device blocks, which a reset cannot take back."""
        if any(e.state is not SwapState.SWAPPED for e in self._entries.values()):
            return False
        for request_id in list(self._entries):
            self.drop(request_id)
        return True

    def take_step(self) -> StepTransfers:
        """Hand this step's copies to the worker, then recycle the slots
        released so far (they are read, at the latest, by this step's loads,
        which the worker runs before any later step's swap-outs)."""
        step = StepTransfers(tuple(self._out), tuple(self._in), tuple(self._prefetch))
        self._out, self._in, self._prefetch = [], [], []
        if self._pending_free:
            self.pool.free(self._pending_free)
            self._pending_free = []
        return step

    def _require(self, request_id: str, state: SwapState) -> SwapEntry:
        entry = self._entries.get(request_id)
        if entry is None or entry.state is not state:
            raise ValueError(
                f"{request_id}: expected a {state.value} copy, found "
                f"{None if entry is None else entry.state.value}"
            )
        return entry

    def _release(self, request_id: str) -> None:
        entry = self._entries.pop(request_id)
        self._pending_free.extend(entry.host_blocks)

    # -------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """used + pending + free == pool size; no slot has two owners."""
        self.pool.check_invariants()
        owned = [b for e in self._entries.values() for b in e.host_blocks]
        assert len(owned) == len(set(owned)), "a host slot has two owners"
        pending = self._pending_free
        assert len(pending) == len(set(pending)), "a host slot is pending twice"
        free = self.pool.free_block_ids()
        assert not set(owned) & set(pending), "an owned slot is pending free"
        assert not (set(owned) | set(pending)) & free, "an owned or pending slot is free"
        assert len(owned) + len(pending) + self.pool.num_free == self.pool.num_blocks, (
            "host slots leaked"
        )
        for e in self._entries.values():
            assert e.num_tokens > 0 and len(e.host_blocks) == self.num_blocks(e.num_tokens), e
            assert not e.finished or e.state is SwapState.PREFETCHING, e
