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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


@dataclass(frozen=True)
class StepPlan:
    """What the next step runs. All tuples are in rank order."""

    run: tuple[str, ...]
    pause: tuple[str, ...]
    preempt: tuple[str, ...]
    skip: tuple[str, ...]


def plan_step(
    ranked: Iterable[Candidate],
    residents_low_to_high: list[Candidate],
    *,
    num_free_blocks: int,
    num_slots: int,
    token_budget: int,
    chunked_prefill: bool,
) -> StepPlan:
    """Walk ``ranked`` best first and fill the step.

    ``residents_low_to_high`` lists every resident candidate, lowest rank
    first: the victims for reclaiming memory, which must rank below the
    request that needs the memory (guaranteed because a resident that the
    walk already reached is in ``run`` and is skipped as a victim).
    """
    run: list[str] = []
    skip: list[str] = []
    preempt: list[str] = []
    taken: set[str] = set()  # run or preempted
    victim_index = 0

    for cand in ranked:
        if num_slots <= 0 or token_budget <= 0:
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
        required = max(need, cand.num_admission_blocks)

        if required > num_free_blocks:
            # Reclaim from the lowest-ranked residents that are not running
            # this step, but only if that makes this request fit.
            reclaimable = 0
            victims: list[Candidate] = []
            i = victim_index
            while num_free_blocks + reclaimable < required and i < len(residents_low_to_high):
                victim = residents_low_to_high[i]
                i += 1
                if victim.request_id in taken or victim.request_id == cand.request_id:
                    continue
                victims.append(victim)
                reclaimable += victim.num_held_blocks
            if num_free_blocks + reclaimable < required:
                if not cand.resident:
                    skip.append(cand.request_id)
                # A resident that cannot grow is left out (paused); vLLM's
                # own pass would preempt it anyway.
                continue
            victim_index = i
            for victim in victims:
                preempt.append(victim.request_id)
                taken.add(victim.request_id)
                num_free_blocks += victim.num_held_blocks

        num_free_blocks -= need
        num_slots -= 1
        token_budget -= num_tokens
        run.append(cand.request_id)
        taken.add(cand.request_id)

    run_set = set(run)
    preempt_set = set(preempt)
    pause = tuple(
        c.request_id
        for c in reversed(residents_low_to_high)
        if c.request_id not in run_set and c.request_id not in preempt_set
    )
    return StepPlan(run=tuple(run), pause=pause, preempt=tuple(preempt), skip=tuple(skip))
