"""LoongServe's serving metrics: normalised latencies, SLOs, max rate, goodput.

Per request (``in``: prompt tokens, ``out``: output tokens, times in s)::

    per-token latency  jct / (in + out)           jct  = finish - arrival
    input latency      ttft / in                  ttft = first_token - arrival
    output latency     (finish - first_token) / max(out - 1, 1)   (= TPOT)

A rate's normalised latencies are the means over its requests (LoongServe
Fig. 10). Its SLO ratio is the largest of the three divided by the dataset's
SLO (``ae-plot-fig-10-11-12.py: draw_fig_10``), and the headline number is
the request rate where that ratio crosses 1, interpolated linearly between
the sweep's rates (:func:`max_rate_under_slo`).

P90 goodput (Fig. 12) is the rate where the fraction of requests with
``ttft <= max(25 * T_prefill(in), 15 s)`` and ``TPOT <= 50 ms`` crosses 0.9
(:func:`p90_goodput`); ``T_prefill`` is a single-request prefill predictor
(LoongServe: its model at SP4/TP2) the caller supplies.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "SLO",
    "SLOS",
    "CurvePoint",
    "NormalisedLatency",
    "RateBound",
    "RecordLike",
    "goodput_attainment",
    "max_rate_under_slo",
    "normalised_latency",
    "p90_goodput",
    "rate_where_crossing",
    "slo_for",
    "tpot_s",
]


class RecordLike(Protocol):
    """What the metrics read of a finished request (``RequestRecord`` fits)."""

    @property
    def arrival_s(self) -> float: ...
    @property
    def first_token_s(self) -> float: ...
    @property
    def finish_s(self) -> float: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...


@dataclass(frozen=True)
class SLO:
    """Per-token SLOs in seconds per token: [per-token, input, output]."""

    per_token_s: float
    input_s: float
    output_s: float

    @classmethod
    def from_ms(cls, per_token_ms: float, input_ms: float, output_ms: float) -> SLO:
        return cls(per_token_ms / 1e3, input_ms / 1e3, output_ms / 1e3)


#: LoongServe's per-dataset SLOs (ms/token, ``draw_fig_10``). The paper gives
#: none for its Zipf ablation (judged by P90 goodput); Zipf traces mix the
#: three datasets, so they use Mixed's.
SLOS: Mapping[str, SLO] = {
    "sharegpt": SLO.from_ms(92, 20, 320),
    "leval": SLO.from_ms(3.5, 1.8, 320),
    "lveval": SLO.from_ms(2.5, 2.5, 365),
    "mixed": SLO.from_ms(70, 90, 360),
    "mixed-multinode": SLO.from_ms(65, 64, 200),
}


def slo_for(workload: str) -> SLO:
    """The SLO of a workload name; ``zipf*`` gets Mixed's (see :data:`SLOS`)."""
    if workload.startswith("zipf"):
        return SLOS["mixed"]
    try:
        return SLOS[workload]
    except KeyError:
        raise ValueError(f"no SLO for workload {workload!r}; known: {sorted(SLOS)}") from None


def tpot_s(record: RecordLike) -> float:
    """Mean time per output token after the first (0 for a one-token reply)."""
    if record.num_output_tokens <= 1:
        return 0.0
    return (record.finish_s - record.first_token_s) / (record.num_output_tokens - 1)


@dataclass(frozen=True)
class NormalisedLatency:
    """Means over a rate's finished requests, seconds per token."""

    per_token_s: float
    input_s: float
    output_s: float
    num_requests: int
    #: Requests of the trace that did not finish (cut off, or refused).
    num_unfinished: int = 0

    def slo_ratio(self, slo: SLO) -> float:
        """Largest latency / SLO of the three; ``inf`` if a request did not
        finish (its latency is unbounded) or none did."""
        if self.num_unfinished > 0 or self.num_requests == 0:
            return math.inf
        return max(
            self.per_token_s / slo.per_token_s,
            self.input_s / slo.input_s,
            self.output_s / slo.output_s,
        )


def normalised_latency(records: Iterable[RecordLike], num_unfinished: int = 0) -> NormalisedLatency:
    """LoongServe's three normalised latencies over ``records`` (finished
    requests; NaN means when there are none)."""
    per_token: list[float] = []
    inputs: list[float] = []
    outputs: list[float] = []
    for r in records:
        jct = r.finish_s - r.arrival_s
        per_token.append(jct / (r.num_prompt_tokens + r.num_output_tokens))
        inputs.append((r.first_token_s - r.arrival_s) / max(r.num_prompt_tokens, 1))
        outputs.append((r.finish_s - r.first_token_s) / max(r.num_output_tokens - 1, 1))
    n = len(per_token)

    def mean(xs: list[float]) -> float:
        return math.fsum(xs) / n if n else math.nan

    return NormalisedLatency(mean(per_token), mean(inputs), mean(outputs), n, num_unfinished)


@dataclass(frozen=True)
class CurvePoint:
    """One rate of a sweep: the normalised latencies and the SLO ratio."""

    rate_rps: float
    latency: NormalisedLatency
    slo_ratio: float
    #: Fraction of the trace meeting the P90-goodput criteria (None: not computed).
    goodput_attainment: float | None = None


@dataclass(frozen=True)
class RateBound:
    """A rate read off a sweep.

    ``rate_rps`` is None when no swept rate met the target. ``lower_bound`` is
    True when every rate above the first good one met it too: the true
    crossing is beyond the sweep, ``rate_rps`` is its highest rate.
    """

    rate_rps: float | None
    lower_bound: bool = False


def rate_where_crossing(points: Sequence[tuple[float, float]], limit: float) -> RateBound:
    """Where ``value <= limit`` stops holding along ``(rate, value)`` points.

    Points are sorted by rate. From the first good point (value <= limit;
    none: ``rate_rps=None``), the first bad point after it is found and the
    crossing of ``limit`` is interpolated linearly between it and its
    predecessor (good). A NaN or infinite value counts as bad, and the
    crossing is then the last good rate (no line to interpolate along). No
    bad point after the first good one: the highest rate, as a lower bound.
    """
    pts = sorted((float(r), float(v)) for r, v in points)

    def good(v: float) -> bool:
        return math.isfinite(v) and v <= limit

    first = next((i for i, (_, v) in enumerate(pts) if good(v)), None)
    if first is None:
        return RateBound(None)
    for i in range(first + 1, len(pts)):
        r1, v1 = pts[i]
        if good(v1):
            continue
        r0, v0 = pts[i - 1]
        if not math.isfinite(v1) or v1 == v0:
            return RateBound(r0)
        return RateBound(r0 + (limit - v0) * (r1 - r0) / (v1 - v0))
    return RateBound(pts[-1][0], lower_bound=True)


def max_rate_under_slo(curve: Sequence[tuple[float, float]]) -> RateBound:
    """The highest request rate whose SLO ratio (max latency / SLO) stays
    <= 1, from ``(rate, slo_ratio)`` points (see :func:`rate_where_crossing`)."""
    return rate_where_crossing(curve, 1.0)


def goodput_attainment(
    records: Iterable[RecordLike],
    prefill_time_s: Callable[[int], float],
    *,
    num_unfinished: int = 0,
    ttft_factor: float = 25.0,
    ttft_floor_s: float = 15.0,
    tpot_limit_s: float = 0.050,
) -> float:
    """Fraction of requests (unfinished ones count as misses) with
    ``ttft <= max(ttft_factor * prefill_time_s(in), ttft_floor_s)`` and
    ``TPOT <= tpot_limit_s`` (LoongServe's ``draw_fig_12``)."""
    num_ok = 0
    num_all = num_unfinished
    for r in records:
        num_all += 1
        ttft = r.first_token_s - r.arrival_s
        ttft_limit = max(ttft_factor * prefill_time_s(r.num_prompt_tokens), ttft_floor_s)
        if ttft <= ttft_limit and tpot_s(r) <= tpot_limit_s:
            num_ok += 1
    return num_ok / num_all if num_all else math.nan


def p90_goodput(curve: Sequence[tuple[float, float]], target: float = 0.9) -> RateBound:
    """The rate where the attainment of ``(rate, attainment)`` points falls
    below ``target`` (linear interpolation, as :func:`rate_where_crossing`)."""
    # attainment >= target  <=>  -attainment <= -target; linear in both.
    return rate_where_crossing([(r, -a) for r, a in curve], -target)
