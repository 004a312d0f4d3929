"""The Gittins-index policy on plain numbers: the index against its
definition, its FCFS and LAS limits, online learning, starvation bound."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq import make_policy
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.mlfq.gittins import (
    MIN_LENGTHS_TO_LEARN,
    GittinsPolicy,
    LengthDistribution,
    gittins_index,
    gittins_table,
    length_grid,
    refit_due,
    segment_sums,
)
from vllm_esp.core.mlfq.policy import RequestInfo
from vllm_esp.core.mlfq.value import OutputLengthModel

#: 1 ms per step plus 0.01 ms per token: one decode step = 1.01 ms.
COST = StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=0.0, source="calibrated")


def brute_force_index(pmf: dict[int, float], a: int) -> float:
    """``max_b (F(a) - F(b)) / sum_{t=a}^{b-1} F(t)`` straight from the definition."""
    max_len = max(pmf)

    def survival(t: int) -> float:
        return sum(p for s, p in pmf.items() if s > t)

    best = 0.0
    for b in range(a + 1, max_len + 1):
        spent = sum(survival(t) for t in range(a, b))
        best = max(best, (survival(a) - survival(b)) / spent)
    return best


def exact_survival(pmf: dict[int, float]) -> tuple[tuple[int, ...], list[float]]:
    grid = tuple(range(max(pmf) + 1))
    return grid, [sum(p for s, p in pmf.items() if s > t) for t in grid]


pmfs = st.dictionaries(st.integers(1, 12), st.floats(0.01, 1.0), min_size=1, max_size=6).map(
    lambda d: {k: v / sum(d.values()) for k, v in d.items()}
)


@settings(max_examples=60, deadline=None)
@given(pmfs)
def test_index_table_equals_the_definition(pmf):
    grid, survival = exact_survival(pmf)
    table = gittins_table(survival, segment_sums(grid, survival))
    for a in range(max(pmf)):
        assert table[a] == pytest.approx(brute_force_index(pmf, a), rel=1e-9, abs=1e-12)


def test_known_prefill_lowers_the_index_like_extra_expected_service():
    pmf = {2: 0.5, 10: 0.5}
    grid, survival = exact_survival(pmf)
    sums = segment_sums(grid, survival)
    # A prefill worth 3 decode steps adds F(0) * 3 to every budget's cost.
    expected = max(
        (survival[0] - survival[b]) / (3.0 + sum(survival[t] for t in range(b)))
        for b in range(1, 11)
    )
    assert gittins_index(0, survival, sums, prefill=3.0) == pytest.approx(expected)
    assert gittins_index(0, survival, sums, prefill=3.0) < gittins_index(0, survival, sums)


def test_increasing_hazard_runs_the_most_served_first_like_fcfs():
    # Uniform on 1..20: the hazard 1/(21-t) increases, so the index rises
    # with attained service: finish what you started.
    pmf = {s: 1 / 20 for s in range(1, 21)}
    grid, survival = exact_survival(pmf)
    table = gittins_table(survival, segment_sums(grid, survival))
    assert all(x < y for x, y in itertools.pairwise(table[:20]))


def test_decreasing_hazard_runs_the_least_served_first_like_las():
    # A mixture of a short and a long geometric: the hazard falls with age,
    # so the index falls too (least attained first) until the cap nears.
    weights = {s: 0.5 * 0.5**s + 0.5 * 0.05 * 0.95**s for s in range(1, 61)}
    pmf = {s: w / sum(weights.values()) for s, w in weights.items()}
    grid, survival = exact_survival(pmf)
    table = gittins_table(survival, segment_sums(grid, survival))
    assert all(x > y for x, y in itertools.pairwise(table[:7]))


def test_bimodal_lengths_put_young_requests_first_then_run_long_ones_to_completion():
    # 90% of requests need 8 tokens, 10% need 400 (the mixed trace's shape).
    pmf = {8: 0.9, 400: 0.1}
    grid = length_grid(400)
    dist = LengthDistribution(grid, prior_weight=0.0)
    for length, p in pmf.items():
        for _ in range(round(p * 100)):
            dist.observe(length)
    survival = dist.survival()
    table = gittins_table(survival, segment_sums(grid, survival))

    def at(tokens: int) -> float:  # the index a request with that many tokens gets
        return table[max(i for i, g in enumerate(grid) if g <= tokens)]

    assert at(0) > at(20)  # a fresh request beats one known to be long
    assert at(20) < at(200) < at(390)  # long ones: the most served goes first


def test_grid_is_exact_then_geometric():
    grid = length_grid(1000, exact_len=8, ratio=1.5)
    assert grid[:9] == tuple(range(9)) and grid[-1] == 1000
    assert all(b > a for a, b in itertools.pairwise(grid))
    assert len(grid) < 25


def test_survival_without_survivors_is_the_blend_of_samples_and_prior():
    grid = length_grid(300)
    dist = LengthDistribution(grid, prior_weight=4.0)
    lengths = [3, 3, 7, 20, 20, 150, 300]
    for length in lengths:
        dist.observe(length)
    prior = LengthDistribution(grid, prior_weight=1.0).survival()  # no data: the prior
    for g, f, p in zip(grid, dist.survival(), prior, strict=True):
        longer = sum(1 for x in lengths if x > g)
        assert f == pytest.approx((longer + 4.0 * p) / (len(lengths) + 4.0))


def test_survivors_are_right_censored_as_in_kaplan_meier():
    # Finished: 2, 4, 4. In flight: one known longer than 3, one than 6.
    dist = LengthDistribution(length_grid(64), prior_weight=0.0)
    for length in (2, 4, 4):
        dist.observe(length)
    dist.add_survivor(dist.grid_index(3))
    dist.add_survivor(dist.grid_index(6))
    f = dict(zip(dist.grid, dist.survival(), strict=True))
    # At 2 all five are at risk; at 4 the one censored at 3 is not.
    assert f[1] == 1.0 and f[2] == pytest.approx(4 / 5) and f[3] == pytest.approx(4 / 5)
    assert f[4] == pytest.approx(4 / 5 * (1 - 2 / 3))
    assert f[6] == pytest.approx(f[4])  # no death seen up to the last survivor
    dist.remove_survivor(dist.grid_index(6))
    dist.remove_survivor(dist.grid_index(3))
    assert dist.survival()[dist.grid_index(4)] == pytest.approx(0.0)


def request(rid: str, t: float, prompt: int = 16, max_tokens: int | None = None) -> RequestInfo:
    return RequestInfo(rid, arrival_time=t, num_prompt_tokens=prompt, max_tokens=max_tokens)


def learned_policy(lengths: list[int], **kwargs) -> GittinsPolicy:
    """Learns from any number of lengths (the estimator's behaviour on
    little data; the policies' minimum has its own test)."""
    kwargs.setdefault("min_lengths_to_learn", 0)
    policy = GittinsPolicy(
        cost_model=COST,
        max_len=512,
        prior_weight=1.0,
        min_bucket_samples=1_000,
        refit_every=1,
        **kwargs,
    )
    for length in lengths:
        policy.observe_length(16, length)
    policy.end_step(0.0)  # refit
    return policy


def serve(policy: GittinsPolicy, rid: str, num_tokens: int, now: float) -> None:
    """``num_tokens`` steps for ``rid``: the prompt (16 tokens) then decodes."""
    computed = 0
    for _ in range(num_tokens):
        n = 16 if computed == 0 else 1
        policy.on_scheduled(rid, n, computed, now)
        computed += n
        policy.end_step(now)


def test_survivors_are_counted_while_requests_run():
    policy = learned_policy([10, 20, 30])
    for i in range(4):
        policy.add_request(request(f"r{i}", 0.0), 0.0)
        serve(policy, f"r{i}", 16 + 40, 0.0)  # 40 output tokens: longer than 39
    assert policy.num_survivors == 4
    policy.remove_request("r0", 45)  # finished: a length now
    policy.remove_request("r1")  # aborted: nothing learned
    assert policy.num_survivors == 2 and policy.num_observed_lengths == 4
    policy.check_invariants()


def test_a_request_past_every_length_seen_keeps_its_place_before_a_fresh_one():
    # Early on only short requests have finished. A request that has run
    # past all of them is in the prior's territory, where nothing shows it
    # to be a worse bet than a newcomer: it is not paused for one.
    policy = learned_policy([])
    policy.add_request(request("old", 0.0), 0.0)
    serve(policy, "old", 16 + 200, 0.0)
    for length in range(10, 50, 5):
        policy.observe_length(16, length)
    policy.end_step(0.0)  # refit
    policy.add_request(request("fresh", 1.0), 1.0)
    assert list(policy.iter_ranked()) == ["old", "fresh"]
    assert policy.index_of("old") >= policy.index_of("fresh")


def test_past_the_horizon_no_index_is_below_a_fresh_requests():
    grid = length_grid(512)
    dist = LengthDistribution(grid, prior_weight=8.0)
    for length in [8] * 30 + [40] * 10:
        dist.observe(length)
    survival = dist.survival()
    sums = segment_sums(grid, survival)
    plain, capped = gittins_table(survival, sums), gittins_table(survival, sums, dist.horizon())
    horizon = dist.horizon()
    assert grid[horizon] == 44  # the grid point at or above the longest length
    assert min(plain[horizon:]) < plain[0]  # the memoryless prior's tail
    assert all(c >= capped[0] for c in capped[horizon:])
    assert capped[:horizon] == plain[:horizon]  # the data's own region is untouched
    assert LengthDistribution(grid, prior_weight=8.0).horizon() is None


def test_learned_bimodal_distribution_serves_a_young_request_before_an_old_long_one():
    policy = learned_policy([8] * 90 + [400] * 10)
    policy.add_request(request("long", 0.0), 0.0)
    serve(policy, "long", 30, 0.0)  # 30 tokens in: past the short mode
    policy.add_request(request("short", 1.0), 1.0)
    assert list(policy.iter_ranked()) == ["short", "long"]
    policy.check_invariants()


def test_learned_uniform_distribution_keeps_the_started_request_first():
    policy = learned_policy(list(range(1, 201)))
    policy.add_request(request("old", 0.0), 0.0)
    serve(policy, "old", 100, 0.0)
    policy.add_request(request("new", 1.0), 1.0)
    assert list(policy.iter_ranked()) == ["old", "new"]


def test_max_tokens_is_never_read():
    # The same requests with true lengths given as max_tokens or not: the
    # order must not change (only the SRPT oracle may look at max_tokens).
    orders = []
    for caps in ((None, None, None), (5, 500, 50)):
        policy = learned_policy([8] * 50 + [300] * 50)
        for i, cap in enumerate(caps):
            policy.add_request(
                request(f"r{i}", float(i), prompt=16 * (i + 1), max_tokens=cap), float(i)
            )
        serve(policy, "r1", 12, 3.0)
        orders.append(list(policy.iter_ranked()))
    assert orders[0] == orders[1]


def test_finished_lengths_are_learned_and_aborts_are_not():
    policy = GittinsPolicy(cost_model=COST, refit_every=1)
    for i in range(3):
        policy.add_request(request(f"r{i}", 0.0), 0.0)
    policy.remove_request("r0", num_output_tokens=40)
    policy.remove_request("r1")  # aborted: no length
    assert policy.num_observed_lengths == 1
    policy.remove_request("missing", num_output_tokens=3)  # unknown ids are ignored
    assert policy.num_observed_lengths == 1 and len(policy) == 1


def test_a_long_prompt_waits_behind_short_ones_of_the_same_distribution():
    policy = learned_policy([20] * 100)
    policy.add_request(request("long-prompt", 0.0, prompt=4000), 0.0)
    policy.add_request(request("short-prompt", 1.0, prompt=10), 1.0)
    assert list(policy.iter_ranked()) == ["short-prompt", "long-prompt"]


def test_starved_requests_are_promoted_until_they_finish_oldest_first():
    policy = learned_policy([8] * 90 + [400] * 10, starvation_threshold_s=1.0)
    for rid, t in (("long-a", 0.0), ("long-b", 0.1)):
        policy.add_request(request(rid, t), t)
        serve(policy, rid, 30, t)  # past the short mode: below newcomers
    for i in range(3):
        policy.add_request(request(f"s{i}", 0.5), 0.5)
    assert list(policy.iter_ranked())[-2:] == ["long-a", "long-b"]
    serve(policy, "long-b", 1, 1.15)  # served: its clock restarts
    policy.end_step(1.2)  # "long-a" idle since 0.0: promoted above every index
    assert next(policy.iter_ranked()) == "long-a" and policy.is_starved("long-a")
    policy.end_step(2.2)  # every request starved by now: arrival order
    assert list(policy.iter_ranked()) == ["long-a", "long-b", "s0", "s1", "s2"]
    assert policy.num_promotions == 5
    computed = 16 + 30
    for _ in range(50):  # served on: promoted still, no longer starved
        policy.on_scheduled("long-a", 1, computed, 2.3)
        computed += 1
        policy.end_step(2.3)
    assert list(policy.iter_ranked())[:2] == ["long-a", "long-b"]
    assert not policy.is_starved("long-a")
    policy.remove_request("long-a", 400)
    assert next(policy.iter_ranked()) == "long-b"
    policy.check_invariants()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "run", "finish", "abort", "step"]),
            st.integers(0, 7),
            st.integers(1, 40),
        ),
        max_size=80,
    )
)
def test_invariants_hold_under_random_workloads(ops):
    policy = GittinsPolicy(
        cost_model=COST,
        max_len=256,
        refit_every=3,
        starvation_threshold_s=0.05,
    )
    computed: dict[str, int] = {}
    now = 0.0
    for op, k, n in ops:
        rid = f"r{k}"
        now += 0.01
        if op == "add" and rid not in policy:
            policy.add_request(request(rid, now, prompt=n * 8), now)
            computed[rid] = 0
        elif op == "run" and rid in policy:
            policy.on_scheduled(rid, n, computed[rid], now)
            computed[rid] += n
        elif op in ("finish", "abort") and rid in policy:
            policy.remove_request(rid, num_output_tokens=n if op == "finish" else None)
        else:
            policy.end_step(now)
        policy.check_invariants()
    assert sorted(policy.iter_ranked()) == sorted(r for r in computed if r in policy)
    assert all(math.isfinite(policy.index_of(r)) for r in policy.iter_ranked())


def test_built_by_name_from_the_scheduler_settings():
    policy = make_policy(MLFQConfig(policy="gittins", starvation_threshold_s=3.0), COST)
    assert isinstance(policy, GittinsPolicy) and policy.starvation_threshold_s == 3.0


# ---------------------------------------------------------------- predicted lengths
def predicted(rid: str, t: float, tokens: int | None, prompt: int = 16) -> RequestInfo:
    return RequestInfo(
        rid, arrival_time=t, num_prompt_tokens=prompt, predicted_output_tokens=tokens
    )


def teach(policy: GittinsPolicy, infos_and_lengths: list[tuple[RequestInfo, int]]) -> None:
    """Requests that arrive and finish with the given lengths, then a refit."""
    for info, length in infos_and_lengths:
        policy.add_request(info, 0.0)
        policy.remove_request(info.request_id, num_output_tokens=length)
    policy.end_step(0.0)


def bucket_policy() -> GittinsPolicy:
    return GittinsPolicy(
        cost_model=COST, max_len=512, prior_weight=1.0, min_bucket_samples=10, refit_every=1
    )


def test_predictions_pick_the_learned_distribution():
    # Predicted-short requests really were short, predicted-long ones long;
    # all had the same prompt length, so prompt buckets cannot tell them apart.
    policy = bucket_policy()
    teach(policy, [(predicted(f"s{i}", 0.0, 20), 8) for i in range(50)])
    teach(policy, [(predicted(f"l{i}", 0.0, 900), 400) for i in range(50)])
    policy.add_request(predicted("long", 0.0, 900), 0.0)
    policy.add_request(predicted("short", 1.0, 20), 1.0)
    assert list(policy.iter_ranked()) == ["short", "long"]
    assert policy.bucket_of("short") != policy.bucket_of("long")
    # Without predictions the same two rank by arrival (one prompt bucket).
    policy.add_request(predicted("a", 2.0, None), 2.0)
    policy.add_request(predicted("b", 3.0, None), 3.0)
    assert policy.bucket_of("a") == policy.bucket_of("b")
    ranked = list(policy.iter_ranked())
    assert ranked.index("a") < ranked.index("b")
    policy.check_invariants()


def test_without_a_prediction_requests_use_their_prompt_bucket():
    # Learned by prompt length: short prompts got long replies and long
    # prompts short ones. Predicted requests taught nothing to those buckets.
    policy = bucket_policy()
    teach(policy, [(predicted(f"p{i}", 0.0, None, prompt=100), 400) for i in range(50)])
    teach(policy, [(predicted(f"q{i}", 0.0, None, prompt=300), 8) for i in range(50)])
    teach(policy, [(predicted(f"x{i}", 0.0, 20, prompt=300), 400) for i in range(50)])
    policy.add_request(predicted("short-prompt", 0.0, None, prompt=100), 0.0)
    policy.add_request(predicted("long-prompt", 1.0, None, prompt=300), 1.0)
    assert list(policy.iter_ranked()) == ["long-prompt", "short-prompt"]
    assert policy.num_observed_lengths == 150


def test_an_unlearned_prediction_bucket_borrows_the_pooled_distribution():
    policy = bucket_policy()
    teach(policy, [(predicted(f"s{i}", 0.0, None), 8) for i in range(50)])
    teach(policy, [(predicted(f"l{i}", 0.0, 20), 400) for i in range(50)])
    for rid, tokens in (("unseen", 300), ("unseen-too", 1000), ("plain", None), ("long", 20)):
        policy.add_request(predicted(rid, 0.0, tokens), 0.0)
    # Buckets without samples share the pooled mix of 8s and 400s: below the
    # bucket that only saw 8s, above the one that only saw 400s.
    assert policy.index_of("unseen") == policy.index_of("unseen-too")
    assert policy.index_of("plain") > policy.index_of("unseen") > policy.index_of("long")


def test_refits_come_every_refit_every_then_every_sixteenth_of_the_data() -> None:
    assert refit_due(16, 16, refit_every=16) and not refit_due(15, 15, refit_every=16)
    # With 1,600 lengths a refit waits for 100 new ones, not 16.
    assert not refit_due(99, 1600, refit_every=16) and refit_due(100, 1600, refit_every=16)
    lengths = OutputLengthModel(refit_every=4)
    fits = []
    for n in range(1, 201):
        lengths.observe(n)
        lengths.maybe_refit()
        fits.append(lengths.num_fits)
    assert fits[3] == 2 and fits[2] == 1  # the constructor's fit, then at 4 lengths
    assert 1 + 200 // 16 < fits[-1] < 1 + 200 // 4  # sparser as the data grows


@pytest.mark.parametrize("num_lengths", [MIN_LENGTHS_TO_LEARN - 1, MIN_LENGTHS_TO_LEARN])
def test_gittins_learns_from_the_minimum_number_of_lengths_on(num_lengths: int) -> None:
    # Nine short requests to one long: past the short mode a request is
    # probably long. Below the minimum the prior's arrival order stays; from
    # it on the data ranks (MLFQ's demotion: test_mlfq_policies.py).
    lengths = [8 if i % 10 else 400 for i in range(num_lengths)]
    learned = num_lengths >= MIN_LENGTHS_TO_LEARN
    gittins = GittinsPolicy(cost_model=COST, max_len=512, refit_every=1)
    for length in lengths:
        gittins.observe_length(16, length)
    gittins.end_step(0.0)
    gittins.add_request(request("old", 0.0), 0.0)
    serve(gittins, "old", 1 + 20, 0.0)  # 20 output tokens: past the short mode
    gittins.add_request(request("fresh", 1.0), 1.0)
    assert list(gittins.iter_ranked()) == (["fresh", "old"] if learned else ["old", "fresh"])
