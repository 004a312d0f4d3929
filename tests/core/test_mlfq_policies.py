"""The torch- and vLLM-free ranking policies, driven directly (no scheduler).

Cost model: every chunk costs 1 ms + 0.01 ms per token (no attention term
unless a test says so); with ``base_quantum_s=4 ms`` and ratio 2 the quanta
are 4, 8, 16, 32 ms. A prompt of ``n`` tokens therefore takes
``1 + n / 100`` ms to prefill and a decode step 1.01 ms. What the MLFQ
scheduler does with these orders on vLLM is in
``tests/integration/test_mlfq_scheduler.py``.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq import (
    POLICIES,
    FCFSPolicy,
    MLFQPolicy,
    RankingPolicy,
    RequestInfo,
    SRPTOraclePolicy,
    make_policy,
)
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.mlfq.gittins import MIN_LENGTHS_TO_LEARN

UNIT = StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=0.0, source="calibrated")
QUANTA_MS = (4.0, 8.0, 16.0, 32.0)


def mlfq(
    *,
    num_levels: int = 4,
    starvation_threshold_s: float = 0.0,
    skip_join: bool = True,
    cost_model: StepCostModel = UNIT,
    demote_by_value: bool = False,
) -> MLFQPolicy:
    return MLFQPolicy(
        num_levels=num_levels,
        base_quantum_s=4e-3,
        quantum_ratio=2.0,
        cost_model=cost_model,
        skip_join=skip_join,
        starvation_threshold_s=starvation_threshold_s,
        demote_by_value=demote_by_value,
    )


def info(
    request_id: str,
    arrival_time: float,
    num_prompt_tokens: int = 10,
    *,
    num_cached_tokens: int = 0,
    max_tokens: int | None = None,
) -> RequestInfo:
    return RequestInfo(
        request_id=request_id,
        arrival_time=arrival_time,
        num_prompt_tokens=num_prompt_tokens,
        num_cached_tokens=num_cached_tokens,
        max_tokens=max_tokens,
    )


def add(
    policy: RankingPolicy,
    request_id: str,
    arrival_time: float,
    num_prompt_tokens: int = 10,
    **kwargs: int | None,
) -> None:
    policy.add_request(
        info(request_id, arrival_time, num_prompt_tokens, **kwargs), now=arrival_time
    )


def ranked(policy: RankingPolicy) -> list[str]:
    return list(policy.iter_ranked())


# ================================================================ MLFQ: joining
@pytest.mark.parametrize(
    ("num_prompt_tokens", "level"),
    [
        (1, 0),
        (290, 0),  # 3.9 ms fits the 4 ms quantum
        (310, 1),
        (690, 1),  # 4.1 .. 7.9 ms
        (710, 2),
        (1490, 2),  # 8.1 .. 15.9 ms
        (1510, 3),
        (100_000, 3),  # past the last quantum: the last level
    ],
)
def test_skip_join_level_is_the_first_quantum_covering_the_prefill(
    num_prompt_tokens: int, level: int
) -> None:
    policy = mlfq()
    assert policy.quanta_s == pytest.approx(tuple(q / 1e3 for q in QUANTA_MS))
    assert policy.join_level(num_prompt_tokens) == level
    add(policy, "r", 0.0, num_prompt_tokens)
    assert policy.level_of("r") == level


def test_skip_join_off_joins_level_zero() -> None:
    policy = mlfq(skip_join=False)
    add(policy, "long", 0.0, 100_000)
    assert policy.level_of("long") == 0


def test_join_is_prefix_cache_aware() -> None:
    policy = mlfq()
    # 2000 tokens cost 21 ms (level 3); with 1990 cached only 10 are computed.
    add(policy, "cached", 0.0, 2000, num_cached_tokens=1990)
    add(policy, "fresh", 0.0, 2000)
    assert (policy.level_of("cached"), policy.level_of("fresh")) == (0, 3)
    # A full hit still computes the last token.
    assert policy.join_level(2000, 2000) == policy.join_level(1) == 0


def test_join_charges_attention_over_the_cached_context() -> None:
    # gamma = 1 us per (query, key) pair: 10 new tokens after 1990 cached
    # cost 1.1 ms + 10 * (1990 + 5.5) us = 21.06 ms, level 3 again.
    costly = StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=1e-6, source="calibrated")
    policy = mlfq(cost_model=costly)
    assert policy.join_level(2000, 1990) == 3
    assert policy.join_level(10) == 0


def test_adding_a_tracked_request_twice_is_refused() -> None:
    policy = mlfq()
    add(policy, "r", 0.0)
    with pytest.raises(ValueError, match="already tracked"):
        add(policy, "r", 1.0)


# ============================================================= MLFQ: demotion
def test_demotion_after_the_quantum_one_level_per_step() -> None:
    policy = mlfq()
    add(policy, "r", 0.0, 10)
    # 2000 tokens (21 ms) is past the quanta of levels 0, 1 and 2 at once.
    policy.on_scheduled("r", 2000, 0, now=1.0)
    assert policy.level_of("r") == 0  # level changes wait for end_step
    policy.end_step(1.0)
    assert policy.level_of("r") == 1 and policy.attained_s("r") == 0.0
    # The counter restarted: 7 decode steps (7.07 ms) stay within 8 ms.
    for step in range(7):
        policy.on_scheduled("r", 1, 2010 + step, now=2.0)
        policy.end_step(2.0)
    assert policy.level_of("r") == 1
    policy.on_scheduled("r", 1, 2017, now=3.0)
    policy.end_step(3.0)
    assert policy.level_of("r") == 2
    assert policy.stats().num_demotions == 2


def test_the_last_level_never_demotes() -> None:
    policy = mlfq(num_levels=2)
    add(policy, "r", 0.0, 100_000)
    assert policy.level_of("r") == 1
    policy.on_scheduled("r", 100_000, 0, now=1.0)
    policy.end_step(1.0)
    assert policy.level_of("r") == 1 and policy.stats().num_demotions == 0


def test_unscheduled_and_unknown_requests_are_not_charged() -> None:
    policy = mlfq()
    add(policy, "r", 0.0)
    policy.on_scheduled("r", 0, 0, now=1.0)
    policy.on_scheduled("gone", 5000, 0, now=1.0)
    policy.end_step(1.0)
    assert policy.attained_s("r") == 0.0 and policy.level_of("r") == 0


# ============================================================ MLFQ: promotion
def test_promotion_waits_the_threshold_from_arrival() -> None:
    policy = mlfq(starvation_threshold_s=5.0)
    add(policy, "long", 1000.0, 2000)  # level 3
    # A clock started at 0 would promote at once; from arrival it waits 5 s.
    policy.end_step(1004.9)
    assert policy.level_of("long") == 3
    policy.end_step(1005.0)
    assert policy.level_of("long") == 0
    assert policy.stats().num_promotions == 1


def test_service_restarts_the_starvation_clock() -> None:
    policy = mlfq(starvation_threshold_s=5.0)
    add(policy, "long", 0.0, 2000)
    policy.on_scheduled("long", 100, 0, now=4.0)  # 2 ms: no demotion
    policy.end_step(4.0)
    policy.end_step(8.9)
    assert policy.level_of("long") == 3
    policy.end_step(9.0)
    assert policy.level_of("long") == 0


def test_promoted_request_joins_level_zero_in_its_arrival_place_for_good() -> None:
    policy = mlfq(starvation_threshold_s=5.0)
    add(policy, "old", 100.0, 10)  # level 0
    add(policy, "starved", 100.0, 2000)  # level 3, arrived with "old"
    add(policy, "recent", 104.0, 10)  # level 0, arrived later
    assert ranked(policy) == ["old", "recent", "starved"]
    policy.end_step(105.0)  # "old" (level 0) and "starved" waited 5 s
    # In its arrival place: only the older "old" goes first.
    assert ranked(policy) == ["old", "starved", "recent"]
    assert policy.level_of("starved") == 0 and policy.stats().num_promotions == 2
    # Served well past level 0's quantum: never demoted again, so newer
    # requests cannot overtake it (its wait is bounded by older ones').
    for _ in range(50):
        policy.on_scheduled("starved", 64, 0, 106.0)
        policy.end_step(106.0)
    add(policy, "later", 106.0, 10)
    assert ranked(policy) == ["old", "starved", "recent", "later"]


def test_promotion_off_at_threshold_zero() -> None:
    policy = mlfq(starvation_threshold_s=0.0)
    add(policy, "long", 0.0, 2000)
    policy.end_step(1e9)
    assert policy.level_of("long") == 3


# ========================================================= MLFQ: level order
def test_order_inside_a_level_is_arrival_then_insertion() -> None:
    policy = mlfq()
    for request_id, arrival in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("b2", 2.0)]:
        add(policy, request_id, arrival)
    assert ranked(policy) == ["a", "b", "b2", "c"]
    # Levels first: an older request on a lower level goes after all of them.
    add(policy, "long", 0.5, 2000)
    assert ranked(policy) == ["a", "b", "b2", "c", "long"]
    assert [policy.rank_key(r) for r in ranked(policy)] == sorted(
        policy.rank_key(r) for r in ranked(policy)
    )


def test_a_demoted_request_keeps_its_arrival_in_the_new_level() -> None:
    policy = mlfq()
    add(policy, "older", 1.0, 500)  # level 1
    add(policy, "newer", 3.0, 500)  # level 1
    add(policy, "runner", 2.0, 10)  # level 0
    policy.on_scheduled("runner", 10, 0, now=4.0)
    policy.on_scheduled("runner", 300, 10, now=4.0)  # 1.1 + 4 ms: past 4 ms
    policy.end_step(4.0)
    assert ranked(policy) == ["older", "runner", "newer"]


def test_remove_forgets_and_ignores_unknown_ids() -> None:
    policy = mlfq(starvation_threshold_s=1.0)
    add(policy, "a", 0.0)
    add(policy, "b", 0.0, 2000)
    policy.remove_request("a")
    policy.remove_request("never-added")
    assert "a" not in policy and len(policy) == 1 and ranked(policy) == ["b"]
    assert policy.stats().num_requests_per_level == [0, 0, 0, 1]
    policy.end_step(10.0)
    assert ranked(policy) == ["b"] and policy.stats().num_promotions == 1
    policy.check_invariants()


# ============================================== MLFQ: random life cycles
class MLFQLifeCycle(RuleBasedStateMachine):
    """Random arrivals, steps, time and removals; the bookkeeping must stay
    consistent and level moves must stay within the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = mlfq(num_levels=4, starvation_threshold_s=0.05)
        self.now = 0.0
        self.num_added = 0
        self.charged: set[str] = set()

    def _tracked(self) -> list[str]:
        return ranked(self.policy)

    @rule(num_prompt_tokens=st.integers(1, 3000), cached=st.integers(0, 3000))
    def add(self, num_prompt_tokens: int, cached: int) -> None:
        request_id = f"r{self.num_added}"
        self.num_added += 1
        self.policy.add_request(
            info(
                request_id,
                self.now,
                num_prompt_tokens,
                num_cached_tokens=min(cached, num_prompt_tokens),
            ),
            self.now,
        )

    @precondition(lambda self: len(self.policy) > 0)
    @rule(data=st.data())
    def schedule(self, data: st.DataObject) -> None:
        ids = self._tracked()
        chosen = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=4))
        for request_id in chosen:
            num_new = data.draw(st.integers(1, 600))
            self.policy.on_scheduled(request_id, num_new, data.draw(st.integers(0, 2000)), self.now)
            self.charged.add(request_id)

    @rule(dt=st.floats(0.0, 0.1))
    def end_step(self, dt: float) -> None:
        self.now += dt
        before = {r: self.policy.level_of(r) for r in self._tracked()}
        promotions = self.policy.stats().num_promotions
        self.policy.end_step(self.now)
        num_raised = 0
        for request_id, level in before.items():
            after = self.policy.level_of(request_id)
            # One level down (only if charged), to level 0, or unchanged.
            assert after in (level, 0) or (after == level + 1 and request_id in self.charged)
            num_raised += level > 0 and after == 0
        assert self.policy.stats().num_promotions - promotions >= num_raised
        self.charged.clear()

    @precondition(lambda self: len(self.policy) > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from([*self._tracked(), "unknown"]))
        self.policy.remove_request(request_id)
        assert request_id not in self.policy
        self.charged.discard(request_id)

    @invariant()
    def consistent(self) -> None:
        policy = self.policy
        policy.check_invariants()
        ids = self._tracked()
        assert len(ids) == len(set(ids)) == len(policy)
        assert ids == sorted(ids, key=policy.rank_key)
        assert list(policy.iter_ranked_reversed()) == ids[::-1]
        levels = [policy.level_of(r) for r in ids]
        assert levels == sorted(levels)
        assert sum(policy.stats().num_requests_per_level) == len(policy)


TestMLFQLifeCycle = MLFQLifeCycle.TestCase
TestMLFQLifeCycle.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ==================================================================== FCFS
def test_fcfs_ranks_by_arrival_and_ignores_service() -> None:
    policy = FCFSPolicy()
    for request_id, arrival, prompt in [
        ("c", 3.0, 10),
        ("a", 1.0, 5000),
        ("b", 2.0, 1),
        ("b2", 2.0, 1),
    ]:
        add(policy, request_id, arrival, prompt)
    assert ranked(policy) == ["a", "b", "b2", "c"]
    policy.on_scheduled("a", 5000, 0, now=4.0)
    policy.end_step(100.0)
    assert ranked(policy) == ["a", "b", "b2", "c"]
    assert policy.level_of("a") == 0 and policy.stats().num_requests_per_level == [4]
    policy.check_invariants()


def test_fcfs_removal() -> None:
    policy = FCFSPolicy()
    for request_id, arrival in [("a", 1.0), ("b", 2.0), ("c", 3.0)]:
        add(policy, request_id, arrival)
    policy.remove_request("b")
    policy.remove_request("unknown")
    assert ranked(policy) == ["a", "c"] and "b" not in policy and len(policy) == 2
    policy.check_invariants()


# ==================================================================== SRPT
def test_srpt_ranks_by_remaining_work() -> None:
    policy = SRPTOraclePolicy(cost_model=UNIT)
    add(policy, "long-output", 0.0, 100, max_tokens=50)
    add(policy, "long-prompt", 1.0, 3000, max_tokens=2)
    add(policy, "short", 2.0, 100, max_tokens=10)
    # 2.0 ms + 49 decodes = 51.5 ms; 31 ms + 1 decode = 32 ms; 2 + 9 decodes = 11 ms.
    assert ranked(policy) == ["short", "long-prompt", "long-output"]
    assert policy.remaining_s("short") == pytest.approx(2e-3 + 9 * 1.01e-3)
    assert [policy.rank_key(r) for r in ranked(policy)] == sorted(
        policy.rank_key(r) for r in ranked(policy)
    )


def test_srpt_ties_go_by_arrival() -> None:
    policy = SRPTOraclePolicy(cost_model=UNIT)
    for request_id in ("first", "second", "third"):
        add(policy, request_id, 0.0, 100, max_tokens=5)
    assert ranked(policy) == ["first", "second", "third"]


def test_srpt_refuses_a_request_without_max_tokens() -> None:
    policy = SRPTOraclePolicy(cost_model=UNIT)
    with pytest.raises(ValueError, match="true output length"):
        add(policy, "r", 0.0, 100)
    assert len(policy) == 0


def test_srpt_updates_as_tokens_are_computed() -> None:
    policy = SRPTOraclePolicy(cost_model=UNIT)
    add(policy, "a", 0.0, 100, max_tokens=50)
    add(policy, "b", 1.0, 100, max_tokens=30)
    assert ranked(policy) == ["b", "a"]
    before = policy.remaining_s("a")
    policy.on_scheduled("a", 100, 0, now=2.0)  # prefill done, one token out
    for k in range(25):
        policy.on_scheduled("a", 1, 100 + k, now=3.0)
    assert policy.remaining_s("a") < before
    assert ranked(policy) == ["a", "b"]  # 24 decodes left against b's 29 + prefill
    policy.remove_request("a")
    policy.remove_request("unknown")
    assert ranked(policy) == ["b"]


# ============================================================== make_policy
def test_make_policy_builds_mlfq_from_the_settings() -> None:
    settings_ = MLFQConfig(
        num_levels=3,
        base_quantum_ms=4.0,
        quantum_ratio=3.0,
        skip_join=False,
        starvation_threshold_s=2.5,
    )
    policy = make_policy(settings_, UNIT)
    assert isinstance(policy, MLFQPolicy)
    assert policy.quanta_s == pytest.approx((4e-3, 12e-3, 36e-3))
    assert policy.num_levels == 3 and policy.skip_join is False
    assert policy.starvation_threshold_s == 2.5 and policy.cost_model is UNIT


def test_make_policy_auto_quantum_from_the_cost_model() -> None:
    policy = make_policy(MLFQConfig(auto_quantum_decode_steps=8), UNIT)
    assert isinstance(policy, MLFQPolicy)
    # 8 decode steps at 512 tokens of context: 8 x 1.01 ms.
    assert policy.quanta_s[0] == pytest.approx(8 * UNIT.decode_time(512)) == 8.08e-3


@pytest.mark.parametrize(
    ("name", "cls"), [("fcfs", FCFSPolicy), ("srpt", SRPTOraclePolicy), ("mlfq", MLFQPolicy)]
)
def test_make_policy_builds_each_registered_policy(name: str, cls: type) -> None:
    assert POLICIES[name] is cls and cls.name == name
    policy = make_policy(MLFQConfig(policy=name), UNIT)
    assert type(policy) is cls
    add(policy, "r", 0.0, 10, max_tokens=4)
    assert ranked(policy) == ["r"]
    if isinstance(policy, SRPTOraclePolicy):
        assert policy.cost_model is UNIT


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_walks_its_order_backwards(name: str) -> None:
    """The planner reads eviction victims from ``iter_ranked_reversed``:
    it must be ``iter_ranked`` backwards, through arrivals, service and
    level moves."""
    policy = make_policy(MLFQConfig(policy=name, base_quantum_ms=1.0), UNIT)
    for i in range(12):
        add(policy, f"r{i}", 0.01 * i, 10 + 97 * (i % 5), max_tokens=4 + 3 * (i % 4))
    for step in range(6):
        for i in range(step, 12, 3):
            policy.on_scheduled(f"r{i}", 1 + 50 * (i % 2), 10 * step, 0.1 * step)
        policy.end_step(0.1 * step)
        order = ranked(policy)
        assert list(policy.iter_ranked_reversed()) == order[::-1]
        assert order == sorted(order, key=policy.rank_key)
    policy.remove_request("r3", num_output_tokens=5)
    assert list(policy.iter_ranked_reversed()) == ranked(policy)[::-1]


# ---------------------------------------------------------- demotion by value
def value_mlfq(lengths: list[int]) -> MLFQPolicy:
    """MLFQ that demotes by value, having learned ``lengths`` (prompt 10)."""
    policy = MLFQPolicy(
        num_levels=4,
        base_quantum_s=4e-3,
        quantum_ratio=2.0,
        cost_model=UNIT,
        demote_by_value=True,
        refit_every=1,
    )
    for i, length in enumerate(lengths):
        policy.add_request(info(f"done{i}", 0.0), 0.0)
        policy.remove_request(f"done{i}", num_output_tokens=length)
    return policy  # refitted at its next charge


def decode(policy: MLFQPolicy, rid: str, num_tokens: int, now: float = 0.0) -> None:
    """Prefill (10 tokens) then ``num_tokens - 1`` decodes, a step each."""
    policy.on_scheduled(rid, 10, 0, now)
    policy.end_step(now)
    for k in range(num_tokens - 1):
        policy.on_scheduled(rid, 1, 10 + k, now)
        policy.end_step(now)


def test_value_demotion_keeps_a_request_that_is_the_better_bet() -> None:
    # Uniform lengths (increasing hazard): a request that has run is expected
    # to need fewer tokens than a fresh one, so it keeps its level (FCFS-like).
    policy = value_mlfq(list(range(1, 201)))
    policy.add_request(info("a", 1.0), 1.0)
    decode(policy, "a", 40)  # ~40 ms: far past the 4 ms quantum of level 0
    assert policy.level_of("a") == 0
    assert policy.num_demotions == 0 and policy.num_demotions_declined > 0


def test_value_demotion_demotes_a_request_past_the_short_mode() -> None:
    # 9 short (8 tokens) : 1 long (400): past 8 tokens a request is probably
    # long, a worse bet than a fresh one: demoted as plain MLFQ would.
    policy = value_mlfq([8] * 90 + [400] * 10)
    policy.add_request(info("a", 1.0), 1.0)
    decode(policy, "a", 6)
    assert policy.level_of("a") == 0  # still in the short mode: kept
    decode_more = 30
    for k in range(decode_more):
        policy.on_scheduled("a", 1, 15 + k, 0.0)
        policy.end_step(0.0)
    assert policy.level_of("a") > 0 and policy.num_demotions > 0


@pytest.mark.parametrize("num_lengths", [MIN_LENGTHS_TO_LEARN - 1, MIN_LENGTHS_TO_LEARN])
def test_value_demotion_waits_for_the_minimum_number_of_lengths(num_lengths: int) -> None:
    # 9 short : 1 long, as above: from the minimum on, a request past the
    # short mode is demoted; below it the prior keeps it (as FCFS would).
    policy = value_mlfq([8 if i % 10 else 400 for i in range(num_lengths)])
    policy.add_request(info("a", 1.0), 1.0)
    decode(policy, "a", 30)
    assert (policy.level_of("a") > 0) == (num_lengths >= MIN_LENGTHS_TO_LEARN)


def test_value_demotion_without_data_demotes_nothing() -> None:
    # The memoryless prior gives every age the same index: no request is a
    # worse bet than a fresh one, so none is demoted (FCFS-like, as stock
    # vLLM) until finished requests say otherwise; plain MLFQ demotes.
    policy = MLFQPolicy(
        num_levels=4, base_quantum_s=4e-3, quantum_ratio=2.0, cost_model=UNIT, demote_by_value=True
    )
    plain = mlfq()
    for p in (policy, plain):
        p.add_request(info("a", 1.0), 1.0)
        decode(p, "a", 200)
    assert policy.level_of("a") == 0 and policy.num_demotions == 0
    assert plain.level_of("a") > 0


def test_aborted_requests_do_not_teach_value_demotion() -> None:
    policy = value_mlfq([])
    for i in range(50):
        policy.add_request(info(f"x{i}", 0.0), 0.0)
        policy.remove_request(f"x{i}")  # aborted
    policy.end_step(0.0)
    policy.add_request(info("a", 1.0), 1.0)
    decode(policy, "a", 20)
    # Still the memoryless prior: had the aborts been learned as lengths,
    # 20 tokens would be past every one of them, and demoted.
    assert policy.level_of("a") == 0


def test_a_declined_demotion_is_judged_again_after_a_refit() -> None:
    # Declined under uniform lengths (never worth it, at any length), then
    # the lengths turn short/long: at its next charge past 8 tokens the
    # request is demoted, without waiting for a length the old tables named.
    policy = value_mlfq(list(range(1, 201)))
    policy.add_request(info("a", 1.0), 1.0)
    decode(policy, "a", 40)
    assert policy.level_of("a") == 0 and policy.num_demotions_declined > 0
    for i in range(400):
        policy.add_request(info(f"late{i}", 1.0), 1.0)
        policy.remove_request(f"late{i}", num_output_tokens=8 if i % 10 else 400)
    policy.on_scheduled("a", 1, 10 + 39, 1.0)
    policy.end_step(1.0)
    assert policy.level_of("a") == 1
    policy.check_invariants()


class _JudgedEveryStep(MLFQPolicy):
    """MLFQ without the recheck shortcut: a declined demotion is judged
    again at every charge past the quantum."""

    def end_step(self, now: float) -> None:
        super().end_step(now)
        for request_id in self._declined:
            self._states[request_id].recheck_output_tokens = 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_declined_demotions_are_judged_again_when_the_answer_can_change(seed: int) -> None:
    # Short/long lengths (demotion pays past the short mode) plus a spread
    # (it does not below): declines, demotions and refits all happen. The
    # shortcut must move every request exactly as judging every step does.
    rng = random.Random(seed)
    history = [8] * 20 + [300] * 3 + [rng.randint(1, 60) for _ in range(15)]
    fast, slow = value_mlfq(history), value_mlfq(history)
    slow.__class__ = _JudgedEveryStep
    computed: dict[str, int] = {}  # a 10-token prompt, then a token a step
    for step in range(120):
        now = step * 0.01
        if rng.random() < 0.3 or not computed:
            for policy in (fast, slow):
                policy.add_request(info(f"n{step}", now), now)
            computed[f"n{step}"] = 0
        scheduled = rng.sample(sorted(computed), k=min(len(computed), rng.randint(1, 6)))
        charges = [(r, 1 if computed[r] else 10, computed[r]) for r in scheduled]
        for policy in (fast, slow):
            policy.on_scheduled_step(charges, now)
            policy.end_step(now)
        for request_id, num_new, _ in charges:
            computed[request_id] += num_new
            if rng.random() < 0.08:  # finishes: teaches the lengths, refits
                for policy in (fast, slow):
                    policy.remove_request(request_id, computed[request_id] - 9)
                del computed[request_id]
        fast.check_invariants()
        assert ranked(fast) == ranked(slow)
        assert [fast.level_of(r) for r in computed] == [slow.level_of(r) for r in computed]
    assert fast.num_demotions == slow.num_demotions


@pytest.mark.parametrize("by_value", [True, False])
def test_a_skip_joined_prompt_rejoins_level_zero_once_prefilled(by_value: bool) -> None:
    # 1,000 prompt tokens (10 ms) skip-join level 2. With demote_by_value
    # the prefill was the reason; its decode starts as a fresh request's,
    # in its arrival place (ahead of the newer "b"). FastServe's rule keeps
    # it where it joined.
    policy = mlfq(demote_by_value=by_value)
    add(policy, "a", 1.0, num_prompt_tokens=1000)
    add(policy, "b", 2.0)
    assert policy.level_of("a") == 2
    policy.on_scheduled("a", 512, 0, 2.0)  # a chunk of the prompt
    policy.end_step(2.0)
    assert policy.level_of("a") == 2
    policy.on_scheduled("a", 488, 512, 2.0)  # the rest: first token sampled
    policy.end_step(2.0)
    if by_value:
        assert policy.level_of("a") == 0 and policy.num_rejoins == 1
        assert ranked(policy) == ["a", "b"]
    else:
        assert policy.level_of("a") > 0 and policy.num_rejoins == 0
    policy.check_invariants()
