"""The planner's plain numbers: what one request needs this step
(``Candidate``) and what is left of the step while a plan fills it
(``StepBudget``). The planner itself is ``admission.py``."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple


class Candidate(NamedTuple):
    """One request as the planner sees it this step (plain numbers).

    Immutable; a ``NamedTuple`` rather than a frozen dataclass because the
    scheduler builds one per ranked request per step, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs
    several times more. Build it with keywords; ``_replace`` copies."""

    request_id: str
    #: Holds KV blocks now (a running or paused request).
    resident: bool
    #: Tokens it would compute this step if nothing capped it.
    num_new_tokens: int
    #: Tokens per KV block.
    block_size: int
    #: Tokens whose KV it has before this step; new blocks start past them.
    num_computed_tokens: int = 0
    #: Blocks ``num_blocks_for`` counts as allocated already: those of the
    #: computed tokens for a running request, the whole loaded block table
    #: for a prefetched one, 0 for a waiting one.
    num_allocated_blocks: int = 0
    #: Blocks it holds now that are freed if it is evicted. With prefix
    #: caching a victim's blocks shared with other requests stay allocated,
    #: so this can be less than ``num_allocated_blocks``.
    num_held_blocks: int = 0
    #: Slots vLLM allocates past the new tokens (speculative decoding).
    num_lookahead_tokens: int = 0
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
    #: Expected remaining service in standalone seconds (prefill still to
    #: do plus expected remaining output); inf: unknown.
    remaining_s: float = math.inf
    #: What evicting this resident costs it in standalone seconds
    #: (recomputing its KV, or moving it to host and back).
    preempt_cost_s: float = 0.0
    #: Promoted for starvation: preempts by rank, not by value.
    starved: bool = False

    def num_blocks_for(self, num_tokens: int) -> int:
        """New blocks it needs to compute ``num_tokens`` tokens this step."""
        num_total = self.num_computed_tokens + num_tokens + self.num_lookahead_tokens
        return max(-(-num_total // self.block_size) - self.num_allocated_blocks, 0)


#: The defaults of the fields after ``num_lookahead_tokens``, in field
#: order. A hot loop builds a candidate that leaves them at their defaults
#: as ``tuple.__new__(Candidate, first_eight_fields + CANDIDATE_TAIL)``:
#: half the cost of ``Candidate(...)``, whose ``__new__`` is Python.
CANDIDATE_TAIL: tuple = tuple(
    Candidate._field_defaults[name]
    for name in Candidate._fields[Candidate._fields.index("num_lookahead_tokens") + 1 :]
)


@dataclass(slots=True)
class StepBudget:
    """What is left of the step while a plan fills it. ``num_free_blocks``
    may start below 0 (blocks held back below the pool's free count), and
    ``num_host_free_blocks`` may drop below 0 when a preempted request's KV
    does not fit the host (it is recomputed instead)."""

    num_slots: int
    token_budget: int
    num_free_blocks: int
    num_host_free_blocks: int = 0
    #: Newcomers that may still become residents (running or paused)
    #: before the bound on residents is reached; eviction gives one back.
    num_resident_room: int = sys.maxsize

    def is_full(self) -> bool:
        return self.num_slots <= 0 or self.token_budget <= 0

    def num_tokens_for(self, cand: Candidate) -> int:
        """Tokens ``cand`` computes if it runs now: capped at the budget."""
        return min(cand.num_new_tokens, self.token_budget)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def has_room(self, cand: Candidate) -> bool:
        """``cand`` is a resident already, or there is room for one more."""
        return cand.resident or self.num_resident_room > 0

    def allocate(self, cand: Candidate, num_tokens: int, num_blocks: int) -> None:
        """Give ``cand`` a slot, ``num_tokens`` tokens and ``num_blocks`` blocks."""
        self.num_slots -= 1
        self.token_budget -= num_tokens
        self.num_free_blocks -= num_blocks
        if not cand.resident:
            self.num_resident_room -= 1

    def deallocate(self, victim: Candidate) -> None:
        """Take back an evicted resident's blocks and room; its KV takes
        host slots."""
        self.num_free_blocks += victim.num_held_blocks
        self.num_host_free_blocks -= victim.num_offload_host_blocks
        self.num_resident_room += 1

    def can_offload(self, victim: Candidate) -> bool:
        return victim.num_offload_host_blocks <= self.num_host_free_blocks

    def can_prefetch(self, cand: Candidate, num_reserve_blocks: int) -> bool:
        """Its KV fits and leaves the reserve free, and it has room."""
        if self.num_resident_room <= 0:
            return False
        return self.num_free_blocks - cand.num_prefetch_blocks >= num_reserve_blocks

    def prefetch(self, cand: Candidate) -> None:
        self.num_free_blocks -= cand.num_prefetch_blocks
        self.num_resident_room -= 1
