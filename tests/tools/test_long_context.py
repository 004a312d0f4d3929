"""Length-only LoongServe workloads: ranges, determinism, Zipf skew, arrivals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.data.long_context import (
    LEVAL_RANGE,
    LVEVAL_RANGE,
    SHAREGPT_RANGE,
    WORKLOADS,
    ZIPF_RANGE,
    make_length_trace,
    make_lengths,
    sharegpt_length_pool,
    zipf_lengths,
)

# A small ShareGPT-like pool (prompt, output lengths) so the tests do not
# tokenize the 125 MB dump.
_RNG = np.random.default_rng(0)
_POOL = (
    _RNG.integers(SHAREGPT_RANGE[0], SHAREGPT_RANGE[1] + 1, size=500),
    _RNG.integers(4, 1000, size=500),
    "test pool",
)


def _sample(workload: str, n: int = 3000, seed: int = 0):
    return make_lengths(workload, n, seed, sharegpt_pool=_POOL)


@pytest.mark.parametrize(
    ("workload", "prompt_range", "output_range"),
    [
        ("sharegpt", SHAREGPT_RANGE, (4, 999)),
        ("leval", LEVAL_RANGE, (16, 400)),
        ("lveval", LVEVAL_RANGE, (8, 128)),
        ("mixed", (SHAREGPT_RANGE[0], LVEVAL_RANGE[1]), (4, 999)),
        ("zipf1.0", (SHAREGPT_RANGE[0], ZIPF_RANGE[1]), (4, 999)),
        ("zipf1.4", (SHAREGPT_RANGE[0], ZIPF_RANGE[1]), (4, 999)),
    ],
)
def test_lengths_stay_in_the_published_ranges(workload, prompt_range, output_range):
    s = _sample(workload)
    p = np.array(s.num_prompt_tokens)
    o = np.array(s.num_output_tokens)
    assert len(s) == 3000
    assert prompt_range[0] <= p.min() and p.max() <= prompt_range[1]
    assert output_range[0] <= o.min() and o.max() <= output_range[1]


def test_long_context_prompts_span_their_range():
    # Not a narrow band inside the range: both ends are reached in 3,000 draws.
    le = np.array(_sample("leval").num_prompt_tokens)
    lv = np.array(_sample("lveval").num_prompt_tokens)
    assert le.min() < 3_500 and le.max() > 100_000
    assert lv.min() < 17_000 and lv.max() > 450_000
    assert np.median(lv) > np.median(le)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_seeded_determinism_and_labels(workload):
    a, b, c = _sample(workload, 200, 3), _sample(workload, 200, 3), _sample(workload, 200, 4)
    assert a == b
    assert a.num_prompt_tokens != c.num_prompt_tokens
    expected = (
        "SYNTHETIC" if workload != "sharegpt" else "ShareGPT lengths (real), Poisson arrivals"
    )
    assert a.meta["label"] == expected and a.meta["recipe"]


def test_zipf_skew_alpha_one_is_heaviest():
    means = [np.mean(_sample(f"zipf{a}", 4000).num_prompt_tokens) for a in ("1.0", "1.2", "1.4")]
    assert means[0] > means[1] > means[2]


@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.4])
def test_zipf_targets_follow_the_power_law(alpha):
    x = zipf_lengths(alpha, 40_000, np.random.default_rng(1))
    lo, hi = ZIPF_RANGE
    assert x.min() >= lo and x.max() <= hi

    def cdf(v: float) -> float:
        if alpha == 1.0:
            return math.log(v / lo) / math.log(hi / lo)
        a = 1 - alpha
        return (v**a - lo**a) / (hi**a - lo**a)

    for v in (100, 1_000, 10_000):
        assert np.mean(x <= v) == pytest.approx(cdf(v), abs=0.01)


def test_mixed_is_an_equal_mix():
    cls = _sample("mixed", 6000).cls
    for name in ("sharegpt", "leval", "lveval"):
        assert cls.count(name) / len(cls) == pytest.approx(1 / 3, abs=0.03)


def test_zipf_takes_the_nearest_pool_request():
    s = _sample("zipf1.2", 2000)
    pool = set(map(int, _POOL[0]))
    for p, c in zip(s.num_prompt_tokens, s.cls):
        if c == "sharegpt":
            assert p in pool


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(WORKLOADS), st.floats(0.05, 50.0), st.floats(1.5, 4.0))
def test_rates_share_lengths_and_scale_arrivals(workload, rate, factor):
    s = _sample(workload, 100, 9)
    slow, fast = s.at_rate(rate), s.at_rate(rate * factor)
    assert [r.num_prompt_tokens for r in slow.requests] == list(s.num_prompt_tokens)
    assert [r.num_output_tokens for r in fast.requests] == list(s.num_output_tokens)
    t_slow = np.array([r.arrival_s for r in slow.requests])
    t_fast = np.array([r.arrival_s for r in fast.requests])
    assert np.all(np.diff(t_slow) >= 0)
    np.testing.assert_allclose(t_fast * factor, t_slow, rtol=1e-9)


def test_poisson_arrivals_have_the_asked_rate():
    trace = make_length_trace("leval", 5000, 4.0, 0)
    gaps = np.diff([0.0] + [r.arrival_s for r in trace.requests])
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert trace.meta["label"] == "SYNTHETIC" and trace.meta["rate_rps"] == 4.0
    assert len({r.req_id for r in trace.requests}) == 5000


def test_sharegpt_pool_filters_like_loongserve():
    words = " ".join(["w"] * 10)  # 13 tokens by the word proxy
    pairs = [
        ("hi", words),  # prompt of 1 token (proxy): dropped
        (words, words),  # kept
        (words, " ".join(["w"] * 1000)),  # 1,300-token reply: dropped
        (" ".join(["w"] * 2000), words),  # 2,600-token prompt: dropped
    ]
    prompts, outputs, unit = sharegpt_length_pool(pairs=pairs)
    assert prompts.tolist() == [13] and outputs.tolist() == [13] and unit == "words proxy"


def test_a_shorter_trace_is_a_prefix_of_a_longer_one():
    s = _sample("mixed", 200, 5)
    full, head = s.at_rate(3.0), s.at_rate(3.0, num_requests=50)
    assert head.requests == full.requests[:50] and head.meta["num_requests"] == 50
    with pytest.raises(ValueError):
        s.at_rate(3.0, num_requests=201)
