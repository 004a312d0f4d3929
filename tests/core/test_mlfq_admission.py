"""The per-step admission planner on hand-built candidates (no vLLM).

``plan_admission`` walks candidates in rank order and decides, on plain
numbers, who runs, who keeps its KV but sits out (pause), whose KV is
reclaimed (preempt), who does not fit (skip) and, with host swap, who moves
to host (offload) or is loaded back early (prefetch). Block size 4 below,
so block counts stay small enough to check by hand.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.mlfq.admission import AdmissionPlan, Candidate, StepBudget, plan_admission

BS = 4


def waiting(rid: str, num_tokens: int, **kwargs: int) -> Candidate:
    """A newcomer: holds nothing, needs ceil(num_tokens / BS) blocks."""
    return Candidate(
        request_id=rid, resident=False, num_new_tokens=num_tokens, block_size=BS, **kwargs
    )


def running(rid: str, num_computed: int, num_new: int = 1, **kwargs: int) -> Candidate:
    """A resident holding the blocks of its ``num_computed`` tokens."""
    num_blocks = -(-num_computed // BS)
    fields = dict(num_allocated_blocks=num_blocks, num_held_blocks=num_blocks) | kwargs
    return Candidate(
        request_id=rid,
        resident=True,
        num_new_tokens=num_new,
        num_computed_tokens=num_computed,
        block_size=BS,
        **fields,
    )


def plan(ranked: list[Candidate], lazy: bool = False, **kwargs: object) -> AdmissionPlan:
    """``plan_admission`` with every resident of ``ranked`` as a victim,
    lowest rank first, and a roomy step unless told otherwise. ``lazy``:
    the victims as a generator with a bound on their blocks, as the
    scheduler passes them."""
    residents = [c for c in reversed(ranked) if c.resident]
    args: dict = dict(num_free_blocks=100, num_slots=8, token_budget=1000, chunked_prefill=True)
    args.update(kwargs)
    if lazy:
        bound = sum(c.num_allocated_blocks for c in residents)
        args["num_resident_blocks_bound"] = lambda: bound
        return plan_admission(ranked, (c for c in residents), **args)
    return plan_admission(ranked, residents, **args)


# ------------------------------------------------------------- plain data
def test_num_blocks_for_counts_blocks_past_the_allocated_ones():
    new = Candidate(request_id="n", resident=False, num_new_tokens=40, block_size=16)
    assert [new.num_blocks_for(n) for n in (0, 1, 16, 17, 40)] == [0, 1, 1, 2, 3]
    # Running at a block boundary: the next token needs a new block.
    at_edge = Candidate(
        request_id="r",
        resident=True,
        num_new_tokens=1,
        num_computed_tokens=16,
        num_allocated_blocks=1,
        num_held_blocks=1,
        block_size=16,
    )
    assert at_edge.num_blocks_for(1) == 1
    inside = at_edge._replace(num_computed_tokens=17, num_allocated_blocks=2)
    assert inside.num_blocks_for(1) == 0 and inside.num_blocks_for(16) == 1
    # Lookahead slots (speculative decoding) count too.
    spec = inside._replace(num_computed_tokens=30, num_lookahead_tokens=2)
    assert spec.num_blocks_for(1) == 1  # ceil(33 / 16) - 2
    # A prefetched request's table covers its whole loaded sequence: never
    # negative even when it holds more than this step needs.
    loaded = at_edge._replace(num_computed_tokens=40, num_allocated_blocks=4)
    assert loaded.num_blocks_for(1) == 0


def test_held_blocks_change_what_eviction_frees_not_what_growth_needs():
    # A prefix-cache victim frees only its exclusive blocks; its growth is
    # still counted against all of its allocated blocks.
    cand = running("r", 16)
    victim = cand._replace(num_held_blocks=1)
    assert victim.num_blocks_for(1) == cand.num_blocks_for(1) == 1
    assert (victim.num_held_blocks, victim.num_allocated_blocks) == (1, 4)


def test_candidate_is_frozen_plain_data():
    cand = running("r", 9, num_offload_host_blocks=3)
    assert all(isinstance(v, (str, bool, int, float)) for v in cand)
    assert cand == running("r", 9, num_offload_host_blocks=3)
    with pytest.raises(AttributeError):
        cand.num_new_tokens = 2  # type: ignore[misc]


# ----------------------------------------------------------------- budget
def test_budget_caps_tokens_and_charges_a_slot_per_request():
    budget = StepBudget(num_slots=2, token_budget=10, num_free_blocks=3)
    assert not budget.is_full()
    assert budget.num_tokens_for(waiting("a", 16)) == 10
    assert budget.num_tokens_for(waiting("b", 6)) == 6
    assert budget.can_allocate(3) and not budget.can_allocate(4)
    budget.allocate(waiting("a", 16), num_tokens=6, num_blocks=2)
    assert (budget.num_slots, budget.token_budget, budget.num_free_blocks) == (1, 4, 1)
    budget.allocate(waiting("b", 6), num_tokens=4, num_blocks=1)
    assert budget.is_full()
    assert StepBudget(num_slots=1, token_budget=0, num_free_blocks=9).is_full()


def test_budget_deallocate_frees_held_blocks_and_charges_host_slots():
    budget = StepBudget(num_slots=1, token_budget=1, num_free_blocks=0, num_host_free_blocks=5)
    victim = running("v", 12, num_held_blocks=2, num_offload_host_blocks=3)
    assert budget.can_offload(victim)
    budget.deallocate(victim)
    assert (budget.num_free_blocks, budget.num_host_free_blocks) == (2, 2)
    assert not budget.can_offload(victim)  # 3 > 2
    swapped = waiting("s", 1, num_prefetch_blocks=2)
    assert budget.can_prefetch(swapped, num_reserve_blocks=0)
    assert not budget.can_prefetch(swapped, num_reserve_blocks=1)
    budget.prefetch(swapped)
    assert budget.num_free_blocks == 0


# ------------------------------------------------------------------- walk
def test_runs_in_rank_order_until_the_slots_run_out():
    ranked = [waiting(f"w{i}", 4) for i in range(5)]
    got = plan(ranked, num_slots=3)
    assert got.run == ("w0", "w1", "w2") and got.skip == () and got.pause == ()


def test_runs_in_rank_order_until_the_token_budget_runs_out():
    ranked = [waiting(f"w{i}", 4) for i in range(4)]
    # Chunked prefill: the third gets the last 2 tokens, the fourth nothing.
    assert plan(ranked, token_budget=10).run == ("w0", "w1", "w2")
    # Without chunking, a request larger than what is left is skipped, and
    # a smaller one behind it still runs.
    ranked.append(waiting("small", 2))
    got = plan(ranked, token_budget=10, chunked_prefill=False)
    assert got.run == ("w0", "w1", "small") and got.skip == ("w2", "w3")


def test_a_waiting_request_that_does_not_fit_does_not_block_smaller_ones():
    big = waiting("big", 48)  # 12 blocks
    gated = waiting("gated", 4, num_admission_blocks=11)  # whole sequence must fit
    small = waiting("small", 8)  # 2 blocks
    got = plan([big, gated, small], num_free_blocks=10)
    assert got.run == ("small",) and got.skip == ("big", "gated")


def test_a_newcomer_preempts_the_lowest_ranked_residents_only_as_far_as_needed():
    top = running("top", 5)  # grows within its block
    lows = [running(f"low{i}", 8) for i in range(3)]  # 2 blocks each, growing: 1 more
    newcomer = waiting("n", 12)  # 3 blocks
    got = plan([top, newcomer, *lows], num_free_blocks=1, num_slots=2)
    # 1 free + low2's 2 = 3: low2 (the lowest) goes, low0 and low1 keep their KV.
    assert got.run == ("top", "n") and got.preempt == ("low2",)
    assert got.pause == ("low0", "low1")


def test_residents_ranked_above_a_newcomer_are_never_preempted_for_it():
    top = running("top", 39)  # 10 blocks, grows within the last one
    newcomer = waiting("n", 12)  # 3 blocks
    low = running("low", 8)  # 2 blocks: not enough on its own
    got = plan([top, newcomer, low], num_free_blocks=0, num_slots=2)
    assert got.run == ("top",) and got.skip == ("n",) and got.preempt == ()
    assert got.pause == ("low",)


def test_a_resident_that_cannot_grow_is_paused_not_preempted():
    grow = running("grow", 8, num_new=5)  # needs 2 more blocks
    small = running("small", 1)  # 1 block, grows within it
    got = plan([grow, small], num_free_blocks=0)
    # Evicting small would free 1 block, not 2: grow sits out with its KV.
    assert got.run == ("small",) and got.pause == ("grow",) and got.preempt == ()


def test_a_resident_grows_by_preempting_lower_ranked_ones():
    grow = running("grow", 8, num_new=5)  # needs 2 more blocks
    low = running("low", 8)  # 2 blocks
    got = plan([grow, low], num_free_blocks=0)
    assert got.run == ("grow",) and got.preempt == ("low",) and got.pause == ()


def test_the_resident_list_is_built_only_when_memory_must_be_reclaimed():
    calls: list[int] = []
    top, low = running("top", 5), running("low", 8)

    def residents() -> list[Candidate]:
        calls.append(1)
        return [low, top]

    def lazy_plan(ranked: list[Candidate], num_free_blocks: int) -> AdmissionPlan:
        return plan_admission(
            ranked,
            residents,
            num_free_blocks=num_free_blocks,
            num_slots=1,
            token_budget=100,
            chunked_prefill=True,
            resident_ids=["top", "low"],
        )

    got = lazy_plan([top, low, waiting("n", 4)], num_free_blocks=10)
    assert got.pause == ("low",) and calls == []
    got = lazy_plan([waiting("n", 12), top, low], num_free_blocks=1)
    assert got.run == ("n",) and got.preempt == ("low",) and calls == [1]


def test_victims_are_built_only_as_far_as_memory_needs_them():
    """With thousands of residents and no free block, a newcomer that needs
    two blocks reads the two lowest residents (and the next, to see it
    has enough), not all of them."""
    residents = [running(f"r{i}", 2) for i in range(2000)]  # one block each, room to grow
    built: list[str] = []

    def victims():
        for cand in reversed(residents):
            built.append(cand.request_id)
            yield cand

    got = plan_admission(
        [waiting("n", 8), *residents],
        victims,
        num_free_blocks=0,
        num_slots=300,
        token_budget=10_000,
        chunked_prefill=True,
        num_resident_blocks_bound=lambda: len(residents),
        resident_ids=[c.request_id for c in residents],
    )
    assert got.preempt == ("r1999", "r1998")
    assert built == ["r1999", "r1998", "r1997"]
    # The step goes on with the residents that can grow in place.
    assert got.run[0] == "n" and len(got.run) == 300


# ---------------------------------------------------------------- host swap
def test_offload_restores_the_reserve_from_the_lowest_paused_residents_the_host_takes():
    top = running("top", 5)
    upper = running("upper", 16, num_offload_host_blocks=4)  # 4 blocks
    mid = running("mid", 16, num_offload_host_blocks=4)
    low = running("low", 24, num_offload_host_blocks=50)  # more than the host has
    got = plan(
        [top, upper, mid, low],
        num_slots=1,
        num_free_blocks=2,
        num_reserve_blocks=5,
        num_host_free_blocks=10,
    )
    # low does not fit the host; mid brings the free blocks to 6 >= 5: enough.
    assert got.run == ("top",) and got.offload == ("mid",)
    assert got.pause == ("upper", "low") and got.preempt == ()
    # No reserve, no offload, however little is free.
    assert plan([top, upper, mid, low], num_slots=1, num_free_blocks=0).offload == ()


def test_the_reserve_never_refuses_a_newcomer_that_fits():
    newcomer = waiting("n", 24)  # 6 blocks
    paused = running("p", 20, num_offload_host_blocks=5)  # below the cut
    got = plan(
        [newcomer, paused],
        num_slots=1,
        num_free_blocks=10,
        num_reserve_blocks=8,
        num_host_free_blocks=10,
    )
    assert got.run == ("n",) and got.offload == ("p",)  # 10 - 6 + 5 = 9 >= 8


def test_prefetch_loads_the_next_swapped_requests_above_the_reserve():
    top = running("top", 5)
    swapped = [waiting(f"s{i}", 1, num_computed_tokens=15, num_prefetch_blocks=4) for i in range(3)]
    got = plan(
        [top, *swapped],
        num_slots=1,
        num_free_blocks=10,
        num_reserve_blocks=2,
        num_prefetch=3,
        prefetch_window=3,
    )
    # 10 - 4 (s0) = 6 >= 2; 6 - 4 (s1) = 2 >= 2; s2 would leave 2 - 4 < 2.
    assert got.run == ("top",) and got.prefetch == ("s0", "s1")
    assert plan([top, *swapped], num_slots=1, num_prefetch=3, prefetch_window=1).prefetch == ("s0",)
    assert plan([top, *swapped], num_slots=1, num_prefetch=1, prefetch_window=3).prefetch == ("s0",)
    assert plan([top, *swapped], num_slots=1, num_prefetch=0, prefetch_window=3).prefetch == ()


def test_prefetch_never_in_a_step_that_preempts_or_offloads():
    swapped = waiting("s", 1, num_computed_tokens=15, num_prefetch_blocks=1)
    # Preempts: the newcomer needs low's blocks.
    newcomer, low = waiting("n", 8), running("low", 8)
    got = plan(
        [newcomer, swapped, low],
        num_slots=1,
        num_free_blocks=0,
        num_prefetch=2,
        prefetch_window=4,
        num_host_free_blocks=10,
    )
    assert got.preempt == ("low",) and got.prefetch == ()
    # Offloads: the reserve is short.
    top, paused = running("top", 5), running("paused", 8, num_offload_host_blocks=2)
    got = plan(
        [top, swapped, paused],
        num_slots=1,
        num_free_blocks=1,
        num_reserve_blocks=2,
        num_host_free_blocks=10,
        num_prefetch=2,
        prefetch_window=4,
    )
    assert got.offload == ("paused",) and got.prefetch == ()
    # Neither: the swapped request right after the cut is prefetched.
    got = plan(
        [top, swapped, paused],
        num_slots=1,
        num_free_blocks=4,
        num_reserve_blocks=2,
        num_host_free_blocks=10,
        num_prefetch=2,
        prefetch_window=4,
    )
    assert got.prefetch == ("s",)


# ------------------------------------------------------- work conservation
@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(1, 50), max_size=12),
    num_slots=st.integers(0, 10),
    token_budget=st.integers(0, 300),
)
def test_work_conserving_when_every_candidate_fits(tokens, num_slots, token_budget):
    ranked = [waiting(f"w{i}", n) for i, n in enumerate(tokens)]
    got = plan(ranked, num_slots=num_slots, token_budget=token_budget, num_free_blocks=10_000)
    ids = [c.request_id for c in ranked]
    assert got.run == tuple(ids[: len(got.run)])  # a rank-order prefix
    assert got.skip == got.pause == got.preempt == ()
    num_used = sum(tokens[: len(got.run)])
    # Either min(num_slots, candidates) run, or the token budget is spent.
    assert len(got.run) == min(num_slots, len(ranked)) or num_used >= token_budget
    if num_used > token_budget:  # only the last one is chunked
        assert num_used - tokens[len(got.run) - 1] < token_budget


# ---------------------------------------------------------------- property
@st.composite
def steps(draw: st.DrawFn) -> tuple[list[Candidate], dict]:
    """A ranked mix of residents and newcomers, shaped as the scheduler
    builds them, and the step's limits."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    chunked = draw(st.booleans())
    ranked = []
    for i in range(draw(st.integers(0, 10))):
        if draw(st.booleans()):
            num_computed = draw(st.integers(1, 64))
            num_allocated = -(-num_computed // block_size) + draw(st.integers(0, 2))
            ranked.append(
                Candidate(
                    request_id=f"r{i}",
                    resident=True,
                    # Without chunked prefill a resident is a decode.
                    num_new_tokens=draw(st.integers(1, 20)) if chunked else 1,
                    num_computed_tokens=num_computed,
                    num_allocated_blocks=num_allocated,
                    num_held_blocks=draw(st.integers(0, num_allocated)),  # prefix sharing
                    block_size=block_size,
                    num_lookahead_tokens=draw(st.integers(0, 2)),
                    num_offload_host_blocks=draw(st.integers(0, 20)),
                )
            )
        else:
            num_swapped = draw(st.integers(0, 40))
            ranked.append(
                Candidate(
                    request_id=f"w{i}",
                    resident=False,
                    num_new_tokens=draw(st.integers(1, 60)),
                    num_computed_tokens=num_swapped,
                    block_size=block_size,
                    num_admission_blocks=draw(st.integers(0, 30)),
                    num_prefetch_blocks=-(-num_swapped // block_size),
                )
            )
    limits = dict(
        num_free_blocks=draw(st.integers(0, 60)),
        num_slots=draw(st.integers(0, 6)),
        token_budget=draw(st.integers(0, 120)),
        chunked_prefill=chunked,
        num_reserve_blocks=draw(st.integers(0, 12)),
        num_host_free_blocks=draw(st.integers(0, 30)),
        num_prefetch=draw(st.integers(0, 3)),
        prefetch_window=draw(st.integers(0, 6)),
    )
    return ranked, limits


@settings(max_examples=400, deadline=None)
@given(steps(), st.booleans())
def test_block_accounting_never_goes_negative_and_decisions_are_disjoint(case, lazy):
    ranked, limits = case
    got = plan(ranked, lazy=lazy, **limits)
    by_id = {c.request_id: c for c in ranked}
    rank = {c.request_id: i for i, c in enumerate(ranked)}
    groups = [got.run, got.pause, got.preempt, got.skip, got.offload, got.prefetch]
    decided = [r for group in groups for r in group]
    assert len(decided) == len(set(decided)), got
    residents = {c.request_id for c in ranked if c.resident}
    assert set(got.run + got.pause + got.preempt + got.offload) >= residents
    assert not residents & set(got.skip + got.prefetch)
    assert not (set(by_id) - residents) & set(got.pause + got.preempt + got.offload)
    # Victims are chosen lowest rank first; everything else is in rank order.
    for group in (got.run, got.pause, got.skip, got.prefetch):
        assert list(group) == sorted(group, key=rank.__getitem__)
    for group in (got.preempt, got.offload):
        assert list(group) == sorted(group, key=rank.__getitem__, reverse=True)

    # Replay the plan on the numbers: it never spends a block it lacks.
    num_free = limits["num_free_blocks"]
    num_free += sum(by_id[r].num_held_blocks for r in got.preempt + got.offload)
    tokens_left = limits["token_budget"]
    for r in got.run:
        num_tokens = min(by_id[r].num_new_tokens, tokens_left)
        tokens_left -= num_tokens
        num_free -= by_id[r].num_blocks_for(num_tokens)
    num_free -= sum(by_id[r].num_prefetch_blocks for r in got.prefetch)
    assert num_free >= 0 and tokens_left >= 0 and len(got.run) <= limits["num_slots"]
    num_host_left = limits["num_host_free_blocks"] - sum(
        by_id[r].num_offload_host_blocks for r in got.preempt + got.offload
    )
    if got.offload:  # offload never overdraws the host (preemption may: recompute)
        assert num_host_left >= 0
    if got.prefetch:
        assert not got.preempt and not got.offload and len(got.prefetch) <= limits["num_prefetch"]
        assert num_free >= limits["num_reserve_blocks"]
    # Victims rank below a request that ran.
    for r in got.preempt:
        assert any(rank[x] < rank[r] for x in got.run)


@settings(max_examples=300, deadline=None)
@given(steps(), st.booleans())
def test_the_inline_resident_path_decides_as_try_add_one(case, lazy):
    # The walk admits a resident that fits as it is without calling
    # try_add_one; with that path off, every decision must be the same.
    from vllm_esp.core.mlfq import admission

    ranked, limits = case
    fast = plan(ranked, lazy=lazy, **limits)
    admission._StepPlanner.inline_residents = False
    try:
        slow = plan(ranked, lazy=lazy, **limits)
    finally:
        admission._StepPlanner.inline_residents = True
    assert (fast.run, fast.pause, fast.preempt, fast.skip, fast.offload, fast.prefetch) == (
        slow.run,
        slow.pause,
        slow.preempt,
        slow.skip,
        slow.offload,
        slow.prefetch,
    )
