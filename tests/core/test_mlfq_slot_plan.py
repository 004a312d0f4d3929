"""``plan_by_slots``: the plan of a step whose memory cannot bind must be
``plan_admission``'s, decision for decision, and it must be taken
whenever its bound holds (else it would never pay)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.mlfq.admission import Candidate, plan_admission
from vllm_esp.core.mlfq.slot_plan import num_blocks_bound, plan_by_slots


@st.composite
def steps(draw: st.DrawFn) -> tuple[list[Candidate], dict]:
    """Candidates shaped as the scheduler builds them without host swap,
    and the step's limits, free blocks anywhere around the bound."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    lookahead = draw(st.integers(0, 3))
    chunked = draw(st.booleans())
    max_admission = draw(st.integers(0, 12))
    ranked = []
    for i in range(draw(st.integers(0, 14))):
        num_new = draw(st.integers(0, 40))
        if draw(st.booleans()):
            num_computed = draw(st.integers(0, 80))
            num_allocated = -(-num_computed // block_size)
            ranked.append(
                Candidate(
                    request_id=f"r{i}",
                    resident=True,
                    num_new_tokens=num_new,
                    num_computed_tokens=num_computed,
                    num_allocated_blocks=num_allocated,
                    num_held_blocks=num_allocated,
                    block_size=block_size,
                    num_lookahead_tokens=lookahead,
                )
            )
        else:
            # Rarely a newcomer with computed tokens (its need is unbounded).
            num_computed = draw(st.sampled_from([0] * 9 + [draw(st.integers(1, 30))]))
            ranked.append(
                Candidate(
                    request_id=f"w{i}",
                    resident=False,
                    num_new_tokens=num_new,
                    num_computed_tokens=num_computed,
                    block_size=block_size,
                    num_lookahead_tokens=lookahead,
                    num_admission_blocks=draw(st.integers(0, max_admission)),
                )
            )
    limits = dict(
        num_slots=draw(st.integers(0, 10)),
        token_budget=draw(st.integers(0, 150)),
        chunked_prefill=chunked,
        num_resident_room=draw(st.none() | st.integers(-1, 6)),
    )
    bound = num_blocks_bound(
        num_slots=limits["num_slots"],
        token_budget=limits["token_budget"],
        block_size=block_size,
        num_lookahead_tokens=lookahead,
    )
    limits["num_free_blocks"] = bound + draw(st.integers(-3, max_admission + 3))
    shape = dict(block_size=block_size, lookahead=lookahead, max_admission=max_admission)
    return ranked, limits | {"shape": shape}


def entries(ranked: list[Candidate]):
    return [
        (c.request_id, c.resident, c.num_new_tokens, c.num_computed_tokens, c.num_admission_blocks)
        for c in ranked
    ]


def full_plan(ranked: list[Candidate], limits: dict):
    residents = [c for c in reversed(ranked) if c.resident]
    return plan_admission(
        ranked,
        residents,
        num_free_blocks=limits["num_free_blocks"],
        num_slots=limits["num_slots"],
        token_budget=limits["token_budget"],
        chunked_prefill=limits["chunked_prefill"],
        num_resident_room=limits["num_resident_room"],
    )


@settings(max_examples=500, deadline=None)
@given(steps())
def test_the_slot_plan_is_the_full_plan_whenever_it_answers(case):
    ranked, limits = case
    shape = limits["shape"]
    residents = [c.request_id for c in ranked if c.resident]  # as full_plan lists them
    fast = plan_by_slots(
        entries(ranked),
        num_free_blocks=limits["num_free_blocks"],
        num_slots=limits["num_slots"],
        token_budget=limits["token_budget"],
        chunked_prefill=limits["chunked_prefill"],
        block_size=shape["block_size"],
        num_lookahead_tokens=shape["lookahead"],
        resident_ids=residents,
        num_resident_room=limits["num_resident_room"],
    )
    bound = num_blocks_bound(
        num_slots=limits["num_slots"],
        token_budget=limits["token_budget"],
        block_size=shape["block_size"],
        num_lookahead_tokens=shape["lookahead"],
    )
    if limits["num_free_blocks"] < bound:
        assert fast is None
        return
    num_slack = limits["num_free_blocks"] - bound
    plain = limits["num_resident_room"] is None and all(
        c.resident or (c.num_computed_tokens == 0 and c.num_admission_blocks <= num_slack)
        for c in ranked
    )
    if plain:
        assert fast is not None  # the bound holds: the fast path answers
    if fast is None:
        return
    full = full_plan(ranked, limits)
    assert (fast.run, fast.skip, fast.preempt, fast.offload, fast.prefetch) == (
        full.run,
        full.skip,
        full.preempt,
        full.offload,
        full.prefetch,
    )
    assert fast.pause == full.pause


def test_the_bound_counts_growth_and_a_partial_block_per_slot():
    # 100 tokens + 4 slots x 2 lookahead over blocks of 16: ceil(108/16) = 7,
    # one partial block per slot (4).
    bound = num_blocks_bound(num_slots=4, token_budget=100, block_size=16, num_lookahead_tokens=2)
    assert bound == 7 + 4


def test_below_the_bound_or_past_the_slack_the_full_planner_decides():
    # b's admission gate asks for 4 blocks above the growth bound (4 + 2).
    ranked = [("a", True, 1, 15, 0), ("b", False, 30, 0, 4)]
    args = dict(
        num_slots=2,
        token_budget=64,
        chunked_prefill=True,
        block_size=16,
        num_lookahead_tokens=0,
        resident_ids=["a"],
    )
    assert plan_by_slots(ranked, num_free_blocks=5, **args) is None
    assert plan_by_slots(ranked, num_free_blocks=6 + 3, **args) is None
    got = plan_by_slots(ranked, num_free_blocks=6 + 4, **args)
    assert got is not None and got.run == ("a", "b") and got.pause == ()


def test_without_chunked_prefill_a_too_large_newcomer_is_skipped_and_a_resident_paused():
    ranked = [("big", False, 50, 0, 0), ("r", True, 50, 32, 0), ("small", False, 10, 0, 0)]
    got = plan_by_slots(
        ranked,
        num_free_blocks=1_000,
        num_slots=4,
        token_budget=20,
        chunked_prefill=False,
        block_size=16,
        num_lookahead_tokens=0,
        resident_ids=["r"],
    )
    assert got is not None
    assert (got.run, got.skip, got.pause) == (("small",), ("big",), ("r",))
