"""The plan of a step whose memory cannot bind: slots and tokens decide.

``plan_admission`` checks every candidate's blocks, and builds a full
``Candidate`` per ranked request to do so. Most steps never come near the
free blocks: then its decisions reduce to slots, the token budget and the
order, and ``plan_by_slots`` makes the same plan from three numbers per
request, at a third of the cost (``benchmarks.sched_overhead``).

When memory cannot bind. A request that computes ``t`` tokens after
``c`` computed ones (lookahead ``l``, block size ``bs``) needs::

    resident:  ceil((c + t + l) / bs) - ceil(c / bs)  <=  ceil((t + l) / bs)
    newcomer:  ceil((t + l) / bs)             (no computed tokens, none held)

Over at most ``num_slots`` requests whose ``t`` sum to at most the token
budget ``T``, that is at most ``G = ceil((T + num_slots * l) / bs) +
num_slots`` blocks (each ceiling adds less than one): ``num_blocks_bound``.
With ``F >= G`` free blocks no request's growth can fail, and a newcomer
whose admission gate (vLLM's whole-sequence check) asks for at most
``F - G`` passes it whatever ran before it. Then no check of
``plan_admission`` fails, nothing is reclaimed, skipped for memory or
preempted, and its walk is this module's. A newcomer with computed tokens
(its need is not bounded by its tokens), a larger gate, or one that needs
room under the residents bound makes ``plan_by_slots`` return None:
``plan_admission`` decides then.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm_esp.core.mlfq.admission import AdmissionPlan

#: One ranked request as ``plan_by_slots`` reads it, its fields as the
#: ``Candidate``'s: (request_id, resident, num_new_tokens,
#: num_computed_tokens, num_admission_blocks).
SlotEntry = tuple[str, bool, int, int, int]


def num_blocks_bound(
    *, num_slots: int, token_budget: int, block_size: int, num_lookahead_tokens: int
) -> int:
    """The most blocks the requests of one step can grow by (module
    docstring)."""
    num_slots = max(num_slots, 0)
    num_growth = -(-(max(token_budget, 0) + num_slots * num_lookahead_tokens) // block_size)
    return num_growth + num_slots


def plan_by_slots(
    ranked: Iterable[SlotEntry],
    *,
    num_free_blocks: int,
    num_slots: int,
    token_budget: int,
    chunked_prefill: bool,
    block_size: int,
    num_lookahead_tokens: int,
    resident_ids: Iterable[str],
    num_resident_room: int | None = None,
) -> AdmissionPlan | None:
    """``plan_admission``'s plan when memory cannot bind, else None. Walks
    ``ranked`` best first: each request runs while slots and tokens last
    (capped at what is left with chunked prefill); without chunked prefill
    a request larger than what is left sits out, a newcomer skipped (no
    head-of-line blocking), a resident paused."""
    num_slack = num_free_blocks - num_blocks_bound(
        num_slots=num_slots,
        token_budget=token_budget,
        block_size=block_size,
        num_lookahead_tokens=num_lookahead_tokens,
    )
    if num_slack < 0:
        return None
    room_bound = num_resident_room is not None
    num_room = num_resident_room or 0
    run: list[str] = []
    skip: list[str] = []
    run_one = run.append
    for request_id, resident, num_new, num_computed, num_admission in ranked:
        if num_slots <= 0 or token_budget <= 0:
            break
        if not resident and (
            num_computed > 0 or num_admission > num_slack or (room_bound and num_room <= 0)
        ):
            return None
        if num_new > token_budget:
            if not chunked_prefill:
                if not resident:
                    skip.append(request_id)
                continue
            num_new = token_budget
        if not resident:
            num_room -= 1
        run_one(request_id)
        num_slots -= 1
        token_budget -= num_new
    return AdmissionPlan(run=tuple(run), preempt=(), skip=tuple(skip), resident_ids=resident_ids)
