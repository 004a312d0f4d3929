"""The hostage bound without vLLM: a long prefill chunk never makes waiting
decodes wait longer than ``ESPConfig.max_decode_stall_ms``.

* ``ESPConfig.max_decode_stall_ms``: validation, auto (4 decode steps of
  the cost model), off.
* ``bounded_prefill_chunk`` against hand-computed cost-model numbers and a
  brute-force search.
* ``ThresholdElasticPolicy``: the chunk is cut and the DoP chosen against
  the bound only while decodes are resident; ``ESPStepPlan.check_invariants``
  asserts the bound on the plan, and catches a plan that breaks it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.esp.config import DECODE_STALL_STEPS, ESPConfig
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.placement import (
    InstanceLoad,
    RequestPlacementView,
    ThresholdElasticPolicy,
    bounded_prefill_chunk,
    decodes_waiting,
)
from vllm_esp.core.esp.step_plan import ESPStepPlan, RequestStep
from vllm_esp.core.settings import SettingsError

BLOCK_SIZE = 16


def loads(num_instances: int, decodes: int = 0) -> list[InstanceLoad]:
    """Equal free memory; ``decodes`` decoding requests mastered by instance 0."""
    return [InstanceLoad(i, 100, 100, decodes if i == 0 else 0) for i in range(num_instances)]


def view(prompt: int, computed: int, new: int, num_instances: int) -> RequestPlacementView:
    return RequestPlacementView("long", prompt, computed, new, (0,) * num_instances, None, 16)


def plan_of(
    steps: list[RequestStep], *, num_waiting_decodes: int, bound: float | None
) -> ESPStepPlan:
    return ESPStepPlan(
        step=0,
        num_instances=8,
        blocks_per_instance=10_000,
        block_size=BLOCK_SIZE,
        requests=tuple(steps),
        num_waiting_decodes=num_waiting_decodes,
        max_decode_stall_s=bound,
    )


def chunk(start: int, num_tokens: int, compute: tuple[int, ...], rid: str = "long") -> RequestStep:
    end = start + num_tokens
    return RequestStep(
        req_id=rid,
        start=start,
        token_ids=(1,) * num_tokens,
        block_ids=tuple(range(-(-end // BLOCK_SIZE))),
        compute=compute,
    )


# ------------------------------------------------------------------ setting
def test_the_setting_is_auto_by_default_and_resolves_from_the_cost_model() -> None:
    model = StepCostModel(alpha_s=8e-3, beta_s=1e-4, gamma_s=1e-8)
    cfg = ESPConfig()
    assert cfg.max_decode_stall_ms is None
    # Auto: 4 one-request decode steps at an empty context, 4 * 8.10001 ms.
    assert DECODE_STALL_STEPS == 4
    assert cfg.decode_stall_s(model.chunk_time) == pytest.approx(4 * (8e-3 + 1e-4 + 1e-8))
    assert ESPConfig(max_decode_stall_ms=12.5).decode_stall_s(model.chunk_time) == 0.0125
    assert ESPConfig(max_decode_stall_ms=0).decode_stall_s(model.chunk_time) is None
    assert ESPConfig.from_dict({"max_decode_stall_ms": 3}).to_dict()["max_decode_stall_ms"] == 3
    assert (
        ESPConfig.from_dict(ESPConfig(max_decode_stall_ms=2.5).to_dict()).max_decode_stall_ms == 2.5
    )


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), "5", True])
def test_a_bad_bound_is_refused_by_name(value: object) -> None:
    with pytest.raises(SettingsError, match="invalid ESP setting max_decode_stall_ms="):
        ESPConfig.from_dict({"max_decode_stall_ms": value})


def _esp_cost(model: StepCostModel) -> ESPCostModel:
    return ESPCostModel.from_step_cost(model, bytes_per_token=1024.0, bandwidth_bytes_per_s=1e9)


def test_the_policy_reads_the_bound_from_the_settings() -> None:
    model = StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=0.0)
    auto = ThresholdElasticPolicy.from_settings(
        ESPConfig(num_instances=2),
        num_instances=2,
        prefill_time=model.chunk_time,
        esp_cost=_esp_cost(model),
    )
    assert auto.max_decode_stall_s == pytest.approx(4 * 1.01e-3)
    fixed = ThresholdElasticPolicy.from_settings(
        ESPConfig(num_instances=2, max_decode_stall_ms=3.0),
        num_instances=2,
        prefill_time=model.chunk_time,
        esp_cost=_esp_cost(model),
    )
    assert fixed.max_decode_stall_s == 0.003
    off = ThresholdElasticPolicy.from_settings(
        ESPConfig(num_instances=2, max_decode_stall_ms=0),
        num_instances=2,
        prefill_time=model.chunk_time,
        esp_cost=_esp_cost(model),
    )
    assert off.max_decode_stall_s is None
    with pytest.raises(ValueError, match="max_decode_stall_s"):
        ThresholdElasticPolicy(
            2, prefill_time=model.chunk_time, prefill_target_s=1.0, max_decode_stall_s=0.0
        )


# ------------------------------------------------------------------ the capping function
def test_linear_cost_cut_to_the_bound_times_the_dop() -> None:
    # Binary-exact: 1/1024 s per step + 1/65536 s per token; bound 1/512 s.
    model = StepCostModel(alpha_s=2**-10, beta_s=2**-16, gamma_s=0.0)
    bound = 2**-9
    # One instance: 2^-10 + q 2^-16 <= 2^-9  <=>  q <= 64.
    assert bounded_prefill_chunk(model.chunk_time, 5000, 0, max_dop=1, max_stall_s=bound) == 64
    # Two: <= 2^-8  <=>  q <= 192; four: <= 2^-7  <=>  q <= 448.
    assert bounded_prefill_chunk(model.chunk_time, 5000, 0, max_dop=2, max_stall_s=bound) == 192
    assert bounded_prefill_chunk(model.chunk_time, 5000, 0, max_dop=4, max_stall_s=bound) == 448
    # A chunk that already fits is left alone, exactly at the bound too.
    assert bounded_prefill_chunk(model.chunk_time, 192, 0, max_dop=2, max_stall_s=bound) == 192
    assert bounded_prefill_chunk(model.chunk_time, 50, 0, max_dop=2, max_stall_s=bound) == 50


def test_attention_cost_grows_with_the_context() -> None:
    # Attention only, 2^-20 s per (query, key) pair: after 1023 cached tokens
    # 64 new ones cost 64 * (1023 + 65/2) = 67552 pairs, 65 cost 68640.
    model = StepCostModel(alpha_s=0.0, beta_s=2**-30, gamma_s=2**-20)
    pairs = 64 * (1023 + 65 / 2)
    bound = (pairs + 64 * 2**-10) * 2**-20  # 64 tokens fit exactly (beta included)
    assert bounded_prefill_chunk(model.chunk_time, 4000, 1023, max_dop=1, max_stall_s=bound) == 64
    # The same bound buys a longer chunk at the start of the prompt.
    assert bounded_prefill_chunk(model.chunk_time, 4000, 0, max_dop=1, max_stall_s=bound) > 64


def test_below_the_max_dop_each_token_is_one_more_instance() -> None:
    # time = 3 + q, bound 2, up to 8 instances: q fits iff 3 + q <= 2 min(q, 8).
    def fixed_cost(q: int, k: int) -> float:
        return 3.0 + q

    cut = [
        bounded_prefill_chunk(fixed_cost, n, 0, max_dop=8, max_stall_s=2.0) for n in range(1, 16)
    ]
    # n=1: untouched; 2: nothing fits (5 > 4), one token; 3..13 fit; above: 13.
    assert cut == [1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 13, 13]

    # time = q (q + 1) / 2: the share per token grows, so the fit lies below
    # the max DoP: q <= 3 on q instances, and 8 tokens (36 > 16) do not fit.
    def quadratic(q: int, k: int) -> float:
        return q * (q + 1) / 2

    assert bounded_prefill_chunk(quadratic, 100, 0, max_dop=8, max_stall_s=2.0) == 3


def test_nothing_fits_still_makes_progress() -> None:
    def slow(q: int, k: int) -> float:
        return 10.0 * q

    assert bounded_prefill_chunk(slow, 500, 0, max_dop=4, max_stall_s=1.0) == 1
    assert bounded_prefill_chunk(slow, 1, 0, max_dop=4, max_stall_s=1.0) == 1
    assert bounded_prefill_chunk(slow, 0, 0, max_dop=4, max_stall_s=1.0) == 0


costs = st.builds(
    StepCostModel,
    alpha_s=st.sampled_from([0.0, 1e-4, 2e-3, 8.6e-3, 0.05]),
    beta_s=st.sampled_from([1e-6, 1e-5, 1.05e-4, 1e-3]),
    gamma_s=st.sampled_from([0.0, 1e-9, 1e-7, 1e-5]),
)


@settings(max_examples=300, deadline=None)
@given(
    model=costs,
    num_new=st.integers(0, 300),
    num_computed=st.integers(0, 3000),
    max_dop=st.integers(1, 8),
    bound=st.floats(1e-4, 0.5),
)
def test_the_cut_is_the_largest_chunk_that_fits(
    model: StepCostModel, num_new: int, num_computed: int, max_dop: int, bound: float
) -> None:
    def fits(q: int) -> bool:
        return model.chunk_time(q, num_computed) <= min(q, max_dop) * bound

    got = bounded_prefill_chunk(
        model.chunk_time, num_new, num_computed, max_dop=max_dop, max_stall_s=bound
    )
    if num_new <= 1:
        assert got == num_new
    else:
        assert got == max((q for q in range(1, num_new + 1) if fits(q)), default=1)


# ------------------------------------------------------------------ policy and plan
def policy(num_instances: int, **kwargs: Any) -> ThresholdElasticPolicy:
    # 1024 tokens per second; the target 1/16 s is 64 tokens, the bound 1/64 s 16.
    kwargs.setdefault("prefill_time", lambda q, k: q / 1024)
    kwargs.setdefault("prefill_target_s", 1 / 16)
    kwargs.setdefault("max_decode_stall_s", 1 / 64)
    return ThresholdElasticPolicy(num_instances, **kwargs)


def test_the_policy_cuts_only_while_decodes_wait() -> None:
    p = policy(4)
    long = view(prompt=1000, computed=0, new=1000, num_instances=4)
    assert not decodes_waiting(loads(4)) and decodes_waiting(loads(4, decodes=1))
    # Alone: all 1000 tokens, on 4 instances (16 targets' worth, capped at 4).
    assert p.max_prefill_tokens(long, loads(4)) == 1000
    assert p.place(long, loads(4)).compute == (0, 1, 2, 3)
    # Decodes waiting: 4 instances x 16 tokens; each instance's share is the bound.
    cut = p.max_prefill_tokens(long, loads(4, decodes=3))
    assert cut == 64
    placed = p.place(view(1000, 0, cut, 4), loads(4, decodes=3))
    assert placed.compute == (0, 1, 2, 3)
    # 30 tokens fit and stay whole, on the fewest instances within the bound
    # (2), not within the target (1): the target gives way to the bound.
    assert p.max_prefill_tokens(view(1000, 0, 30, 4), loads(4, decodes=1)) == 30
    assert len(p.place(view(1000, 0, 30, 4), loads(4, decodes=1)).compute) == 2
    assert len(p.place(view(1000, 0, 30, 4), loads(4)).compute) == 1
    # A resumed request recomputing output tokens runs on one instance: 16.
    resumed = RequestPlacementView("r", 100, 100, 200, (7, 0, 0, 0), 0, 16)
    assert p.max_prefill_tokens(resumed, loads(4, decodes=1)) == 16
    # A capped DoP is a smaller budget: 2 instances x 16.
    assert policy(4, max_prefill_instances=2).max_prefill_tokens(long, loads(4, decodes=1)) == 32
    # No bound: nothing is cut.
    unbounded = policy(4, max_decode_stall_s=None)
    assert unbounded.max_prefill_tokens(long, loads(4, decodes=5)) == 1000


def test_check_invariants_asserts_the_bound_on_the_plan() -> None:
    def per_token(q: int, k: int) -> float:
        return q / 1024

    bound = 1 / 64  # 16 tokens per instance
    decode = chunk(500, 1, (1,), rid="short")
    fits = [chunk(0, 64, (0, 1, 2, 3)), decode]
    plan_of(fits, num_waiting_decodes=1, bound=bound).check_invariants(per_token)
    hostage = [chunk(0, 65, (0, 1, 2, 3)), decode]
    with pytest.raises(AssertionError, match="long's chunk of 65 tokens on 4 instance"):
        plan_of(hostage, num_waiting_decodes=1, bound=bound).check_invariants(per_token)
    # No decode waits, or no bound: any chunk is fine.
    plan_of(hostage, num_waiting_decodes=0, bound=bound).check_invariants(per_token)
    plan_of(hostage, num_waiting_decodes=1, bound=None).check_invariants(per_token)
    # A one-token step always runs, whatever it costs.
    plan_of([chunk(0, 1, (0,))], num_waiting_decodes=1, bound=1e-9).check_invariants(per_token)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    model=costs,
    num_instances=st.integers(1, 8),
    target=st.floats(1e-4, 1.0),
    bound=st.floats(1e-4, 0.5),
    num_decodes=st.integers(0, 3),
)
def test_no_planned_chunk_holds_waiting_decodes_hostage(
    data: st.DataObject,
    model: StepCostModel,
    num_instances: int,
    target: float,
    bound: float,
    num_decodes: int,
) -> None:
    """Random requests on random instances: the planned chunk's estimated
    time at its DoP is within the bound whenever decodes wait; without
    decodes the chunk is what was asked for."""
    max_dop = data.draw(st.one_of(st.none(), st.integers(1, num_instances)))
    p = ThresholdElasticPolicy(
        num_instances,
        prefill_time=model.chunk_time,
        prefill_target_s=target,
        max_prefill_instances=max_dop,
        max_decode_stall_s=bound,
    )
    free = data.draw(st.lists(st.integers(0, 50), min_size=num_instances, max_size=num_instances))
    where = data.draw(
        st.lists(st.integers(0, num_decodes), min_size=num_instances, max_size=num_instances)
    )
    current = [InstanceLoad(i, free[i], 50, where[i]) for i in range(num_instances)]
    steps = []
    for r in range(data.draw(st.integers(1, 4))):
        prompt = data.draw(st.integers(2, 5000))
        computed = data.draw(st.integers(0, prompt + 100))
        new = data.draw(st.integers(1, max(1, prompt + 100 - computed)))
        request = RequestPlacementView(
            f"r{r}", prompt, computed, new, (0,) * num_instances, None, 16
        )
        cut = p.max_prefill_tokens(request, current)
        assert 1 <= cut <= new
        if not decodes_waiting(current):
            assert cut == new
        placed = p.place(
            RequestPlacementView(f"r{r}", prompt, computed, cut, (0,) * num_instances, None, 16),
            current,
        )
        # What the scheduler plans: the placement's instances for a chunk
        # that starts in the prompt, one instance otherwise.
        compute = placed.compute if computed < prompt else placed.compute[:1]
        steps.append(chunk(computed, cut, compute, rid=f"r{r}"))
        if decodes_waiting(current) and cut > 1:
            share = model.chunk_time(cut, computed) / len(compute)
            assert share <= bound * (1 + 1e-9)
            # The largest such chunk: one token more would not fit at any DoP.
            if cut < new:
                dop_cap = p.max_prefill_instances if computed < prompt else 1
                assert model.chunk_time(cut + 1, computed) > min(cut + 1, dop_cap) * bound
    plan = ESPStepPlan(
        step=0,
        num_instances=num_instances,
        blocks_per_instance=10_000,
        block_size=BLOCK_SIZE,
        requests=tuple(steps),
        num_waiting_decodes=sum(where),
        max_decode_stall_s=bound,
    )
    plan.check_invariants(model.chunk_time)
