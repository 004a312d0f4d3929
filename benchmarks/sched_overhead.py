"""Per-step CPU cost of the MLFQ scheduler versus vLLM's stock scheduler.

    python -m benchmarks.sched_overhead [--quick] [--no-profile] --out FILE.json

No engine and no model weights: both schedulers are the real classes with a
real ``KVCacheManager``, built from a config-only model folder exactly as the
scheduler tests do (``vllm_esp/harness/scheduler.py``); the model runner is replaced by
fabricated outputs (one sampled token per request that finished its prompt).

For each system size N (1,000, 5,000 and 10,000 unfinished requests) both
schedulers are fed the same seeded request stream; whenever requests
finish, new ones are added so N stays constant (a steady state, not a
draining queue). They run in lockstep, one step of each in turn with the
order flipped every step, because these machines drift in speed within
seconds: a step of each, back to back, sees the same machine. After a
warm-up, each step's ``schedule()`` and ``update_from_output()`` are timed
separately with ``perf_counter_ns``; adding requests and fabricating
outputs are not timed, because the model runner and the front end pay for
those, not the scheduler. Each round of step pairs gives one paired ratio;
the JSON keeps every round's.

``max_num_seqs`` is 256 and the KV cache is large enough for 256 requests of
the longest length, so the binding limit is the number of sequences and
thousands of requests wait: the regime where a ranked scheduler has the most
bookkeeping to do. A cProfile pass of the MLFQ scheduler per size (skip with
``--no-profile``) runs after the timed runs, so profiling never inflates the
timings; its top functions are stored in the JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from vllm.v1.core.sched.scheduler import Scheduler

from benchmarks.common import (
    finish_metadata,
    percentile,
    ratio,
    run_metadata,
    write_json,
)
from vllm_esp.harness import scheduler as sched_harness
from vllm_esp.integration.engine_args import scheduler_args
from vllm_esp.integration.mlfq.scheduler import MLFQScheduler

#: Engine-like settings shared by both schedulers.
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192
BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096
#: Prompt and output lengths are log-uniform in these ranges (ShareGPT-like
#: spread: many short, a long tail).
PROMPT_RANGE = (16, 1024)
OUTPUT_RANGE = (8, 512)
#: Enough blocks for MAX_NUM_SEQS requests at the longest prompt + output,
#: so memory is not the binding limit (+25% headroom).
NUM_BLOCKS = int(MAX_NUM_SEQS * (PROMPT_RANGE[1] + OUTPUT_RANGE[1]) / BLOCK_SIZE * 1.25)


@dataclass
class RequestStream:
    """Seeded, endless source of requests; identical for every scheduler."""

    seed: int
    vocab_size: int = 1000

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.count = 0

    def _log_uniform(self, lo: int, hi: int) -> int:
        return round(float(np.exp(self.rng.uniform(np.log(lo), np.log(hi)))))

    def next(self):
        n_prompt = self._log_uniform(*PROMPT_RANGE)
        n_out = self._log_uniform(*OUTPUT_RANGE)
        # Random ids: no accidental prefix-cache hits between requests.
        ids = self.rng.integers(1, self.vocab_size, size=n_prompt).tolist()
        rid = f"r{self.count}"
        self.count += 1
        return sched_harness.make_request(
            rid, n_prompt, n_out, block_size=BLOCK_SIZE, prompt_token_ids=ids
        )


def build(kind: str, model_dir: str, mlfq_settings: dict[str, Any] | None = None):
    """A fresh scheduler: ``stock`` (vLLM ``Scheduler``) or ``mlfq``."""
    common = dict(
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_model_len=MAX_MODEL_LEN,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
    )
    if kind == "stock":
        return sched_harness.create_scheduler(model_dir, scheduler_cls=Scheduler, **common)
    if kind == "mlfq":
        # The same additional_config the engine gets from scheduler_args().
        extra = scheduler_args("mlfq", **(mlfq_settings or {}))["additional_config"]
        return sched_harness.create_scheduler(
            model_dir, scheduler_cls=MLFQScheduler, additional_config=extra, **common
        )
    raise ValueError(kind)


class _System:
    """One scheduler kept at ``num_requests`` unfinished requests, stepped
    with fabricated model outputs; records what its measured steps cost."""

    def __init__(
        self,
        kind: str,
        model_dir: str,
        num_requests: int,
        seed: int,
        mlfq_settings: dict[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.num_requests = num_requests
        self.scheduler = build(kind, model_dir, mlfq_settings)
        self.stream = RequestStream(seed)
        for _ in range(num_requests):
            self.scheduler.add_request(self.stream.next())
        self.sched_ns: list[int] = []
        self.update_ns: list[int] = []
        self.scheduled_per_step: list[int] = []
        self.tokens_per_step: list[int] = []
        # len(scheduler.running) after schedule(): for MLFQ this includes
        # paused residents (they keep KV and stay in `running`), which is
        # what its per-step planning walks.
        self.residents_per_step: list[int] = []
        self.num_finished = 0

    def step(self, measure: bool, profiler: cProfile.Profile | None = None) -> None:
        scheduler = self.scheduler
        if not measure:
            profiler = None
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter_ns()
        out = scheduler.schedule()
        t1 = time.perf_counter_ns()
        if profiler is not None:
            profiler.disable()
        model_out = sched_harness.fake_output(scheduler, out)
        if profiler is not None:
            profiler.enable()
        t2 = time.perf_counter_ns()
        engine_outputs = scheduler.update_from_output(out, model_out)
        t3 = time.perf_counter_ns()
        if profiler is not None:
            profiler.disable()
        finished = sum(
            1 for eco in engine_outputs.values() for o in eco.outputs if o.finish_reason is not None
        )
        self.num_finished += finished
        # Refill so the system size stays at num_requests (not timed).
        for _ in range(finished):
            scheduler.add_request(self.stream.next())
        if measure:
            self.sched_ns.append(t1 - t0)
            self.update_ns.append(t3 - t2)
            self.scheduled_per_step.append(len(out.num_scheduled_tokens))
            self.tokens_per_step.append(out.total_num_scheduled_tokens)
            self.residents_per_step.append(len(scheduler.running))

    def result(self, first: int = 0, last: int | None = None) -> dict[str, Any]:
        """Figures over measured steps ``first:last``."""
        window = slice(first, last)
        sched_ns, update_ns = self.sched_ns[window], self.update_ns[window]
        total_ms = [(a + b) / 1e6 for a, b in zip(sched_ns, update_ns)]
        scheduler = self.scheduler
        result: dict[str, Any] = {
            "scheduler": self.kind,
            "num_requests_in_system": self.num_requests,
            "steps_measured": len(total_ms),
            "mean_step_ms": statistics.fmean(total_ms),
            "median_step_ms": statistics.median(total_ms),
            "p99_step_ms": percentile(total_ms, 99),
            "mean_schedule_ms": statistics.fmean(sched_ns) / 1e6,
            "mean_update_ms": statistics.fmean(update_ns) / 1e6,
            "mean_scheduled_reqs_per_step": statistics.fmean(self.scheduled_per_step[window]),
            "mean_scheduled_tokens_per_step": statistics.fmean(self.tokens_per_step[window]),
            "mean_resident_reqs": statistics.fmean(self.residents_per_step[window]),
            "num_finished_total": self.num_finished,
            "num_running_end": len(scheduler.running),
            "num_waiting_end": len(scheduler.waiting),
            "free_blocks_end": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        }
        if isinstance(scheduler, MLFQScheduler):
            stats = scheduler.rank_policy.stats()
            result["mlfq"] = {
                "rank_preemptions": scheduler.num_rank_preemptions,
                "paused_request_steps": scheduler.num_paused_steps,
                "requests_per_level_end": stats.num_requests_per_level,
                "demotions": stats.num_demotions,
                "promotions": stats.num_promotions,
                "cost_model_source": scheduler.cost_model.source,
            }
        return result


def run_lockstep(
    model_dir: str,
    num_requests: int,
    warmup: int,
    steps_per_round: int,
    num_rounds: int,
    seed: int,
    mlfq_settings: dict[str, Any] | None = None,
) -> tuple[dict[str, _System], list[dict[str, Any]]]:
    """Step stock and MLFQ in lockstep on the same seeded stream, one step
    of each in turn, the order flipped every step (A B, B A, ...).

    These machines drift in speed by up to 3x within minutes, so two runs
    seconds apart can differ by more than the schedulers do; a step of
    each, back to back, sees the same machine. A round is
    ``steps_per_round`` consecutive step pairs; its paired ratio is the
    ratio of the two schedulers' mean step times over those pairs."""
    systems = {
        kind: _System(kind, model_dir, num_requests, seed, mlfq_settings)
        for kind in ("stock", "mlfq")
    }
    # Setup garbage is not the steps' cost: collect it, then freeze what
    # survives so the collector's passes over it do not land on one step.
    gc.collect()
    gc.freeze()
    try:
        for i in range(warmup + steps_per_round * num_rounds):
            order = ("stock", "mlfq") if i % 2 == 0 else ("mlfq", "stock")
            for kind in order:
                systems[kind].step(measure=i >= warmup)
    finally:
        gc.unfreeze()
    rounds = []
    for r in range(num_rounds):
        first, last = r * steps_per_round, (r + 1) * steps_per_round
        per_kind = {kind: system.result(first, last) for kind, system in systems.items()}
        rounds.append(_paired_ratios(per_kind))
    return systems, rounds


def run_one(
    kind: str,
    model_dir: str,
    num_requests: int,
    warmup: int,
    steps: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
    mlfq_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One scheduler alone (the profiling pass): ``warmup`` untimed steps,
    then ``steps`` timed ones."""
    system = _System(kind, model_dir, num_requests, seed, mlfq_settings)
    gc.collect()
    for i in range(warmup + steps):
        system.step(measure=i >= warmup, profiler=profiler)
    return system.result()


def profile_summary(profiler: cProfile.Profile, top: int = 25) -> dict[str, Any]:
    """Top functions by cumulative and by own time, as text and as rows."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({func})",
                "file": filename,
                "ncalls": nc,
                "tottime_s": tt,
                "cumtime_s": ct,
            }
        )
    by_cum = sorted(rows, key=lambda r: r["cumtime_s"], reverse=True)[:top]
    by_tot = sorted(rows, key=lambda r: r["tottime_s"], reverse=True)[:top]
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(top)
    return {"top_cumulative": by_cum, "top_own_time": by_tot, "text": buf.getvalue()}


def _paired_ratios(per_kind: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """mlfq over stock, one round of lockstep step pairs."""
    mlfq, stock = per_kind["mlfq"], per_kind["stock"]
    return {
        # MLFQ prefills newcomers at once and pauses demoted residents, so
        # its steps carry more tokens than stock's: its cost per token too.
        "per_token_mlfq_over_stock": ratio(
            mlfq["mean_step_ms"] / mlfq["mean_scheduled_tokens_per_step"],
            stock["mean_step_ms"] / stock["mean_scheduled_tokens_per_step"],
        ),
        "mean_step_mlfq_over_stock": ratio(mlfq["mean_step_ms"], stock["mean_step_ms"]),
        "median_step_mlfq_over_stock": ratio(mlfq["median_step_ms"], stock["median_step_ms"]),
        "schedule_mlfq_over_stock": ratio(mlfq["mean_schedule_ms"], stock["mean_schedule_ms"]),
        "update_mlfq_over_stock": ratio(mlfq["mean_update_ms"], stock["mean_update_ms"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of lockstep step pairs per size, one paired ratio each (default 5; 3 with --quick)",
    )
    parser.add_argument(
        "--mlfq-config",
        type=json.loads,
        default=None,
        help="MLFQ settings for the mlfq scheduler, e.g. '{\"max_paused_requests\": 256}'",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured step pairs per round (default 100; 30 with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 30; 10 with --quick)"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the cProfile pass of MLFQ per size (on by default: the ratio alone does not say where time goes)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.quick else 100)
    args.rounds = args.rounds or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (10 if args.quick else 30)

    meta = run_metadata(seed=args.seed)
    results: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = sched_harness.config_only_model(Path(tmp) / "model")
        for n in args.sizes:
            systems, rounds = run_lockstep(
                model_dir, n, warmup, steps, args.rounds, args.seed, args.mlfq_config
            )
            for kind, system in systems.items():
                r = system.result()
                r["warmup_steps"] = warmup
                results.append(r)
                print(
                    f"N={n:5d} {kind:5s}: "
                    f"mean {r['mean_step_ms']:.3f} ms/step "
                    f"(schedule {r['mean_schedule_ms']:.3f} + update "
                    f"{r['mean_update_ms']:.3f}), "
                    f"{r['mean_scheduled_reqs_per_step']:.0f} reqs/step, "
                    f"{r['mean_scheduled_tokens_per_step']:.0f} tokens/step, "
                    f"{r['mean_resident_reqs']:.0f} residents",
                    flush=True,
                )
            step_ratios = [x for x in (r["mean_step_mlfq_over_stock"] for r in rounds) if x]
            ratios[str(n)] = {
                "rounds": rounds,
                "mean_step_mlfq_over_stock": statistics.median(step_ratios),
                "min": min(step_ratios),
                "max": max(step_ratios),
            }
            print(
                f"N={n:5d} ratio mlfq/stock (mean step), median of {args.rounds} rounds: "
                f"{ratios[str(n)]['mean_step_mlfq_over_stock']:.3f} "
                f"[{ratios[str(n)]['min']:.3f}, {ratios[str(n)]['max']:.3f}] "
                f"rounds {', '.join(f'{x:.3f}' for x in step_ratios)}",
                flush=True,
            )

        profiles: dict[str, Any] | None = None
        if args.profile:
            profiles = {}
            for n in args.sizes:
                profiler = cProfile.Profile()
                run_one(
                    "mlfq",
                    model_dir,
                    n,
                    warmup,
                    min(steps, 100),
                    args.seed,
                    profiler,
                    args.mlfq_config,
                )
                profiles[str(n)] = profile_summary(profiler)
                print(
                    f"--- cProfile, MLFQ, N={n}, {min(steps, 100)} steps\n{profiles[str(n)]['text']}"
                )

    out = {
        "benchmark": "sched_overhead",
        "description": (
            "mean wall time of Scheduler.schedule() + update_from_output() per step, "
            "fabricated model outputs, constant number of unfinished requests"
        ),
        "settings": {
            "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "block_size": BLOCK_SIZE,
            "num_kv_blocks": NUM_BLOCKS,
            "max_model_len": MAX_MODEL_LEN,
            "prompt_len_range_log_uniform": PROMPT_RANGE,
            "output_len_range_log_uniform": OUTPUT_RANGE,
            "enable_prefix_caching": True,
            "enable_chunked_prefill": True,
            "steps_per_round": steps,
            "warmup_steps": warmup,
            "sizes": args.sizes,
            "rounds": args.rounds,
            "mlfq_config": args.mlfq_config,
            "quick": args.quick,
        },
        "target": "mean_step_mlfq_over_stock <= 1.1",
        "results": results,
        "ratios": ratios,
        "profile_mlfq": profiles,
        "metadata": finish_metadata(meta),
    }
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
