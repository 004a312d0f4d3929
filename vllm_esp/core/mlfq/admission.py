"""Per-step admission planning by rank: torch-free, engine-agnostic.

vLLM's scheduler admits waiting requests only when nothing was preempted
and stops at the first one that does not fit (head-of-line blocking); it
preempts only under memory pressure and only to grow a running request.
MLFQ needs more: a higher-level waiting request must displace a
lower-level running one even when the limit is the number of sequences,
and a request that does not fit must not stop smaller ones behind it.

The planner decides, on plain numbers, which requests take part in the
next step; the vLLM wrapper then shows vLLM's ``schedule()`` exactly that
set, in rank order, so vLLM's own (unchanged) body does the token-level
work::

    ranked:  r0  r1  r2  r3  r4  r5 ...     (policy order, best first)
             │   │   │   │   └── resident, below the cut  -> PAUSE (keep KV)
             │   │   │   └────── waiting, does not fit    -> SKIP (no HoL)
             │   │   └────────── resident                  -> RUN
             │   └────────────── waiting, fits after freeing r5's KV
             │                                             -> RUN, r5 -> PREEMPT
             └────────────────── resident                  -> RUN

Residents that lose their slot keep their KV blocks ("pause"): resuming
them costs nothing. Their blocks are reclaimed ("preempt", lowest rank
first) only when a higher-ranked request needs the memory.

With host KV swap (``mlfq-swap``) three more rules apply, all on the same
plain numbers:

* **reserve**: ``num_reserve_blocks`` is a target, never an admission
  gate: a newcomer that fits in the free blocks is admitted even if it
  eats into the reserve (refusing it while paused residents sit on the
  memory starved admissions: issue 3, mean JCT 2x plain MLFQ);
* **offload**: if fewer than ``num_reserve_blocks`` are free after the
  plan, the lowest-ranked paused residents move to host ("offload", while
  the host pool can take them) until the reserve is back - before a
  running request runs out of memory and forces a preemption. This, not
  refusing newcomers, is how the reserve is kept::

    free 10, reserve 8: newcomer n needs 6 -> RUN n (free 4 < 8)
                        paused p (lowest rank, 5 blocks) -> OFFLOAD (free 9)
* **prefetch**: in a step that neither preempts nor offloads (no
  ping-pong), swapped requests among the next ``prefetch_window`` ranks
  after the cut are loaded back ahead of their turn, best first, if their
  KV fits above the reserve, at most ``num_prefetch`` of them::

    ranked:  r0 r1 r2 | r3  r4  r5  r6 ...   ("|": slots or budget exhausted)
             run      | next: r4 swapped -> PREFETCH (fits above the reserve)

A swapped candidate is cheap to admit: it needs blocks for its whole
sequence but computes only the tokens after the swapped ones (usually one).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """One request as the planner sees it this step."""

    request_id: str
    #: Holds KV blocks now (a running or paused request).
    resident: bool
    #: Blocks it holds now; freed if it is preempted.
    num_held_blocks: int
    #: Tokens it would compute this step if nothing capped it.
    num_new_tokens: int
    #: New blocks it needs to compute ``num_tokens`` tokens this step.
    num_blocks_for: Callable[[int], int]
    #: Free blocks required to be *admitted* at all (vLLM checks that a
    #: newcomer's whole sequence fits before allocating its first chunk);
    #: 0 for residents.
    num_admission_blocks: int = 0
    #: > 0: a swapped request whose KV (this many blocks) can be loaded back
    #: ahead of its turn (prefetch); 0 otherwise.
    num_prefetch_blocks: int = 0
    #: Host slots needed to offload this resident (0 if its host copy
    #: exists already, e.g. a prefetched request).
    num_offload_host_blocks: int = 0


@dataclass(frozen=True)
class AdmissionPlan:
    """What the next step runs. All tuples are in rank order."""

    run: tuple[str, ...]
    pause: tuple[str, ...]
    preempt: tuple[str, ...]
    skip: tuple[str, ...]
    #: Paused residents moved to host to restore the free-block reserve.
    offload: tuple[str, ...] = ()
    #: Swapped requests loaded back ahead of their turn.
    prefetch: tuple[str, ...] = ()


def plan_admission(
    ranked: Iterable[Candidate],
    residents_low_to_high: Sequence[Candidate] | Callable[[], Sequence[Candidate]],
    *,
    num_free_blocks: int,
    num_slots: int,
    token_budget: int,
    chunked_prefill: bool,
    resident_ids: Iterable[str] | None = None,
    num_reserve_blocks: int = 0,
    num_host_free_blocks: int = 0,
    num_prefetch: int = 0,
    prefetch_window: int = 0,
) -> AdmissionPlan:
    """Walk ``ranked`` best first and fill the step.

    ``residents_low_to_high`` lists every resident candidate, lowest rank
    first: the victims for reclaiming memory, which must rank below the
    request that needs the memory (guaranteed because a resident that the
    walk already reached is taken: run, or left out when it cannot grow).
    It may be a zero-argument callable: sorting the residents by rank is
    the costliest part of a plan, and most steps never need it (no memory
    to reclaim, no reserve to restore). ``resident_ids`` then names the
    residents for ``AdmissionPlan.pause`` without building the list.
    The keyword arguments from ``num_reserve_blocks`` on are the host-swap
    rules of the module docstring; their defaults turn them off.
    """
    lazy = _LazyResidents(residents_low_to_high)
    run: list[str] = []
    skip: list[str] = []
    preempt: list[str] = []
    taken: set[str] = set()  # run, preempted, offloaded or left out
    victim_index = 0
    # Upper bound on blocks the untaken residents hold; known once the
    # resident list is built. Lets a request that cannot fit even after
    # every eviction be skipped in O(1) instead of a scan of the victims.
    reclaimable: int | None = None
    ranked = iter(ranked)
    after_cut: list[Candidate] = []  # the first candidate the cut left out

    def take(cand: Candidate) -> None:
        nonlocal reclaimable
        taken.add(cand.request_id)
        if reclaimable is not None and cand.resident:
            reclaimable -= cand.num_held_blocks

    for cand in ranked:
        if num_slots <= 0 or token_budget <= 0:
            after_cut.append(cand)
            break
        if cand.request_id in taken:  # preempted for a higher-ranked one
            continue
        num_tokens = cand.num_new_tokens
        if num_tokens > token_budget:
            if not chunked_prefill:
                skip.append(cand.request_id)  # would not fit the budget: no HoL
                continue
            num_tokens = token_budget
        need = cand.num_blocks_for(num_tokens)
        # No reserve here: a newcomer that fits is admitted, and the
        # offload pass below restores the reserve from paused residents.
        required = max(need, cand.num_admission_blocks)

        if required > num_free_blocks:
            if reclaimable is None:
                reclaimable = sum(
                    v.num_held_blocks for v in lazy.get() if v.request_id not in taken)
            own = cand.num_held_blocks if cand.resident else 0
            if num_free_blocks + reclaimable - own < required:
                # Cannot fit even if every lower-ranked resident went.
                if not cand.resident:
                    skip.append(cand.request_id)
                    if num_free_blocks + reclaimable < 1:
                        # No newcomer can fit any more: the rest of the step
                        # is residents only, in rank order (all of them rank
                        # below this point, the walked ones are taken).
                        num_free_blocks = _fill_with_residents(
                            lazy.get(), taken, run, num_slots, token_budget, num_free_blocks)
                        break
                else:
                    # A resident that cannot grow is left out (paused);
                    # vLLM's own pass would preempt it anyway.
                    take(cand)
                continue
            # Reclaim from the lowest-ranked residents that are not running
            # this step; the bound above guarantees it succeeds.
            victims: list[Candidate] = []
            freed = 0
            residents = lazy.get()
            i = victim_index
            while num_free_blocks + freed < required and i < len(residents):
                victim = residents[i]
                i += 1
                if victim.request_id in taken or victim.request_id == cand.request_id:
                    continue
                victims.append(victim)
                freed += victim.num_held_blocks
            victim_index = i
            for victim in victims:
                preempt.append(victim.request_id)
                take(victim)
                num_free_blocks += victim.num_held_blocks
                num_host_free_blocks -= victim.num_offload_host_blocks

        num_free_blocks -= need
        num_slots -= 1
        token_budget -= num_tokens
        run.append(cand.request_id)
        take(cand)

    offload: list[str] = []
    if 0 < num_reserve_blocks and num_free_blocks < num_reserve_blocks:
        for victim in lazy.get():  # lowest level, last in line first
            if num_free_blocks >= num_reserve_blocks:
                break
            if victim.request_id in taken or victim.num_held_blocks <= 0:
                continue
            if victim.num_offload_host_blocks > num_host_free_blocks:
                continue  # would recompute: not worth it for a reserve
            offload.append(victim.request_id)
            taken.add(victim.request_id)
            num_free_blocks += victim.num_held_blocks
            num_host_free_blocks -= victim.num_offload_host_blocks

    prefetch: list[str] = []
    if num_prefetch > 0 and not preempt and not offload:
        skipped = set(skip)
        for cand in itertools.islice(itertools.chain(after_cut, ranked), prefetch_window):
            if len(prefetch) >= num_prefetch:
                break
            if cand.request_id in taken or cand.request_id in skipped or cand.num_prefetch_blocks <= 0:
                continue
            if num_free_blocks - cand.num_prefetch_blocks < num_reserve_blocks:
                continue
            prefetch.append(cand.request_id)
            num_free_blocks -= cand.num_prefetch_blocks

    run_or_evicted = set(run).union(preempt, offload)
    if resident_ids is None:
        resident_ids = [c.request_id for c in reversed(lazy.get())]
    pause = tuple(r for r in resident_ids if r not in run_or_evicted)
    return AdmissionPlan(
        run=tuple(run), pause=pause, preempt=tuple(preempt), skip=tuple(skip),
        offload=tuple(offload), prefetch=tuple(prefetch),
    )


class _LazyResidents:
    """Builds the rank-sorted resident list on first use only."""

    def __init__(self, source: Sequence[Candidate] | Callable[[], Sequence[Candidate]]) -> None:
        self._source = source
        self._value: Sequence[Candidate] | None = None if callable(source) else source

    def get(self) -> Sequence[Candidate]:
        if self._value is None:
            assert callable(self._source)
            self._value = self._source()
        return self._value


def _fill_with_residents(
    residents_low_to_high: Sequence[Candidate],
    taken: set[str],
    run: list[str],
    num_slots: int,
    token_budget: int,
    num_free_blocks: int,
) -> int:
    """Fill the remaining slots with untaken residents, best first, that
    can grow within the free blocks (no eviction: they are the lowest).
    Returns the free blocks left."""
    for cand in reversed(residents_low_to_high):
        if num_slots <= 0 or token_budget <= 0:
            break
        if cand.request_id in taken:
            continue
        num_tokens = min(cand.num_new_tokens, token_budget)
        need = cand.num_blocks_for(num_tokens)
        if need > num_free_blocks:
            taken.add(cand.request_id)
            continue
        num_free_blocks -= need
        num_slots -= 1
        token_budget -= num_tokens
        run.append(cand.request_id)
        taken.add(cand.request_id)
    return num_free_blocks
