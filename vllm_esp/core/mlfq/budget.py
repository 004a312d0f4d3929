"""The planner's plain numbers: what one request needs this step
(``Candidate``) and what is left of the step while a plan fills it
(``StepBudget``). The planner itself is ``admission.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One request as the planner sees it this step (plain numbers)."""

    request_id: str
    #: Holds KV blocks now (a running or paused request).
    resident: bool
    #: Tokens it would compute this step if nothing capped it.
    num_new_tokens: int
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
    #: Tokens per KV block.
    block_size: int
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

    def num_blocks_for(self, num_tokens: int) -> int:
        """New blocks it needs to compute ``num_tokens`` tokens this step."""
        num_total = self.num_computed_tokens + num_tokens + self.num_lookahead_tokens
        return max(-(-num_total // self.block_size) - self.num_allocated_blocks, 0)


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

    def is_full(self) -> bool:
        return self.num_slots <= 0 or self.token_budget <= 0

    def num_tokens_for(self, cand: Candidate) -> int:
        """Tokens ``cand`` computes if it runs now: capped at the budget."""
        return min(cand.num_new_tokens, self.token_budget)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_tokens: int, num_blocks: int) -> None:
        """Give one request a slot, ``num_tokens`` tokens and ``num_blocks`` blocks."""
        self.num_slots -= 1
        self.token_budget -= num_tokens
        self.num_free_blocks -= num_blocks

    def deallocate(self, victim: Candidate) -> None:
        """Take back an evicted resident's blocks; its KV takes host slots."""
        self.num_free_blocks += victim.num_held_blocks
        self.num_host_free_blocks -= victim.num_offload_host_blocks

    def can_offload(self, victim: Candidate) -> bool:
        return victim.num_offload_host_blocks <= self.num_host_free_blocks

    def can_prefetch(self, cand: Candidate, num_reserve_blocks: int) -> bool:
        """Its KV fits and leaves the reserve free."""
        return self.num_free_blocks - cand.num_prefetch_blocks >= num_reserve_blocks

    def prefetch(self, cand: Candidate) -> None:
        self.num_free_blocks -= cand.num_prefetch_blocks
