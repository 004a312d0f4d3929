"""LoongServe's metrics: normalised latencies, SLO crossing, P90 goodput."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.sim.metrics import (
    SLO,
    SLOS,
    NormalisedLatency,
    goodput_attainment,
    max_rate_under_slo,
    normalised_latency,
    p90_goodput,
    rate_where_crossing,
    slo_for,
    tpot_s,
)


@dataclass(frozen=True)
class _Rec:
    arrival_s: float
    first_token_s: float
    finish_s: float
    num_prompt_tokens: int
    num_output_tokens: int


def test_normalised_latencies_by_hand():
    recs = [
        # jct 10 over 100 tokens; ttft 2 over 80; decode 8 s over 19 tokens.
        _Rec(0.0, 2.0, 10.0, 80, 20),
        # One output token: the output latency divides by max(0, 1) = 1.
        _Rec(1.0, 2.0, 2.0, 9, 1),
    ]
    lat = normalised_latency(recs)
    assert lat.num_requests == 2
    assert lat.per_token_s == pytest.approx((10 / 100 + 1 / 10) / 2)
    assert lat.input_s == pytest.approx((2 / 80 + 1 / 9) / 2)
    assert lat.output_s == pytest.approx((8 / 19 + 0.0) / 2)
    assert tpot_s(recs[0]) == pytest.approx(8 / 19) and tpot_s(recs[1]) == 0.0


def test_slo_ratio_is_the_worst_of_the_three_and_unfinished_is_infinite():
    slo = SLO.from_ms(100, 10, 1000)
    lat = NormalisedLatency(per_token_s=0.05, input_s=0.02, output_s=0.1, num_requests=3)
    assert lat.slo_ratio(slo) == pytest.approx(2.0)  # input: 20 ms vs 10 ms
    cut = NormalisedLatency(0.0, 0.0, 0.0, num_requests=3, num_unfinished=1)
    assert cut.slo_ratio(slo) == math.inf
    assert normalised_latency([]).slo_ratio(slo) == math.inf


def test_published_slos_and_zipf_uses_mixed():
    assert SLOS["sharegpt"] == SLO(0.092, 0.020, 0.320)
    assert SLOS["leval"].input_s == pytest.approx(0.0018)
    assert SLOS["lveval"].output_s == pytest.approx(0.365)
    for alpha in ("1.0", "1.2", "1.4"):
        assert slo_for(f"zipf{alpha}") == SLOS["mixed"]
    with pytest.raises(ValueError):
        slo_for("nope")


def test_crossing_interpolates_between_the_bracketing_rates():
    # 0.5 at rate 1, 1.5 at rate 2: y = 1 at rate 1.5.
    bound = max_rate_under_slo([(2.0, 1.5), (1.0, 0.5), (4.0, 3.0)])
    assert bound.rate_rps == pytest.approx(1.5) and not bound.lower_bound


def test_crossing_none_when_never_under_and_lower_bound_when_always_under():
    assert max_rate_under_slo([(1.0, 1.2), (2.0, 5.0)]).rate_rps is None
    bound = max_rate_under_slo([(1.0, 0.2), (3.0, 0.9)])
    assert bound.rate_rps == 3.0 and bound.lower_bound
    assert max_rate_under_slo([]).rate_rps is None


def test_crossing_starts_at_the_first_good_rate_and_stops_at_the_first_bad_one():
    # A noisy first point above the SLO is skipped; the later dip at rate 5
    # does not count: the curve crossed at 2.5 already.
    curve = [(0.5, 1.1), (1.0, 0.6), (2.0, 0.8), (3.0, 1.2), (5.0, 0.9)]
    assert max_rate_under_slo(curve).rate_rps == pytest.approx(2.5)


def test_crossing_into_infinity_stops_at_the_last_good_rate():
    bound = max_rate_under_slo([(1.0, 0.5), (2.0, math.inf)])
    assert bound.rate_rps == 1.0 and not bound.lower_bound


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.01, 100.0), st.floats(0.0, 5.0)),
        min_size=1,
        max_size=12,
        unique_by=lambda p: p[0],
    ),
    st.floats(0.1, 3.0),
)
def test_crossing_lies_between_swept_rates_and_after_a_good_one(points, limit):
    bound = rate_where_crossing(points, limit)
    rates = sorted(r for r, _ in points)
    good = [r for r, v in sorted(points) if v <= limit]
    if not good:
        assert bound.rate_rps is None
        return
    assert bound.rate_rps is not None
    assert good[0] <= bound.rate_rps <= rates[-1] + 1e-9
    if bound.lower_bound:
        assert bound.rate_rps == rates[-1]


def test_goodput_attainment_counts_both_criteria_and_unfinished():
    def prefill(n: int) -> float:
        return n * 0.01  # x 25: a limit of 0.25 s per prompt token, floored at 15 s

    recs = [
        _Rec(0.0, 10.0, 11.0, 10, 21),  # ttft 10 <= max(2.5, 15); TPOT 50 ms: ok
        _Rec(0.0, 16.0, 17.0, 10, 21),  # ttft 16 > 15: miss
        _Rec(0.0, 40.0, 41.0, 200, 21),  # ttft 40 <= 25 * 2.0: ok
        _Rec(0.0, 1.0, 3.0, 10, 21),  # TPOT 100 ms: miss
    ]
    assert goodput_attainment(recs, prefill) == pytest.approx(0.5)
    assert goodput_attainment(recs, prefill, num_unfinished=4) == pytest.approx(0.25)


def test_p90_goodput_interpolates_where_attainment_falls_below_target():
    curve = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.75), (8.0, 0.1)]
    # 0.95 at 2, 0.75 at 4: 0.9 at 2 + 2 * 0.05 / 0.2 = 2.5.
    assert p90_goodput(curve).rate_rps == pytest.approx(2.5)
    assert p90_goodput([(1.0, 0.5)]).rate_rps is None
    assert p90_goodput([(1.0, 0.99), (2.0, 0.92)]).lower_bound
