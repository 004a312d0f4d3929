"""SIMULATED against real: the simulator on the exact traces a
``benchmarks.serve_suite`` run replayed over HTTP.

    python -m benchmarks.sim_jct --from-suite SUITE.json [--traces NAME,...]
        [--calibration burst|none] --out FILE.json

Each trace of the suite result is rebuilt (lengths from the JSON, arrivals
redrawn from the suite's seed and rate: every generator draws them from
the same seeded stream), every policy the suite ran is simulated with the
suite's engine settings (``benchmarks.sim_jct.simulate``), and the
simulated mean JCT is compared with the real mean E2E. ``burst``
calibration scales the step-time model by the real over simulated fcfs
burst makespan (an fcfs burst's schedule does not depend on the clock).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import finish_metadata, ratio, run_metadata, write_json
from benchmarks.sim_jct import simulate
from vllm_esp.data.trace import TraceRequest, poisson_arrivals

#: How far the simulated mean JCT may be from the real server's mean E2E.
TOLERANCE = 0.15
#: vLLM's CPU platform block size when the server is given none.
CPU_BLOCK_SIZE = 128


@dataclass(frozen=True)
class StepTimeModel:
    """``t_step = t0 + t_decode * num_decode + t_prefill * num_prefill_tokens
    + t_attn * attended keys`` (s; ``benchmarks.sim_jct``)."""

    t0: float
    t_decode: float
    t_prefill: float
    t_attn: float = 0.0

    def scaled(self, factor: float) -> StepTimeModel:
        return StepTimeModel(
            self.t0 * factor, self.t_decode * factor, self.t_prefill * factor, self.t_attn * factor
        )


@dataclass(frozen=True)
class SuiteEngine:
    """The suite's server settings that the scheduler sees."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_tokens: int
    block_size: int


def _int_flag(flags: Sequence[str], name: str, default: int | None = None) -> int:
    if name in flags:
        return int(flags[flags.index(name) + 1])
    if default is None:
        raise ValueError(f"the suite's server flags have no {name}")
    return default


def suite_engine(suite: Mapping[str, Any], block_size: int | None = None) -> SuiteEngine:
    """Engine settings from the suite's server flags and logged KV cache."""
    flags = suite["server_flags"]
    kv = [s["kv_cache_tokens"] for s in suite.get("sessions", []) if s.get("kv_cache_tokens")]
    if not kv:
        raise ValueError("the suite's sessions logged no KV cache size")
    return SuiteEngine(
        max_num_seqs=_int_flag(flags, "--max-num-seqs"),
        max_num_batched_tokens=_int_flag(flags, "--max-num-batched-tokens"),
        max_model_len=_int_flag(flags, "--max-model-len"),
        # Every server has the same flags; the smallest cache binds.
        kv_tokens=min(kv),
        block_size=block_size or _int_flag(flags, "--block-size", CPU_BLOCK_SIZE),
    )


def _arrival_rng(seed: int) -> np.random.Generator:
    # Every generator of vllm_esp.data.trace draws its arrivals from child
    # stream 1 of SeedSequence(seed); a child does not depend on how many
    # siblings are spawned.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed).spawn(2)[1]))


def _source(sources: Sequence[str], cls: str | None) -> str:
    named = [s for s in sources if cls is not None and s.endswith(f"-{cls}")]
    return named[0] if named else (sources[0] if sources else "")


def suite_trace(suite: Mapping[str, Any], name: str, *, burst: bool = False) -> list[TraceRequest]:
    """The suite's trace ``name`` as it was replayed: prompt and output
    lengths and classes from the JSON, the Poisson arrivals redrawn from the
    suite's seed at the trace's rate (``burst``: every request at t = 0).
    Lengths only: the simulated scheduler fabricates the prompt tokens."""
    t = suite["traces"][name]
    lens = t["requests"]
    if burst or t["load"] is None:
        rate = math.inf
    elif t["rate_rps"] is None:
        raise ValueError(f"trace {name} has a load but no rate (no capacity was measured)")
    else:
        rate = float(t["rate_rps"])
    arrivals = poisson_arrivals(t["num_requests"], rate, _arrival_rng(int(suite["seed"])))
    return [
        TraceRequest(
            request_id=f"{name}-{i:06d}",
            arrival_s=float(arrival),
            prompt_len=p,
            output_len=o,
            prompt_text="",
            source=_source(t["sources"], cls),
        )
        for i, (arrival, p, o, cls) in enumerate(
            zip(arrivals, lens["prompt_len"], lens["output_len"], lens["class"], strict=True)
        )
    ]


def default_traces(suite: Mapping[str, Any]) -> list[str]:
    """The suite's ShareGPT Poisson traces (a) and mixed traces (c)."""
    return [
        name
        for name, t in suite["traces"].items()
        if (t["family"] == "sharegpt" and t["load"] is not None) or t["family"] == "mixed"
    ]


def compare(sim_mean_s: float | None, real_mean_s: float | None) -> dict[str, Any]:
    """One simulated mean against one real mean."""
    r = ratio(sim_mean_s, real_mean_s)
    return {
        "sim_mean_jct_s": sim_mean_s,
        "real_mean_e2e_s": real_mean_s,
        "sim_over_real": r,
        "within_15pct": None if r is None else abs(r - 1.0) <= TOLERANCE,
    }


def within_summary(comparison: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """How many (trace, policy) pairs are within the tolerance, and the misses."""
    rows = {f"{t}/{p}": c["sim_over_real"] for t, per in comparison.items() for p, c in per.items()}
    errors = [abs(r - 1.0) for r in rows.values() if r is not None]
    misses = {k: r for k, r in rows.items() if r is None or abs(r - 1.0) > TOLERANCE}
    return {
        "num": len(rows),
        "num_within": len(rows) - len(misses),
        "all_within": bool(rows) and not misses,
        "max_abs_error": max(errors, default=None),
        "misses": misses,
    }


def _simulate_on(
    policy: str,
    trace: list[TraceRequest],
    engine: SuiteEngine,
    step: StepTimeModel,
    calib: str | None,
) -> dict[str, Any]:
    return simulate(
        policy,
        None if policy == "fcfs" else {},
        trace,
        max_num_seqs=engine.max_num_seqs,
        calibration_file=calib,
        t0=step.t0,
        t_decode=step.t_decode,
        t_prefill=step.t_prefill,
        t_attn=step.t_attn,
        kv_tokens=engine.kv_tokens,
        block_size=engine.block_size,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
    )


def real_burst_makespans(suite: Mapping[str, Any], family: str) -> list[float]:
    """The real fcfs burst makespans of ``family``: every fcfs replay of the
    suite's burst trace of that family (round 0's is also the capacity
    measurement), else the capacity measurement alone."""
    walls = [
        float(r["wall_s"])
        for t in suite["traces"].values()
        if t["family"] == family and t["load"] is None
        for r in t.get("replays", [])
        if r["policy"] == "fcfs"
    ]
    cap = suite.get("capacity", {}).get(family)
    return walls or ([float(cap["makespan_s"])] if cap else [])


def burst_calibration(
    suite: Mapping[str, Any],
    family: str,
    engine: SuiteEngine,
    step: StepTimeModel,
    calib: str | None,
) -> dict[str, Any] | None:
    """One speed factor for the step model: the median real fcfs burst
    makespan of ``family`` over the simulated one. A burst's fcfs schedule
    does not depend on the clock, so the simulated makespan scales exactly
    with the factor. None without a measurement."""
    real = real_burst_makespans(suite, family)
    names = sorted(
        (n for n, t in suite["traces"].items() if t["family"] == family),
        key=lambda n: suite["traces"][n]["load"] is not None,
    )
    if not real or not names:
        return None
    trace = suite_trace(suite, names[0], burst=True)
    sim = _simulate_on("fcfs", trace, engine, step, calib)["makespan_s"]
    return {
        "scale": statistics.median(real) / sim,
        "real_fcfs_burst_makespans_s": real,
        "sim_fcfs_burst_makespan_s": sim,
        "num_requests": len(trace),
    }


def _real_stats(t: Mapping[str, Any], policy: str) -> tuple[dict[str, Any], list[float]]:
    per_round = [
        r["classes"]["all"]["mean_e2e_s"] for r in t.get("replays", []) if r["policy"] == policy
    ]
    return t["policies"].get(policy, {}), per_round


def compare_trace(
    t: Mapping[str, Any],
    sim: Mapping[str, Mapping[str, Any]],
    sim_default: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per policy: the headline comparison, the default step model's, the
    real per-round means and, for traces with classes, per class."""
    out: dict[str, dict[str, Any]] = {}
    for policy, s in sim.items():
        real, per_round = _real_stats(t, policy)
        real_all = real.get("all", {}).get("mean_e2e_s")
        default = compare(sim_default[policy]["mean_jct_s"], real_all)
        out[policy] = {
            **compare(s["mean_jct_s"], real_all),
            "real_mean_e2e_s_per_round": per_round,
            "default_step_model": {k: default[k] for k in ("sim_mean_jct_s", "sim_over_real")},
            "per_class": {
                cls: compare(s.get(f"{cls}_mean_jct_s"), real[cls]["mean_e2e_s"])
                for cls in ("short", "long")
                if cls in real
            },
        }
    return out


def _max_over_min(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) / min(vals) if vals and min(vals) > 0 else None


def spread_diagnostics(per: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """How far apart the policies are, simulated and real, and the rounds of
    one policy: where the simulator finds one schedule for every policy, the
    real spread is the measurement's noise, which no step model removes."""
    rounds = [_max_over_min(c["real_mean_e2e_s_per_round"]) for c in per.values()]
    return {
        "sim_max_over_min_across_policies": _max_over_min(
            [c["sim_mean_jct_s"] for c in per.values()]
        ),
        "real_max_over_min_across_policies": _max_over_min(
            [c["real_mean_e2e_s"] for c in per.values()]
        ),
        "real_max_over_min_across_rounds": max((r for r in rounds if r is not None), default=None),
    }


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" + ("" if abs(v - 1.0) <= TOLERANCE else " !")


def print_comparison(comparison: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """Per trace and policy: real mean E2E (pooled, and the per-round
    range), simulated mean JCT under both step models, each over the real;
    ``!`` marks a miss of the tolerance."""
    print(
        f"{'trace':14s} {'policy':10s} {'real':>7s} {'real rounds':>11s} "
        f"{'sim default':>11s} {'x real':>7s} {'sim calib':>9s} {'x real':>7s}"
    )
    for trace, per in comparison.items():
        for policy, c in per.items():
            rounds = c["real_mean_e2e_s_per_round"]
            span = f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "-"
            d = c["default_step_model"]
            print(
                f"{trace:14s} {policy:10s} {_fmt_s(c['real_mean_e2e_s']):>7s} {span:>11s} "
                f"{_fmt_s(d['sim_mean_jct_s']):>11s} {_fmt_x(d['sim_over_real']):>7s} "
                f"{_fmt_s(c['sim_mean_jct_s']):>9s} {_fmt_x(c['sim_over_real']):>7s}"
            )
            for cls, cc in c["per_class"].items():
                print(
                    f"{'':14s} {'  ' + cls:10s} {_fmt_s(cc['real_mean_e2e_s']):>7s} {'':>11s} "
                    f"{'':>11s} {'':>7s} {_fmt_s(cc['sim_mean_jct_s']):>9s} "
                    f"{_fmt_x(cc['sim_over_real']):>7s}"
                )


def run_from_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Simulate every policy of a ``benchmarks.serve_suite`` result on its
    own traces and engine settings; compare with the real mean E2E."""
    from vllm_esp.core.costmodel import default_calibration_path
    from vllm_esp.integration.cost_model import device_kind

    suite = json.loads(Path(args.from_suite).read_text())
    meta = run_metadata(seed=suite.get("seed"))
    names = [n for n in (args.traces or "").split(",") if n] or default_traces(suite)
    if unknown := [n for n in names if n not in suite["traces"]]:
        raise SystemExit(f"unknown traces {unknown}; the suite has {list(suite['traces'])}")
    engine = suite_engine(suite, args.block_size)
    calib_path = default_calibration_path(suite["model"], device_kind())
    calib = str(calib_path) if calib_path.is_file() else None
    default_step = StepTimeModel(args.t0, args.t_decode, args.t_prefill, args.t_attn)
    policies = list(suite["schedulers"])
    families = dict.fromkeys(suite["traces"][n]["family"] for n in names)
    calibration = {
        f: burst_calibration(suite, f, engine, default_step, calib)
        for f in (families if args.calibration == "burst" else ())
    }
    comparison: dict[str, dict[str, dict[str, Any]]] = {}
    simulated: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    for name in names:
        trace = suite_trace(suite, name)
        cal = calibration.get(suite["traces"][name]["family"])
        sim_default = {p: _simulate_on(p, trace, engine, default_step, calib) for p in policies}
        sim = sim_default
        if cal is not None:
            step = default_step.scaled(cal["scale"])
            sim = {p: _simulate_on(p, trace, engine, step, calib) for p in policies}
        used[name] = "default" if cal is None else "calibrated"
        simulated[name] = {"default": sim_default, "calibrated": None if cal is None else sim}
        comparison[name] = compare_trace(suite["traces"][name], sim, sim_default)
    default_only = {
        t: {p: c["default_step_model"] for p, c in per.items()} for t, per in comparison.items()
    }
    print(
        f"SIMULATED mean JCT vs the real server's mean E2E ({args.from_suite}); engine "
        f"{asdict(engine)}; default step model {asdict(default_step)}; burst calibration "
        + ", ".join(f"{f} x{c['scale']:.3f}" for f, c in calibration.items() if c)
    )
    print_comparison(comparison)
    diagnostics = {t: spread_diagnostics(per) for t, per in comparison.items()}
    one_schedule = [
        t
        for t, d in diagnostics.items()
        if (d["sim_max_over_min_across_policies"] or 0.0) < 1.0 + 1e-9
    ]
    within: dict[str, Any] = {
        "rule": "|sim mean JCT / real mean E2E - 1| <= 0.15 per trace and policy; the real "
        "mean pools every round's requests",
        "headline": used,
        "headline_summary": within_summary(comparison),
        "default_step_model": within_summary(default_only),
    }
    result: dict[str, Any] = {
        "benchmark": "sim_jct",
        "mode": "from_suite",
        "label": "SIMULATED (benchmarks.sim_jct) against REAL (benchmarks.serve_suite over HTTP)",
        "suite_file": str(args.from_suite),
        "suite": {k: suite.get(k) for k in ("quick", "model", "rounds", "seed", "server_flags")}
        | {"git": suite.get("metadata", {}).get("git")},
        "engine": asdict(engine),
        "calibration_file": calib,
        "step_time_model_s": {
            "formula": "t0 + t_decode * num_decode_reqs + t_prefill * num_prefill_tokens"
            " + t_attn * attended keys (sum of q * (c + (q + 1) / 2) over the step's chunks)",
            "default": asdict(default_step),
            "calibrated": {
                f: None if c is None else {**asdict(default_step.scaled(c["scale"])), **c}
                for f, c in calibration.items()
            },
            "calibration_method": (
                "none"
                if args.calibration == "none"
                else "one speed factor per trace family: the median real fcfs burst makespan "
                "(every fcfs replay of the family's burst trace, else the suite's capacity "
                "burst) over the simulated one, applied to every term alike"
            ),
            "used_per_trace": used,
        },
        "comparison": comparison,
        "within_15pct": within,
        "diagnostics": diagnostics,
        "simulated": simulated,
        "notes": [
            "The real E2E includes what the simulator does not model: HTTP, streaming, "
            "tokenization and the machine's speed drift between replays (the per-round "
            "real means show it).",
            "The real gittins server learns its length distributions over the whole run "
            "(every earlier trace and round); the simulated one starts from its prior.",
            f"Simulated, every policy has the same mean JCT on {one_schedule} (one "
            "schedule): no request waits for a slot, so the policies' real differences there "
            "are measurement noise.",
            "Arrivals are redrawn from the suite's seed and each trace's rate (the "
            "generators' arrival stream); lengths and classes come from the JSON.",
        ],
        "metadata": finish_metadata(meta),
    }
    write_json(args.out, result)
    for model, s in (
        ("headline", within["headline_summary"]),
        ("default step model", within["default_step_model"]),
    ):
        print(f"within 15% ({model}): {s['num_within']}/{s['num']}; misses {s['misses']}")
    return result
