"""Preemption by value and the bound on residents, on plain numbers.

``vllm_esp.core.mlfq.value`` says when preempting a resident for a newcomer
pays (the exchange argument); ``plan_admission(preempt_by_value=True,
num_resident_room=...)`` applies it and bounds how many requests hold KV.
Block size 4, as in ``test_mlfq_admission``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.mlfq.admission import Candidate, plan_admission
from vllm_esp.core.mlfq.value import OutputLengthModel, worth_preempting

BS = 4


def waiting(rid: str, num_tokens: int, remaining_s: float) -> Candidate:
    return Candidate(
        request_id=rid,
        resident=False,
        num_new_tokens=num_tokens,
        block_size=BS,
        remaining_s=remaining_s,
    )


def running(
    rid: str, num_computed: int, remaining_s: float, preempt_cost_s: float, num_new: int = 1
) -> Candidate:
    num_blocks = -(-num_computed // BS)
    return Candidate(
        request_id=rid,
        resident=True,
        num_new_tokens=num_new,
        num_computed_tokens=num_computed,
        num_allocated_blocks=num_blocks,
        num_held_blocks=num_blocks,
        block_size=BS,
        remaining_s=remaining_s,
        preempt_cost_s=preempt_cost_s,
    )


def plan(ranked: list[Candidate], **kwargs: object):
    residents = [c for c in reversed(ranked) if c.resident]
    args: dict = dict(
        num_free_blocks=0,
        num_slots=8,
        token_budget=1000,
        chunked_prefill=True,
        preempt_by_value=True,
    )
    args.update(kwargs)
    return plan_admission(ranked, residents, **args)


# ------------------------------------------------------------------ the rule
def test_exchange_argument():
    # n first: R_n + (R_n + c + R_v); v first: R_v + (R_v + R_n).
    for r_v, c, r_n in [(10.0, 2.0, 1.0), (10.0, 9.5, 1.0), (3.0, 0.0, 3.0), (1.0, 0.0, 5.0)]:
        n_first = r_n + (r_n + c + r_v)
        v_first = r_v + (r_v + r_n)
        assert worth_preempting(r_v, c, r_n) == (n_first < v_first)


def test_no_two_requests_preempt_each_other_on_the_same_estimates():
    values = [0.0, 0.5, 1.0, 3.0, 7.0]
    for r_a in values:
        for r_b in values:
            for c_a in values:
                for c_b in values:
                    assert not (worth_preempting(r_a, c_a, r_b) and worth_preempting(r_b, c_b, r_a))


def test_output_length_model_memoryless_prior_then_learned_mixture():
    model = OutputLengthModel(refit_every=1)
    # The memoryless prior: the same expected remaining output after any
    # number of tokens (up to the grid's truncation), so preemption never
    # pays on it.
    prior = [model.expected_remaining_tokens(a) for a in (0, 8, 50, 200)]
    assert max(prior) - min(prior) < 0.05 * prior[0]
    # 90% short (~20 tokens), 10% long (400): once a request is past the
    # short mode it is expected to need far more than a fresh one.
    for i in range(500):
        model.observe(400 if i % 10 == 0 else 16 + i % 8)
    model.maybe_refit()
    fresh = model.expected_remaining_tokens(0)
    past_short = model.expected_remaining_tokens(60)
    assert fresh < 80 and past_short > 300


# --------------------------------------------------------------- the planner
def test_newcomer_preempts_only_a_victim_worth_it():
    # No free blocks: the newcomer needs the 2 blocks of a resident (which
    # can take its next token without a new block).
    victim = running("v", 7, remaining_s=10.0, preempt_cost_s=2.0)
    cheap = plan([waiting("n", 8, remaining_s=1.0), victim], num_slots=1)
    assert cheap.run == ("n",) and cheap.preempt == ("v",)
    costly = victim._replace(preempt_cost_s=9.5)
    kept = plan([waiting("n", 8, remaining_s=1.0), costly], num_slots=1)
    assert kept.preempt == () and kept.skip == ("n",) and kept.run == ("v",)
    # Without the value rule the rank alone decides.
    by_rank = plan([waiting("n", 8, remaining_s=1.0), costly], num_slots=1, preempt_by_value=False)
    assert by_rank.preempt == ("v",)


def test_value_rule_picks_the_worthwhile_victims_not_just_the_lowest():
    near_done = running("near", 7, remaining_s=0.5, preempt_cost_s=1.0)  # lowest rank
    long_one = running("long", 7, remaining_s=20.0, preempt_cost_s=1.0)
    ranked = [waiting("n", 8, remaining_s=2.0), long_one, near_done]
    p = plan(ranked, num_slots=2)
    assert p.preempt == ("long",)
    assert set(p.run) == {"n", "near"}


def test_a_starved_newcomer_takes_room_by_rank_but_memory_by_value():
    costly = running("v", 7, remaining_s=1.0, preempt_cost_s=50.0)
    starved = waiting("n", 8, remaining_s=9.0)._replace(starved=True)
    # Past the residents bound it would wait forever: any lower-ranked
    # resident makes room for it.
    p = plan([starved, costly], num_slots=1, num_free_blocks=10, num_resident_room=0)
    assert p.run == ("n",) and p.preempt == ("v",)
    # Memory it waits for by value (it ranks first for every block freed):
    # preempting by rank there makes starved requests recompute each other.
    q = plan([starved, costly], num_slots=1)
    assert q.preempt == () and q.skip == ("n",)


def test_a_resident_that_must_grow_preempts_by_rank():
    # The top resident needs a new block: vLLM would preempt for it too,
    # whatever the victim's value.
    top = running("top", 8, remaining_s=0.1, preempt_cost_s=0.0)  # at a block edge
    low = running("low", 8, remaining_s=0.1, preempt_cost_s=100.0)
    p = plan([top, low], num_slots=2)
    assert p.preempt == ("low",) and p.run == ("top",)


def test_resident_room_bounds_the_requests_holding_kv():
    paused = running("p", 4, remaining_s=5.0, preempt_cost_s=1.0)
    ranked = [waiting("n1", 4, 1.0), waiting("n2", 4, 1.0), paused]
    # Room for one more resident: n1 is admitted, n2 must make room by
    # preempting the paused resident (worth it: 5 > 1 + 1).
    p = plan(ranked, num_free_blocks=10, num_slots=8, num_resident_room=1)
    assert p.run == ("n1", "n2") and p.preempt == ("p",)
    # Not worth it: n2 waits (holding nothing) and the resident stays.
    costly = paused._replace(preempt_cost_s=10.0)
    q = plan([*ranked[:2], costly], num_free_blocks=10, num_slots=8, num_resident_room=1)
    assert q.run == ("n1", "p") and q.skip == ("n2",) and q.preempt == ()
    # Unbounded: both newcomers run, nothing is preempted.
    r = plan(ranked, num_free_blocks=10, num_slots=8)
    assert r.preempt == () and set(r.run) == {"n1", "n2", "p"}


def test_resident_over_the_token_budget_is_left_out_not_a_victim():
    # Without chunked prefill a resident whose tokens exceed what is left
    # of the budget sits out this step; it is decided (taken), so a
    # lower-ranked newcomer cannot preempt it.
    big = running("big", 8, remaining_s=50.0, preempt_cost_s=0.0, num_new=20)
    p = plan(
        [big, waiting("n", 4, remaining_s=0.1)],
        num_free_blocks=0,
        token_budget=10,
        chunked_prefill=False,
    )
    assert p.preempt == () and "big" not in p.skip and "big" in p.pause
    assert p.skip == ("n",)


# --------------------------------------------------------------- properties
@st.composite
def _steps(draw: st.DrawFn) -> tuple[list[Candidate], dict]:
    n = draw(st.integers(1, 12))
    ranked = []
    for i in range(n):
        remaining = draw(st.floats(0.0, 50.0))
        if draw(st.booleans()):
            ranked.append(
                running(
                    f"r{i}",
                    draw(st.integers(1, 40)),
                    remaining,
                    draw(st.floats(0.0, 20.0)),
                    num_new=draw(st.integers(1, 8)),
                )
            )
        else:
            ranked.append(waiting(f"w{i}", draw(st.integers(1, 40)), remaining))
    kwargs = dict(
        num_free_blocks=draw(st.integers(0, 30)),
        num_slots=draw(st.integers(1, 6)),
        token_budget=draw(st.integers(1, 64)),
        chunked_prefill=draw(st.booleans()),
        num_resident_room=draw(st.integers(0, 4)),
    )
    return ranked, kwargs


@settings(max_examples=400, deadline=None)
@given(_steps())
def test_value_and_room_rules_hold_on_random_steps(step):
    ranked, kwargs = step
    p = plan(ranked, **kwargs)
    by_id = {c.request_id: c for c in ranked}
    residents = {c.request_id for c in ranked if c.resident}
    admitted = [r for r in p.run if r not in residents]
    # The bound: newcomers admitted at most the room plus what was evicted.
    assert len(admitted) <= kwargs["num_resident_room"] + len(p.preempt)
    # Every victim is worth preempting for some newcomer that runs, or a
    # higher-ranked resident that runs (growth, by rank).
    order = [c.request_id for c in ranked]
    for v in p.preempt:
        victim = by_id[v]
        assert any(
            (
                not by_id[r].resident
                and worth_preempting(
                    victim.remaining_s, victim.preempt_cost_s, by_id[r].remaining_s
                )
            )
            or (by_id[r].resident and order.index(r) < order.index(v))
            for r in p.run
        ), (v, p)
    # Residents are run, paused or evicted; each exactly once.
    decided = list(p.run) + list(p.pause) + list(p.preempt)
    assert sorted(r for r in decided if r in residents) == sorted(residents)
