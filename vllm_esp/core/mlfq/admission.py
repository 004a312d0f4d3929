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
first) only when a higher-ranked request needs the memory, and, with
``preempt_by_value``, only from victims worth preempting for a newcomer
(``vllm_esp.core.mlfq.value``: the victim's expected remaining service
exceeds the newcomer's by more than what preemption costs it). A
resident that must grow preempts by rank. With ``num_resident_room`` the
residents are bounded: a newcomer past the bound needs a victim worth
preempting (a starved one: any lower-ranked victim), or it waits (skip).

With host KV swap (``mlfq-swap``) three more rules apply, all on the same
plain numbers:

* **reserve**: ``num_reserve_blocks`` is a target, never an admission
  gate: a newcomer that fits in the free blocks is admitted even if it
  eats into the reserve, because refusing it while paused residents sit on
  the memory would stall admissions behind requests that are not running;
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

One plan is one ``_StepPlanner`` spending a ``StepBudget`` on ``Candidate``s
(both in ``budget.py``), in named steps::

    walk            ranked best first: try_add_one(cand) until the budget is full
      reclaim       (inside try_add_one) preempt the lowest-ranked residents
    restore_reserve offload the lowest-ranked paused residents
    prefetch_next   load swapped requests after the cut
    plan            the paused set and the AdmissionPlan
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from vllm_esp.core.mlfq.budget import Candidate, StepBudget
from vllm_esp.core.mlfq.value import worth_preempting

__all__ = ["AdmissionPlan", "Candidate", "StepBudget", "plan_admission"]


@dataclass(frozen=True)
class AdmissionPlan:
    """What the next step runs. ``run``, ``pause``, ``skip`` and ``prefetch``
    are in rank order; ``preempt`` and ``offload`` lowest rank first, the
    order their victims are chosen in."""

    run: tuple[str, ...]
    preempt: tuple[str, ...]
    skip: tuple[str, ...]
    #: Paused residents moved to host to restore the free-block reserve.
    offload: tuple[str, ...] = ()
    #: Swapped requests loaded back ahead of their turn.
    prefetch: tuple[str, ...] = ()
    #: The residents, in the order ``pause`` lists them (see ``pause``).
    resident_ids: Iterable[str] = field(default=(), repr=False, compare=False)

    @functools.cached_property
    def pause(self) -> tuple[str, ...]:
        """Residents neither run nor evicted: they keep their KV and sit
        out. Computed on first use: with thousands of residents, listing
        them is a pass the scheduler's hot path does not need."""
        decided = set(self.run).union(self.preempt, self.offload)
        return tuple(r for r in self.resident_ids if r not in decided)


def plan_admission(
    ranked: Iterable[Candidate],
    residents_low_to_high: Iterable[Candidate] | Callable[[], Iterable[Candidate]],
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
    preempt_by_value: bool = False,
    num_resident_room: int | None = None,
    num_resident_blocks_bound: Callable[[], int] | None = None,
) -> AdmissionPlan:
    """Walk ``ranked`` best first and fill the step.

    ``residents_low_to_high`` lists every resident candidate, lowest rank
    first: the victims for reclaiming memory, which must rank below the
    request that needs the memory (guaranteed because a resident that the
    walk already reached is taken: run, or left out when it cannot grow).
    It may be a lazy iterable, or a zero-argument callable returning one:
    the planner reads victims from the bottom only as far as it needs
    them, and most steps need none (no memory to reclaim, no reserve to
    restore), so with thousands of residents a plan never builds them
    all. ``num_resident_blocks_bound`` then bounds the blocks all
    residents hold (else they are summed from the list: every victim
    built); ``resident_ids`` names the residents for
    ``AdmissionPlan.pause`` without building the list.
    ``num_reserve_blocks`` to ``prefetch_window`` are the host-swap rules of
    the module docstring; ``preempt_by_value`` and ``num_resident_room``
    the value and bound rules. Their defaults turn them off.
    """
    budget = StepBudget(num_slots, token_budget, num_free_blocks, num_host_free_blocks)
    if num_resident_room is not None:
        budget.num_resident_room = num_resident_room
    planner = _StepPlanner(
        budget,
        _LazyResidents(residents_low_to_high),
        chunked_prefill,
        preempt_by_value,
        resident_blocks_bound=num_resident_blocks_bound,
    )
    ranked = iter(ranked)
    first_after_cut = planner.walk(ranked)
    planner.restore_reserve(num_reserve_blocks)
    after_cut = ranked if first_after_cut is None else itertools.chain((first_after_cut,), ranked)
    planner.prefetch_next(
        after_cut,
        num_prefetch=num_prefetch,
        prefetch_window=prefetch_window,
        num_reserve_blocks=num_reserve_blocks,
    )
    return planner.plan(resident_ids)


class _LazyResidents:
    """The residents lowest rank first, built as far as they are read."""

    def __init__(self, source: Iterable[Candidate] | Callable[[], Iterable[Candidate]]) -> None:
        self._source = source
        self._iter: Iterator[Candidate] | None = None
        self._built: list[Candidate] = []

    def at(self, index: int) -> Candidate | None:
        """The ``index``-th lowest resident (None past the last)."""
        if self._iter is None:
            source = self._source
            self._iter = iter(source() if callable(source) else source)
        while len(self._built) <= index:
            victim = next(self._iter, None)
            if victim is None:
                return None
            self._built.append(victim)
        return self._built[index]

    def iter_from(self, start: int = 0) -> Iterator[Candidate]:
        index = start
        while (victim := self.at(index)) is not None:
            yield victim
            index += 1

    def __iter__(self) -> Iterator[Candidate]:
        return self.iter_from(0)

    def all(self) -> list[Candidate]:
        for _ in self.iter_from(len(self._built)):
            pass
        return self._built


@dataclass(slots=True)
class _StepPlanner:
    """One ``plan_admission`` call: the budget and the decisions so far."""

    budget: StepBudget
    residents: _LazyResidents
    chunked_prefill: bool
    preempt_by_value: bool = False
    resident_blocks_bound: Callable[[], int] | None = None
    run: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    offload: list[str] = field(default_factory=list)
    prefetch: list[str] = field(default_factory=list)
    #: Run, evicted or left out: decided for this step.
    taken: set[str] = field(default_factory=set)
    #: Next victim to look at in the resident list (lowest rank first).
    _victim_index: int = 0
    #: Upper bound on the blocks the untaken residents hold; known once
    #: first needed. Lets a request that cannot fit even after every
    #: eviction be skipped in O(1) instead of a scan of the victims.
    _reclaimable: int | None = None
    #: Blocks the residents taken so far hold (what ``_reclaimable``
    #: starts without, when it comes from ``resident_blocks_bound``).
    _num_taken_held: int = 0
    #: ``_max_victim_margin``'s cache.
    _victim_margin: float | None = None

    # ------------------------------------------------------------------ walk
    def walk(self, ranked: Iterator[Candidate]) -> Candidate | None:
        """Admit ``ranked`` best first until the budget is full. Returns the
        first candidate the cut left out (None if ``ranked`` ran out or no
        newcomer can fit any more)."""
        budget, taken = self.budget, self.taken
        cand = next(ranked, None)
        while cand is not None:
            if cand.resident and self.inline_residents:
                undecided = self._run_as_is(cand, ranked)
                if undecided is None:
                    return None
                cand = undecided
            if budget.num_slots <= 0 or budget.token_budget <= 0:  # budget.is_full()
                return cand
            # Taken: preempted for a higher-ranked one.
            if cand.request_id not in taken and not self.try_add_one(cand):
                # The rest of the step is residents only, in rank order (all
                # of them rank below this point, the walked ones are taken).
                self._fill_with_residents(ranked)
                return None
            cand = next(ranked, None)
        return None

    #: Whether the walk runs residents that fit as they are without
    #: ``try_add_one`` (a test turns it off to show both decide alike).
    inline_residents: ClassVar[bool] = True

    def _run_as_is(self, cand: Candidate | None, ranked: Iterator[Candidate]) -> Candidate | None:
        """``try_add_one``'s common case for a streak of residents, with its
        checks inline on local copies of the budget (it runs once per
        running request per step): from ``cand`` on, each resident whose
        growth fits the free blocks runs, nothing reclaimed. Returns the
        first candidate it leaves undecided (a newcomer, a resident that
        does not fit as it is, or any once the budget is full), None when
        ``ranked`` ran out."""
        budget, taken, chunked = self.budget, self.taken, self.chunked_prefill
        run_one, take_one = self.run.append, taken.add
        num_slots, token_budget = budget.num_slots, budget.token_budget
        num_free = budget.num_free_blocks
        num_held_taken = 0
        try:
            while cand is not None:
                if num_slots <= 0 or token_budget <= 0 or not cand.resident:
                    return cand
                rid = cand.request_id
                if rid in taken:
                    cand = next(ranked, None)
                    continue
                num_tokens = cand.num_new_tokens
                if num_tokens > token_budget:
                    if not chunked:
                        return cand
                    num_tokens = token_budget
                num_total = cand.num_computed_tokens + num_tokens + cand.num_lookahead_tokens
                num_blocks = -(-num_total // cand.block_size) - cand.num_allocated_blocks
                if num_blocks < 0:
                    num_blocks = 0
                num_admission = cand.num_admission_blocks
                if (num_blocks if num_blocks > num_admission else num_admission) > num_free:
                    return cand
                num_slots -= 1
                token_budget -= num_tokens
                num_free -= num_blocks
                run_one(rid)
                take_one(rid)  # self._take(cand), its counters below
                num_held_taken += cand.num_held_blocks
                cand = next(ranked, None)
            return None
        finally:
            budget.num_slots, budget.token_budget = num_slots, token_budget
            budget.num_free_blocks = num_free
            self._num_taken_held += num_held_taken
            if self._reclaimable is not None:
                self._reclaimable -= num_held_taken

    def try_add_one(self, cand: Candidate) -> bool:
        """Run ``cand`` if it fits, reclaiming memory (and resident room)
        from lower-ranked residents as needed; else skip it (waiting: no
        head-of-line blocking) or leave it out (resident). False: no
        newcomer can fit any more."""
        budget = self.budget
        if cand.num_new_tokens > budget.token_budget and not self.chunked_prefill:
            # Would not fit the rest of the budget: no HoL; a resident is
            # left out (paused) this step.
            self._leave_out_of_step(cand)
            return True
        num_tokens = budget.num_tokens_for(cand)
        num_blocks = cand.num_blocks_for(num_tokens)
        # No reserve here: a newcomer that fits is admitted, and
        # restore_reserve offloads paused residents to get it back.
        num_required = max(num_blocks, cand.num_admission_blocks)
        needs_room = not budget.has_room(cand)
        if (needs_room or not budget.can_allocate(num_required)) and not self._reclaim(
            cand, num_required, needs_room
        ):
            return self._leave_out(cand)
        budget.allocate(cand, num_tokens, num_blocks)
        self.run.append(cand.request_id)
        self._take(cand)
        return True

    def _reclaim(self, cand: Candidate, num_required: int, needs_room: bool) -> bool:
        """Preempt lowest-ranked residents not taken yet, among those worth
        preempting for ``cand``, until ``num_required`` blocks are free (and
        one resident's room, if ``needs_room``). False, with nothing
        preempted, if they cannot."""
        num_own = cand.num_held_blocks if cand.resident else 0
        if self.budget.num_free_blocks + self._num_reclaimable() - num_own < num_required:
            return False
        victims = self._victims_for(cand, num_required, needs_room)
        if victims is None:
            return False
        for victim in victims:
            self._evict(victim, self.preempt)
        return True

    def _victims_for(
        self, cand: Candidate, num_required: int, needs_room: bool
    ) -> list[Candidate] | None:
        """The victims ``_reclaim`` would preempt, lowest rank first; None
        if every worthwhile one together does not free enough."""
        by_value = self._by_value(cand, needs_room)
        if by_value and cand.remaining_s >= self._max_victim_margin():
            return None  # no resident is worth preempting for it: O(1)
        residents = self.residents
        while (lowest := residents.at(self._victim_index)) is not None and (
            lowest.request_id in self.taken
        ):
            self._victim_index += 1
        num_free = self.budget.num_free_blocks
        victims: list[Candidate] = []
        for victim in residents.iter_from(self._victim_index):
            if num_free >= num_required and (victims or not needs_room):
                break
            if victim.request_id in self.taken or victim.request_id == cand.request_id:
                continue
            if not by_value or worth_preempting(
                victim.remaining_s, victim.preempt_cost_s, cand.remaining_s
            ):
                victims.append(victim)
                num_free += victim.num_held_blocks
        if num_free < num_required or (needs_room and not victims):
            return None
        return victims

    def _by_value(self, cand: Candidate, needs_room: bool) -> bool:
        """Whether the value rule picks ``cand``'s victims. Not for a
        resident that must grow: vLLM's own memory preemption would free
        a lower-ranked one too. Not for a starved request that needs room
        under the residents bound: it would wait behind the bound forever.
        A starved request that needs memory waits for it by value: it
        ranks first for every block freed, and preempting by rank there
        makes starved requests recompute each other in turn."""
        if not self.preempt_by_value or cand.resident:
            return False
        return not (cand.starved and needs_room)

    def _max_victim_margin(self) -> float:
        """An upper bound on ``remaining_s - preempt_cost_s`` over the
        residents not taken yet (computed once: taking only lowers it;
        it builds every victim, the price of preemption by value)."""
        if self._victim_margin is None:
            self._victim_margin = max(
                (v.remaining_s - v.preempt_cost_s for v in self.residents.all()),
                default=-math.inf,
            )
        return self._victim_margin

    def _leave_out(self, cand: Candidate) -> bool:
        """``cand`` cannot fit even if every lower-ranked resident worth
        preempting went. False: nothing is free or reclaimable, so no
        newcomer can fit."""
        self._leave_out_of_step(cand)
        if cand.resident:
            return True
        return self.budget.num_free_blocks + self._num_reclaimable() >= 1

    def _leave_out_of_step(self, cand: Candidate) -> None:
        if cand.resident:
            # A resident that cannot run is left out (paused); vLLM's own
            # pass would preempt one that cannot grow anyway.
            self._take(cand)
        else:
            self.skip.append(cand.request_id)

    def _fill_with_residents(self, ranked: Iterator[Candidate]) -> None:
        """Fill the remaining slots with the untaken residents among the
        rest of ``ranked``, best first, that can grow within the free blocks
        (no eviction: they are the lowest)."""
        budget = self.budget
        for cand in ranked:
            if budget.is_full():
                break
            if not cand.resident or cand.request_id in self.taken:
                continue
            num_tokens = budget.num_tokens_for(cand)
            num_blocks = cand.num_blocks_for(num_tokens)
            self._take(cand)
            if budget.can_allocate(num_blocks):
                budget.allocate(cand, num_tokens, num_blocks)
                self.run.append(cand.request_id)

    def _num_reclaimable(self) -> int:
        if self._reclaimable is None:
            if self.resident_blocks_bound is not None:
                # An upper bound on every resident's blocks, less what the
                # taken ones hold: still an upper bound on the untaken.
                self._reclaimable = self.resident_blocks_bound() - self._num_taken_held
            else:
                self._reclaimable = sum(
                    v.num_held_blocks
                    for v in self.residents.all()
                    if v.request_id not in self.taken
                )
        return self._reclaimable

    def _take(self, cand: Candidate) -> None:
        self.taken.add(cand.request_id)
        if cand.resident:
            self._num_taken_held += cand.num_held_blocks
            if self._reclaimable is not None:
                self._reclaimable -= cand.num_held_blocks

    def _evict(self, victim: Candidate, into: list[str]) -> None:
        into.append(victim.request_id)
        self._take(victim)
        self.budget.deallocate(victim)

    # ------------------------------------------------------ host-swap passes
    def restore_reserve(self, num_reserve_blocks: int) -> None:
        """Offload the lowest-ranked paused residents the host can take
        until ``num_reserve_blocks`` are free again."""
        budget = self.budget
        if num_reserve_blocks <= 0 or budget.num_free_blocks >= num_reserve_blocks:
            return
        for victim in self.residents:  # lowest rank first, built as read
            if budget.num_free_blocks >= num_reserve_blocks:
                break
            if victim.request_id in self.taken or victim.num_held_blocks <= 0:
                continue
            if not budget.can_offload(victim):
                continue  # would recompute: not worth it for a reserve
            self._evict(victim, self.offload)

    def prefetch_next(
        self,
        after_cut: Iterable[Candidate],
        *,
        num_prefetch: int,
        prefetch_window: int,
        num_reserve_blocks: int,
    ) -> None:
        """Load swapped requests among the first ``prefetch_window`` after
        the cut, best first, that fit above the reserve; only in a step
        that evicted nothing (what it evicted would come straight back)."""
        if num_prefetch <= 0 or self.preempt or self.offload:
            return
        skipped = set(self.skip)
        for cand in itertools.islice(after_cut, prefetch_window):
            if len(self.prefetch) >= num_prefetch:
                break
            rid = cand.request_id
            if rid in self.taken or rid in skipped or cand.num_prefetch_blocks <= 0:
                continue
            if self.budget.can_prefetch(cand, num_reserve_blocks):
                self.prefetch.append(rid)
                self.budget.prefetch(cand)

    # ------------------------------------------------------------------ plan
    def plan(self, resident_ids: Iterable[str] | None) -> AdmissionPlan:
        """The plan; every resident neither run nor evicted is paused."""
        if resident_ids is None:
            resident_ids = [c.request_id for c in reversed(self.residents.all())]
        return AdmissionPlan(
            run=tuple(self.run),
            resident_ids=resident_ids,
            preempt=tuple(self.preempt),
            skip=tuple(self.skip),
            offload=tuple(self.offload),
            prefetch=tuple(self.prefetch),
        )
