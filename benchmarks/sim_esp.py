"""SIMULATED LoongServe evaluation: ESP against its baselines on a simulated cluster.

    python -m benchmarks.sim_esp [--quick] --out FILE.json [--cost FILE] [--instances 8,16,64]
                                 [--workloads sharegpt,...] [--systems esp,...] [--jobs N]
                                 [--validation REAL.json]

For each workload (LoongServe's ShareGPT, L-Eval, LV-Eval, Mixed and Zipf
alpha 1.0/1.2/1.4, :mod:`vllm_esp.data.long_context`; all but ShareGPT's
lengths are SYNTHETIC), each instance count and each system, the cluster
simulator (:func:`vllm_esp.sim.cluster.simulate`) runs the real policy
object on a Poisson trace per request rate, and the rate is searched for
where the normalised latency, over LoongServe's per-dataset SLO, crosses 1
(:func:`vllm_esp.sim.metrics.max_rate_under_slo`), and for the Zipf
workloads also where P90 goodput attainment crosses 0.9.

Systems (``--systems``):

* ``esp``: LoongServe's scheduler, ``LoongPolicy`` with the paper's
  per-dataset ``max_num_ooe`` and ``running_max_req_size``;
* ``static_sp``: one static SP group of all instances (LoongServe w/o ESP);
* ``replicas_chunked``: DoP-1 replicas with SplitFuse chunked prefill at
  LightLLM-SF's per-dataset chunk size;
* ``pd_disaggregation``: DistServe-like, the best of a few prefill/decode
  splits (each split is swept; the one with the highest max rate is kept);
* ``tensor_parallel``: all instances as one tensor-parallel group.

Rate search (per system): start near a capacity estimate from the cost
model, double (or halve) until the SLO ratio brackets 1, then bisect the
bracket geometrically; every simulated rate is a curve point. One seed
gives the same requests at every rate (arrivals scale by ``1 / rate``; a
point's trace is a prefix of the workload's sample). A point has
``rate * target_span_s`` requests, clamped per instance and to 20,000, so
that overload can show: a finite trace caps an overloaded cluster's
latency by the backlog it builds, and a burst of a few hundred requests
passes ShareGPT's loose SLO at any rate. For the same reason a rate counts
as under the SLO only if it is *sustained*: after the last arrival the
cluster drains within the arrival window plus the longest request's solo
latency. A request cut off by the simulated-time guard, or refused (it
fits no instance group of the system), makes its rate violate the SLO. A
result whose arrival span at the max rate is under 3 mean JCTs is flagged
``short_trace`` (the number is then about bursts, not a steady state). A
policy or simulator assertion at one rate is recorded under ``errors`` and
that rate counts as a miss.

Decode-only iterations run 10 steps for every system
(:data:`BASELINE_DECODE_STEPS`, LoongServe's ``max_wait_tokens``).

Headline (JSON ``ratios``): ESP's max rate under SLO over each baseline's, at
the (workload, instance count) where the ratio is largest; ``worst_ratio``
is the smallest ratio over every baseline (tensor_parallel included),
workload and instance count. Only exact pairs count: a pair where either
rate is a lower bound (under the SLO at every swept rate) is listed under
``ratios_bounded``, one where a rate is missing (never under the SLO, e.g.
requests that fit no replica) under ``ratios_undefined``.

The cost model is the derived A800 profile (LWM-Text-1M on TP=2 A800
instances, ``vllm_esp/core/esp/profiles/a800_lwm7b_tp2.json``) unless
``--cost`` names a file; it is both the policies' belief and the simulator's
truth unless ``--truth`` names another. Every result is SIMULATED.

``--validation FILE`` fills ``validation``. A ``benchmarks.sim_validate``
result (the simulator against the real engine at N = 2, replayed with the
cost files calibrated on that engine around the run) is taken as it is.
Any other file is a run to replay here: it has ``num_instances``,
optional ``system`` (default ``esp``), ``workload`` (for the policy
settings) and ``capacity_tokens``, and
``requests``: records with ``arrival_s``, ``num_prompt_tokens``,
``num_output_tokens``, ``first_token_s``, ``finish_s``; the same requests are
simulated and the relative errors of mean TTFT and mean JCT reported.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import finish_metadata, run_metadata, write_json
from vllm_esp.core.esp.baselines import CHUNK_TOKENS
from vllm_esp.core.esp.cluster import ClusterPolicy
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.policy import LoongSettings
from vllm_esp.core.esp.profiles import profile_path
from vllm_esp.core.esp.registry import make_cluster_policy
from vllm_esp.data.long_context import WORKLOADS, LengthSample, make_lengths, sharegpt_length_pool
from vllm_esp.sim.cluster import SimRequest, simulate
from vllm_esp.sim.metrics import (
    SLOS,
    goodput_attainment,
    max_rate_under_slo,
    normalised_latency,
    p90_goodput,
    slo_for,
)

SYSTEMS: tuple[str, ...] = (
    "esp",
    "static_sp",
    "replicas_chunked",
    "pd_disaggregation",
    "tensor_parallel",
)
#: Baseline behind each headline ratio key.
RATIO_KEYS: Mapping[str, str] = {
    "vs_chunked_prefill": "replicas_chunked",
    "vs_pd_disaggregation": "pd_disaggregation",
    "vs_static_sp": "static_sp",
}
DEFAULT_PROFILE = profile_path("a800_lwm7b_tp2")
#: LoongServe's per-dataset scheduler knobs (``5-start-api-server.py``).
_MAX_NUM_OOE = {"sharegpt": 1, "leval": 8, "lveval": 8, "mixed": 4, "zipf": 64}
_RUNNING_MAX_REQ = {"sharegpt": 1024, "leval": 256, "lveval": 256, "mixed": 1024, "zipf": 1024}
#: LoongServe's instances in the runs those knobs are for (TP2 x SP4). Every
#: system gets the same share of running requests per instance at every
#: size: a system that schedules the whole cluster (ESP, static SP, TP)
#: ``share * N``, a chunked replica or a P/D decode instance ``share``. (A
#: fixed 1,024 would leave ESP 16 per instance at 64 instances, while a
#: replica with the policies' default kept 1,024 of its own.)
_LOONG_NUM_INSTANCES = 4
#: LoongServe's P90-goodput TTFT limit scales the prefill time at SP4/TP2.
_GOODPUT_DOP = 4
#: Decode steps a decode-only iteration runs before the next decision, for
#: every system: LoongServe's ``max_wait_tokens`` (10), which ESP and
#: static SP use anyway. The chunked and P/D baselines default to 1; at 1
#: the 64-instance simulations make 3-8x more decisions for latencies within
#: a few percent (measured on L-Eval), so the sweep would not fit its budget.
BASELINE_DECODE_STEPS = 10


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SweepSettings:
    """How hard a rate search works (``--quick`` shrinks every knob)."""

    #: Requests per point: ``rate * target_span_s`` (arrivals spanning about
    #: that long), clamped to ``[min, max]_requests_per_instance * N`` and to
    #: ``max_requests``. A finite trace bounds an overloaded cluster's latency
    #: by the backlog it can build: the span has to grow with the rate, and
    #: the count with the cluster, for overload to show at all.
    target_span_s: float
    min_requests_per_instance: int
    max_requests_per_instance: int
    max_requests: int
    #: Bisection steps inside the first bracket [good, bad].
    num_bisections: int
    #: Doublings (or halvings) tried to find the bracket.
    max_expansions: int
    #: Fractions of the instances that prefill, for the P/D splits tried.
    pd_fractions: tuple[float, ...]

    def num_requests(self, rate_rps: float, num_instances: int) -> int:
        lo = self.min_requests_per_instance * num_instances
        hi = self.max_requests_per_instance * num_instances
        n = max(lo, min(hi, math.ceil(rate_rps * self.target_span_s)))
        return min(n, self.max_requests)

    def sample_size(self, instance_counts: Sequence[int]) -> int:
        return min(self.max_requests, self.max_requests_per_instance * max(instance_counts))


FULL = SweepSettings(
    target_span_s=1800.0,
    min_requests_per_instance=150,
    max_requests_per_instance=2_500,
    max_requests=20_000,
    num_bisections=4,
    max_expansions=8,
    pd_fractions=(0.25, 0.5, 0.75),
)
#: Quick points still span several mean JCTs near each system's capacity
#: (ShareGPT: about 2,400 requests over 12-20 s at 8 instances; L-Eval: about
#: 2,000 over 600 s). With 80 requests per instance and a 120 s span, the
#: ShareGPT points were bursts of 3 s and the L-Eval ones a few mean JCTs
#: long: the rate search measured how fast a burst drains, ShareGPT and
#: L-Eval tied (0.84-1.19x) and the full sweep's steady state disagreed
#: (1.50x and 1.08x at 8 instances).
QUICK = SweepSettings(
    target_span_s=600.0,
    min_requests_per_instance=40,
    max_requests_per_instance=300,
    max_requests=20_000,
    num_bisections=2,
    max_expansions=6,
    pd_fractions=(0.5,),
)


def _family(workload: str) -> str:
    return "zipf" if workload.startswith("zipf") else workload


def max_running_requests(workload: str, num_instances: int) -> int:
    """The running-request cap of a group of ``num_instances`` scheduled as one."""
    per_instance = _RUNNING_MAX_REQ[_family(workload)] / _LOONG_NUM_INSTANCES
    return max(1, round(per_instance * num_instances))


def loong_settings(workload: str, num_instances: int) -> LoongSettings:
    return LoongSettings(
        max_num_ooe=_MAX_NUM_OOE[_family(workload)],
        max_running_requests=max_running_requests(workload, num_instances),
    )


def pd_variants(num_instances: int, fractions: Sequence[float]) -> list[dict[str, int]]:
    """P/D splits to try: ``num_prefill`` per fraction, prefill groups of the
    largest divisor <= 8 (DistServe's prefill instance is one parallel group;
    capped so a 64-instance cluster gets several groups)."""
    out: list[dict[str, int]] = []
    for frac in fractions:
        num_prefill = min(num_instances - 1, max(1, round(num_instances * frac)))
        dop = max(d for d in range(1, min(8, num_prefill) + 1) if num_prefill % d == 0)
        variant = {"num_prefill": num_prefill, "prefill_dop": dop}
        if variant not in out:
            out.append(variant)
    return out


def make_policy(
    system: str, variant: Mapping[str, int], workload: str, num_instances: int, cost: ESPCostModel
) -> ClusterPolicy:
    """A fresh policy object (policies keep state across one run), built by
    name from the cluster registry with the benchmark's settings."""
    if system == "esp":
        return make_cluster_policy(
            "loong", num_instances, cost, loong_settings(workload, num_instances)
        )
    if system in ("static_sp", "tensor_parallel"):
        return make_cluster_policy(
            system, max_running_requests=max_running_requests(workload, num_instances)
        )
    if system == "replicas_chunked":
        return make_cluster_policy(
            system,
            chunk_tokens=CHUNK_TOKENS[_family(workload)],
            max_decode_steps=BASELINE_DECODE_STEPS,
            max_running_requests=max_running_requests(workload, 1),
        )
    if system == "pd_disaggregation":
        return make_cluster_policy(
            system,
            variant["num_prefill"],
            prefill_dop=variant["prefill_dop"],
            max_decode_steps=BASELINE_DECODE_STEPS,
            max_running_requests=max_running_requests(workload, 1),
        )
    raise ValueError(f"unknown system {system!r}; one of {SYSTEMS}")


# ------------------------------------------------------------------ one point
@dataclass(frozen=True)
class Task:
    """One (workload, instance count, system, variant) rate search."""

    workload: str
    num_instances: int
    system: str
    variant: Mapping[str, int]
    sample: LengthSample
    cost: ESPCostModel
    truth: ESPCostModel
    capacity_tokens: int
    sweep: SweepSettings
    goodput: bool = False


def capacity_guess_rps(sample: LengthSample, num_instances: int, cost: ESPCostModel) -> float:
    """Requests/s the cluster could sustain if every instance-second went to
    useful work at DoP 1 (decode batched 32-wide): a search start, not a result."""
    p1, d = cost.prefill_coeffs(1), cost.decode
    work = 0.0
    for p, o in zip(sample.num_prompt_tokens, sample.num_output_tokens):
        prefill = p1.B_s * p + p1.C_s * p * p + p1.A_s / 8
        decode = o * (d.b_s + d.c_s * (p + o / 2) + d.a_s / 32)
        work += prefill + decode
    return num_instances * len(sample) / max(work, 1e-9)


def _max_sim_s(sample: LengthSample, last_arrival_s: float, workload: str) -> float:
    # A guard against a policy that never drains, far beyond any latency the
    # SLO allows: an unfinished request at the cut already violates it.
    tokens = [p + o for p, o in zip(sample.num_prompt_tokens, sample.num_output_tokens)]
    slack = 50.0 * slo_for(workload).per_token_s * max(tokens, default=1)
    return 3.0 * last_arrival_s + slack + 600.0


def max_solo_latency_s(
    requests: Sequence[SimRequest], cost: ESPCostModel, capacity_tokens: int
) -> float:
    """The longest latency any request would have alone on the cluster:
    prefill on the fewest instances that hold it, then batch-1 decode steps."""
    worst = 0.0
    for r in requests:
        p, o = r.num_prompt_tokens, r.num_output_tokens
        dop = max(1, -(-(p + o) // capacity_tokens))
        t = cost.prefill_time(dop, p, float(p) * p) + (o - 1) * cost.decode_time(1, p + o)
        worst = max(worst, t)
    return worst


def evaluate(task: Task, rate_rps: float) -> dict[str, Any]:
    """Simulate ``task`` at ``rate_rps``; the curve point as a JSON-ready dict."""
    num = min(len(task.sample), task.sweep.num_requests(rate_rps, task.num_instances))
    trace = task.sample.at_rate(rate_rps, num)
    requests = list(trace.requests)
    policy = make_policy(task.system, task.variant, task.workload, task.num_instances, task.cost)
    last = requests[-1].arrival_s if requests else 0.0
    t0 = time.perf_counter()
    result = simulate(
        policy,
        requests,
        num_instances=task.num_instances,
        capacity_tokens=task.capacity_tokens,
        truth=task.truth,
        max_sim_s=_max_sim_s(task.sample, last, task.workload),
    )
    wall_s = time.perf_counter() - t0
    num_unfinished = len(result.unfinished)
    lat = normalised_latency(result.records, num_unfinished)
    dop = min(_GOODPUT_DOP, task.num_instances)

    def prefill_time(n: int) -> float:
        return task.cost.prefill_time(dop, n, float(n) * n)

    attainment = goodput_attainment(result.records, prefill_time, num_unfinished=num_unfinished)
    jcts = [r.finish_s - r.arrival_s for r in result.records]
    drain_s = result.makespan_s - last
    slo_ratio = lat.slo_ratio(slo_for(task.workload))
    # Kept up: after the last arrival, the backlog drains within the arrival
    # window plus the longest request's solo latency. A short trace at a rate
    # far past capacity is a burst whose mean latency can still pass a loose
    # SLO (ShareGPT's allows ~45 s per request); it must not count.
    solo_s = max_solo_latency_s(requests, task.truth, task.capacity_tokens)
    sustained = drain_s <= last + solo_s
    return {
        "rate_rps": rate_rps,
        "per_token_s": lat.per_token_s,
        "input_s": lat.input_s,
        "output_s": lat.output_s,
        "slo_ratio": slo_ratio,
        "goodput_attainment": attainment,
        "sustained": sustained,
        # What the searches read: the metric, or a miss when not sustained.
        "effective_slo_ratio": slo_ratio if sustained else math.inf,
        "effective_attainment": attainment if sustained else 0.0,
        "num_requests": len(requests),
        "num_unfinished": num_unfinished,
        "num_preemptions": sum(r.num_preemptions for r in result.records),
        # Short-trace diagnostics: an arrival span of a few mean JCTs or less
        # cannot tell a sustainable rate from a burst the cluster absorbs.
        "arrival_span_s": last,
        "mean_jct_s": sum(jcts) / len(jcts) if jcts else math.nan,
        "drain_s": drain_s,
        "max_solo_latency_s": solo_s,
        "num_decisions": result.num_decisions,
        "num_batches": result.num_batches,
        "num_migrated_tokens": result.num_migrated_tokens,
        "makespan_s": result.makespan_s,
        "sim_wall_s": round(wall_s, 3),
    }


# ------------------------------------------------------------------ search
def search_crossing(
    evaluate_at: Callable[[float], float],
    limit: float,
    start_rps: float,
    *,
    num_bisections: int,
    max_expansions: int,
) -> None:
    """Evaluate rates until ``value <= limit`` is bracketed and bisected.

    Doubles from ``start_rps`` while the value is good (halves while bad),
    at most ``max_expansions`` times, then bisects the bracket
    geometrically ``num_bisections`` times. The caller keeps the points
    (``evaluate_at`` caches); nothing is returned.
    """

    def good(rate: float) -> bool:
        v = evaluate_at(rate)
        return math.isfinite(v) and v <= limit

    rate = start_rps
    ok = good(rate)
    lo = hi = None
    for _ in range(max_expansions):
        if ok:
            lo, rate = rate, rate * 2.0
        else:
            hi, rate = rate, rate / 2.0
        ok = good(rate)
        if ok and hi is not None:
            lo = rate
            break
        if not ok and lo is not None:
            hi = rate
            break
    if lo is None or hi is None:
        return  # never good (None), or good at every rate (a lower bound)
    for _ in range(num_bisections):
        mid = math.sqrt(lo * hi)
        if good(mid):
            lo = mid
        else:
            hi = mid


def run_task(task: Task) -> dict[str, Any]:
    """The rate search(es) of one task: its curve and the rates read off it."""
    t0 = time.perf_counter()
    points: dict[float, dict[str, Any]] = {}

    errors: list[str] = []

    def point(rate: float) -> dict[str, Any]:
        key = float(f"{rate:.6g}")
        if key not in points:
            try:
                points[key] = evaluate(task, key)
            except (AssertionError, RuntimeError, ValueError) as exc:
                # A policy or simulator bug at one rate: record it, count the
                # rate as a miss, and keep the other searches going.
                errors.append(f"rate {key}: {type(exc).__name__}: {exc}")
                points[key] = {
                    "rate_rps": key,
                    "error": errors[-1],
                    "effective_slo_ratio": math.inf,
                    "effective_attainment": 0.0,
                }
        return points[key]

    start = 0.5 * capacity_guess_rps(task.sample, task.num_instances, task.cost)
    search = {"num_bisections": task.sweep.num_bisections}
    search["max_expansions"] = task.sweep.max_expansions
    search_crossing(lambda r: point(r)["effective_slo_ratio"], 1.0, start, **search)
    if task.goodput:
        # Same start, so the expansion revisits the SLO search's cached rates.
        search_crossing(lambda r: -point(r)["effective_attainment"], -0.9, start, **search)
    everything = [points[r] for r in sorted(points)]  # failed rates count as misses
    curve = [p for p in everything if "error" not in p]
    slo = max_rate_under_slo([(p["rate_rps"], p["effective_slo_ratio"]) for p in everything])
    out: dict[str, Any] = {
        "workload": task.workload,
        "num_instances": task.num_instances,
        "system": task.system,
        "variant": dict(task.variant),
        "num_requests": len(task.sample),
        "search_start_rps": start,
        "max_rate_rps": slo.rate_rps,
        "max_rate_is_lower_bound": slo.lower_bound,
        "curve": curve,
        "wall_s": round(time.perf_counter() - t0, 3),
        "errors": errors,
    }
    below = [p for p in curve if slo.rate_rps is not None and p["rate_rps"] <= slo.rate_rps]
    if below:
        span_ratio = below[-1]["arrival_span_s"] / below[-1]["mean_jct_s"]
        out["span_over_mean_jct_at_max_rate"] = span_ratio
        # Arrivals over fewer than 3 mean JCTs: a burst, not a steady state.
        out["short_trace"] = span_ratio < 3.0
    if task.goodput:
        gp = p90_goodput([(p["rate_rps"], p["effective_attainment"]) for p in everything])
        out["p90_goodput_rps"] = gp.rate_rps
        out["p90_goodput_is_lower_bound"] = gp.lower_bound
    return out


# ------------------------------------------------------------------ summary
def _pick_best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant with the highest max rate (P/D: the best split)."""

    def key(r: dict[str, Any]) -> tuple[float, float]:
        return (r["max_rate_rps"] or -1.0, r.get("p90_goodput_rps") or -1.0)

    best = max(results, key=key)
    if len(results) > 1:
        best = {**best, "variants_tried": [dict(r["variant"]) for r in results]}
        best["variant_max_rates_rps"] = [r["max_rate_rps"] for r in results]
    return best


def summarize_ratios(
    table: Mapping[str, Mapping[int, Mapping[str, dict[str, Any]]]],
) -> dict[str, Any]:
    """``ratios``, ``worst_ratio`` and their detail from the per-system results.

    Only exact pairs (neither rate a lower bound) enter the headline; a
    pair with a bound (ESP's: the ratio is at least that; the baseline's:
    at most) is listed under ``ratios_bounded``, and a pair missing a rate
    (never under the SLO) under ``ratios_undefined``.
    """
    exact: list[dict[str, Any]] = []
    bounded: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for workload, by_n in table.items():
        for n, systems in by_n.items():
            esp = systems.get("esp")
            if esp is None:
                continue
            for name, res in systems.items():
                if name == "esp":
                    continue
                where = {"workload": workload, "num_instances": n, "baseline": name}
                num, den = esp["max_rate_rps"], res["max_rate_rps"]
                if num is None or den is None or den <= 0:
                    missing.append({**where, "esp_rps": num, "baseline_rps": den})
                    continue
                pair = {**where, "ratio": num / den, "esp_rps": num, "baseline_rps": den}
                esp_lb, base_lb = esp["max_rate_is_lower_bound"], res["max_rate_is_lower_bound"]
                if esp_lb or base_lb:
                    kind = (
                        "unknown" if esp_lb and base_lb else ("at_least" if esp_lb else "at_most")
                    )
                    bounded.append({**pair, "bound": kind})
                else:
                    exact.append(pair)
    ratios: dict[str, float | None] = {}
    detail: dict[str, Any] = {}
    for key, baseline in RATIO_KEYS.items():
        mine = [p for p in exact if p["baseline"] == baseline]
        best = max(mine, key=lambda p: p["ratio"], default=None)
        ratios[key] = best["ratio"] if best else None
        detail[key] = best
    worst = min(exact, key=lambda p: p["ratio"], default=None)
    return {
        "ratios": ratios,
        "worst_ratio": worst["ratio"] if worst else None,
        "ratios_detail": detail,
        "worst_ratio_detail": worst,
        "all_ratios": exact,
        "ratios_bounded": bounded,
        "ratios_undefined": missing,
    }


# ------------------------------------------------------------------ validation
def validate(path: str, cost: ESPCostModel, truth: ESPCostModel, capacity: int) -> dict[str, Any]:
    """Relative errors of simulated mean TTFT and JCT against a real run."""
    data = json.loads(Path(path).read_text())
    if "engine_result" in data and "ttft_rel_err" in data:  # benchmarks.sim_validate's
        return {
            "ttft_rel_err": data["ttft_rel_err"],
            "jct_rel_err": data["jct_rel_err"],
            "file": path,
            "source": "benchmarks.sim_validate",
            "label": data.get("label"),
            "engine_result": data["engine_result"],
            "cost_models": data.get("cost_models"),
        }
    real = data["requests"]
    n = int(data["num_instances"])
    workload = data.get("workload", "mixed")
    system = data.get("system", "esp")
    variant = data.get("variant") or (
        pd_variants(n, (0.5,))[0] if system == "pd_disaggregation" else {}
    )
    requests = [
        SimRequest(
            str(r.get("req_id", i)),
            float(r["arrival_s"]),
            int(r["num_prompt_tokens"]),
            int(r["num_output_tokens"]),
            str(r.get("cls", "")),
        )
        for i, r in enumerate(sorted(real, key=lambda r: r["arrival_s"]))
    ]
    result = simulate(
        make_policy(system, variant, workload, n, cost),
        requests,
        num_instances=n,
        capacity_tokens=int(data.get("capacity_tokens", capacity)),
        truth=truth,
    )

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else math.nan

    real_ttft = mean([r["first_token_s"] - r["arrival_s"] for r in real])
    real_jct = mean([r["finish_s"] - r["arrival_s"] for r in real])
    sim_ttft = mean([r.first_token_s - r.arrival_s for r in result.records])
    sim_jct = mean([r.finish_s - r.arrival_s for r in result.records])
    return {
        "ttft_rel_err": abs(sim_ttft - real_ttft) / real_ttft,
        "jct_rel_err": abs(sim_jct - real_jct) / real_jct,
        "file": path,
        "system": system,
        "num_instances": n,
        "real_mean_ttft_s": real_ttft,
        "sim_mean_ttft_s": sim_ttft,
        "real_mean_jct_s": real_jct,
        "sim_mean_jct_s": sim_jct,
        "num_unfinished": len(result.unfinished),
    }


# ------------------------------------------------------------------ plots
#: One colour per system in every panel (a system with no servable point
#: would otherwise shift the colour cycle).
_COLORS = {system: f"C{i}" for i, system in enumerate(SYSTEMS)}
_LATENCIES = (("per_token_s", "per-token"), ("input_s", "input"), ("output_s", "output"))


def plot(result: dict[str, Any], out_json: Path) -> list[str]:
    """Fig. 10-style latency curves and Fig. 12-style goodput bars, per
    instance count, next to the JSON; [] (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        result["plots_note"] = "matplotlib is not installed: no PNGs"
        return []
    written: list[str] = []
    curves = result["curves"]
    counts = sorted({int(n) for by_n in curves.values() for n in by_n})
    for n in counts:
        workloads = [w for w in curves if str(n) in curves[w]]
        fig, axes = plt.subplots(
            3, len(workloads), figsize=(3.2 * len(workloads), 8), squeeze=False
        )
        for col, w in enumerate(workloads):
            slo = slo_for(w)
            for row, (fld, label) in enumerate(_LATENCIES):
                ax = axes[row][col]
                for system, curve in curves[w][str(n)].items():
                    pts = [p for p in curve if math.isfinite(p[fld]) and p["num_unfinished"] == 0]
                    if pts:
                        ax.plot(
                            [p["rate_rps"] for p in pts],
                            [p[fld] * 1e3 for p in pts],
                            marker="o",
                            markersize=3,
                            color=_COLORS[system],
                            label=system,
                        )
                ax.axhline(getattr(slo, fld) * 1e3, color="grey", ls="--", lw=0.8)
                ax.set_yscale("log")
                if row == 0:
                    ax.set_title(w)
                if col == 0:
                    ax.set_ylabel(f"{label} latency (ms/token)")
                if row == 2:
                    ax.set_xlabel("request rate (req/s)")
        handles = [
            Line2D([], [], color=_COLORS[s], marker="o", markersize=3, label=s)
            for s in SYSTEMS
            if any(s in curves[w][str(n)] for w in workloads)
        ]
        fig.legend(handles=handles, loc="upper left", fontsize=7, ncol=len(handles))
        fig.suptitle(
            f"SIMULATED, {n} instances: normalised latency vs rate (cf. LoongServe Fig. 10)"
        )
        fig.tight_layout()
        path = out_json.with_name(f"{out_json.stem}_fig10_{n}inst.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
        zipf = [w for w in workloads if w.startswith("zipf")]
        if zipf:
            written.append(_plot_goodput(plt, result, zipf, n, out_json))
    return written


def _plot_goodput(plt: Any, result: dict[str, Any], zipf: list[str], n: int, out_json: Path) -> str:
    table = result["results"]
    systems = [s for s in SYSTEMS if any(s in table[w][str(n)] for w in zipf)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(zipf), 3.2))
    width = 0.8 / max(len(systems), 1)
    for k, system in enumerate(systems):
        values = [(table[w][str(n)].get(system) or {}).get("p90_goodput_rps") or 0.0 for w in zipf]
        ax.bar(
            [i + k * width for i in range(len(zipf))],
            values,
            width,
            color=_COLORS[system],
            label=system,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(zipf))])
    ax.set_xticklabels([f"alpha={w.removeprefix('zipf')}" for w in zipf])
    ax.set_ylabel("P90 goodput (req/s)")
    ax.set_title(f"SIMULATED, {n} instances (cf. LoongServe Fig. 12)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_json.with_name(f"{out_json.stem}_fig12_{n}inst.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------ driver
def build_tasks(
    samples: Mapping[tuple[str, int], LengthSample],
    systems: Sequence[str],
    cost: ESPCostModel,
    truth: ESPCostModel,
    capacity_tokens: int,
    sweep: SweepSettings,
) -> list[Task]:
    tasks = []
    for (workload, n), sample in samples.items():
        for system in systems:
            variants = pd_variants(n, sweep.pd_fractions) if system == "pd_disaggregation" else [{}]
            for variant in variants:
                tasks.append(
                    Task(
                        workload,
                        n,
                        system,
                        variant,
                        sample,
                        cost,
                        truth,
                        capacity_tokens,
                        sweep,
                        goodput=workload.startswith("zipf"),
                    )
                )
    # Biggest first, so the slowest searches do not start last.
    tasks.sort(key=lambda t: -t.num_instances * len(t.sample))
    return tasks


def run_tasks(tasks: Sequence[Task], jobs: int) -> list[dict[str, Any]]:
    results = []

    def report(r: dict[str, Any]) -> None:
        rate = r["max_rate_rps"]
        shown = (
            "none" if rate is None else f"{rate:.4g}{'+' if r['max_rate_is_lower_bound'] else ''}"
        )
        print(
            f"SIMULATED {r['workload']:8s} N={r['num_instances']:<3d} {r['system']:18s}"
            f" {json.dumps(r['variant']) if r['variant'] else '':36s} max rate {shown} req/s"
            f"  ({len(r['curve'])} points, {r['wall_s']:.1f} s)",
            flush=True,
        )
        for err in r["errors"]:
            print(f"SIMULATED   ERROR {err}", flush=True)

    if jobs <= 1:
        for t in tasks:
            results.append(run_task(t))
            report(results[-1])
        return results
    with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
        for fut in cf.as_completed([pool.submit(run_task, t) for t in tasks]):
            results.append(fut.result())
            report(results[-1])
    return results


def collect(results: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``results[workload][N][system]`` (best variant) and ``curves`` alike."""
    grouped: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for r in results:
        grouped.setdefault(r["workload"], {}).setdefault(str(r["num_instances"]), {}).setdefault(
            r["system"], []
        ).append(r)
    table: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for w in [w for w in WORKLOADS if w in grouped]:
        for n in sorted(grouped[w], key=int):
            for s in [s for s in SYSTEMS if s in grouped[w][n]]:
                best = _pick_best(grouped[w][n][s])
                table.setdefault(w, {}).setdefault(n, {})[s] = {
                    k: v for k, v in best.items() if k != "curve"
                }
                curves.setdefault(w, {}).setdefault(n, {})[s] = best["curve"]
    return table, curves


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="result JSON (PNGs are written next to it)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and rates")
    parser.add_argument(
        "--cost", default=None, help=f"cost-model JSON (default {DEFAULT_PROFILE.name})"
    )
    parser.add_argument(
        "--truth", default=None, help="the simulator's truth model (default --cost)"
    )
    parser.add_argument(
        "--instances", default=None, help="instance counts (default 8,16,64; quick 8,16)"
    )
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--num-requests", type=int, default=None, help="per point (default: rate x span, clamped)"
    )
    parser.add_argument(
        "--bisections", type=int, default=None, help="bisection steps per rate search"
    )
    parser.add_argument("--capacity-tokens", type=int, default=None, help="KV tokens per instance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=None, help="processes (default: usable CPUs)")
    parser.add_argument(
        "--length-unit",
        choices=("tokens", "words"),
        default="tokens",
        help="ShareGPT lengths: the default tokenizer, or 1.3 x words (no tokenizing)",
    )
    parser.add_argument("--validation", default=None, help="a real-engine run to compare with")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def _samples(args: argparse.Namespace, sweep: SweepSettings, counts: list[int]) -> dict:
    """One sample per workload, shared by every instance count (the same
    requests everywhere); points use prefixes of it."""
    pool = None
    workloads = _csv(args.workloads)
    if args.length_unit == "words" and any(w not in ("leval", "lveval") for w in workloads):
        from vllm_esp.data.sharegpt import load_sharegpt_pairs

        pool = sharegpt_length_pool(pairs=load_sharegpt_pairs(split="serve"))
    samples = {}
    for w in workloads:
        sample = make_lengths(w, sweep.sample_size(counts), args.seed, sharegpt_pool=pool)
        for n in counts:
            samples[(w, n)] = sample
    return samples


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    meta = run_metadata(seed=args.seed, argv=argv)
    sweep = QUICK if args.quick else FULL
    if args.num_requests:
        # A fixed count: the per-instance bounds open up, the cap is the count.
        sweep = replace(
            sweep,
            min_requests_per_instance=args.num_requests,
            max_requests_per_instance=args.num_requests,
            max_requests=args.num_requests,
        )
    if args.bisections is not None:
        sweep = replace(sweep, num_bisections=args.bisections)
    counts = [int(x) for x in _csv(args.instances or ("8,16" if args.quick else "8,16,64"))]
    systems = _csv(args.systems)
    unknown = [s for s in systems if s not in SYSTEMS] + [
        w for w in _csv(args.workloads) if w not in WORKLOADS
    ]
    if unknown:
        raise SystemExit(
            f"unknown systems/workloads {unknown}; systems {SYSTEMS}, workloads {WORKLOADS}"
        )
    cost_path = Path(args.cost) if args.cost else DEFAULT_PROFILE
    cost = ESPCostModel.load(cost_path)
    truth = ESPCostModel.load(args.truth) if args.truth else cost
    capacity = args.capacity_tokens or int(cost.meta.get("capacity_tokens", 210_000))
    samples = _samples(args, sweep, counts)
    tasks = build_tasks(samples, systems, cost, truth, capacity, sweep)
    jobs = args.jobs or len(os.sched_getaffinity(0))
    print(f"SIMULATED sim_esp: {len(tasks)} rate searches on {jobs} processes", flush=True)
    t0 = time.perf_counter()
    results = run_tasks(tasks, jobs)
    table, curves = collect(results)
    summary = summarize_ratios(
        {w: {int(n): s for n, s in by_n.items()} for w, by_n in table.items()}
    )
    if args.validation:
        validation = validate(args.validation, cost, truth, capacity)
        note = (
            "benchmarks.sim_validate's comparison with the real engine"
            if validation.get("source") == "benchmarks.sim_validate"
            else "SIMULATED vs the real run in the validation file"
        )
    else:
        validation = {"ttft_rel_err": None, "jct_rel_err": None}
        note = "no real-engine comparison file given (--validation FILE)"
    out: dict[str, Any] = {
        "benchmark": "sim_esp",
        "label": "SIMULATED",
        "mode": "quick" if args.quick else "full",
        "ratios": summary["ratios"],
        "worst_ratio": summary["worst_ratio"],
        "validation": validation,
        "validation_note": note,
        "ratios_detail": summary["ratios_detail"],
        "worst_ratio_detail": summary["worst_ratio_detail"],
        "all_ratios": summary["all_ratios"],
        "ratios_bounded": summary["ratios_bounded"],
        "ratios_undefined": summary["ratios_undefined"],
        "cost_model": {
            "path": str(cost_path),
            "sha256": cost.sha256(),
            "source": cost.source,
            "truth_path": str(args.truth) if args.truth else str(cost_path),
            "truth_sha256": truth.sha256(),
        },
        "capacity_tokens_per_instance": capacity,
        "instances": counts,
        "systems": systems,
        "sweep": asdict(sweep),
        "slos_ms_per_token": {
            k: [v.per_token_s * 1e3, v.input_s * 1e3, v.output_s * 1e3] for k, v in SLOS.items()
        },
        "slo_note": "Zipf workloads use Mixed's SLO (LoongServe gives none for them)",
        "workloads": {w: dict(s.meta) for (w, _), s in samples.items()},
        "results": table,
        "curves": curves,
        "errors": [
            {
                "workload": r["workload"],
                "num_instances": r["num_instances"],
                "system": r["system"],
                "variant": r["variant"],
                "error": e,
            }
            for r in results
            for e in r["errors"]
        ],
        "search_wall_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }
    out_path = Path(args.out)
    out["plots"] = [] if args.no_plots else plot(out, out_path)
    out["metadata"] = finish_metadata(meta)
    write_json(out_path, out)
    print(json.dumps({"ratios": out["ratios"], "worst_ratio": out["worst_ratio"]}))
    return out


if __name__ == "__main__":
    main()
