"""Resuming a preempted request: host KV swap-in against recompute, and the
copy engine's bandwidth against a plain copy, on the real engine.

    python -m benchmarks.swap [--quick] --out FILE.json [--model PRESET_OR_PATH]
                              [--lengths 256 512 ...] [--repeats N] [--seed N]

One ``mlfq-swap`` engine (the ``default`` preset unless ``--model``; one
request at a time; prefix caching off, so a recompute really recomputes
and a swap-in really loads everything; prefetch off, so the load happens
when the request resumes), with EngineCore in this process so the
benchmark can preempt a request by hand. For each context length L and
each repeat:

1. a request with an L-token prompt runs its prefill (alone);
2. it is preempted by hand between two steps: through the scheduler's
   swap path (``MLFQScheduler._preempt_request``: KV to host) or through
   vLLM's own ``Scheduler._preempt_request`` (KV freed: recompute);
3. the next engine step resumes it at once. By recompute, that step is an
   L+1-token prefill: ``recompute_s`` is its wall time. By swap, the step
   first copies the KV out (``handle_preemptions``; in service that
   happens at preemption time, steps earlier), then loads it back and
   computes one token: ``swap_in_s`` is the step's wall time minus the
   worker-timed swap-out copy (``swap_out_s``; CPU copies are
   synchronous); ``swap_in_copy_s`` is the load alone.

Medians over the repeats. Then, on the idle engine, the worker times its
copy engine moving ``L / block_size`` blocks in shuffled order each way,
and a plain ``Tensor.copy_`` of the same bytes between the same memories
(the same block range of each layer, contiguously), in the same process
(``measure_copy_bandwidth`` over ``collective_rpc``): ``copy_bandwidth_gbs``
(both directions) against ``reference_bandwidth_gbs``.
``live_copy_bandwidth_out_gbs`` is the swap-out of step 3 (cold data,
first-touch host pages), for comparison.

Targets: swap-in at least 5x faster than recompute at 2,048 tokens; copy
bandwidth at least 0.8 of the reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    finish_metadata,
    ratio,
    resolve_model,
    run_metadata,
    write_json,
)

LENGTHS = (256, 512, 1024, 2048, 4096)
BLOCK_SIZE = 32
HOST_POOL_BLOCKS = 512  # 16k tokens: a target of 4,096 tokens fits many times
KV_CACHE_TOKENS = 16384
#: Copy micro-benchmark rounds (milliseconds each; interleaved with the reference).
MICRO_REPEATS = 15


def kv_bytes_per_token(model_dir: str) -> int:
    """K and V bytes per token over all layers (bf16: vLLM-CPU's compute dtype)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * 2


def start_engine(model_dir: str, max_model_len: int, seed: int):
    from vllm import LLM

    from vllm_esp.integration.engine_args import scheduler_args

    return LLM(
        model=model_dir,
        max_num_seqs=1,
        max_num_batched_tokens=max_model_len,  # one prefill chunk, as a resume would get
        max_model_len=max_model_len,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=KV_CACHE_TOKENS * kv_bytes_per_token(model_dir),
        gpu_memory_utilization=0.2,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=seed,
        **scheduler_args(
            "mlfq-swap",
            swap={
                "host_pool_blocks": HOST_POOL_BLOCKS,
                "prefetch_depth": 0,
                "free_block_reserve": 0,
            },
        ),
    )


class Driver:
    """Steps an in-process engine and pokes its scheduler between steps."""

    def __init__(self, llm: Any, vocab_size: int, seed: int) -> None:
        self.engine = llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.n = 0

    def add(self, num_tokens: int, max_tokens: int) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.n += 1
        prompt = self.rng.integers(10, self.vocab_size - 1, size=num_tokens).tolist()
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )
        return self.engine.add_request(
            f"bench-{self.n}", TokensPrompt(prompt_token_ids=prompt), params
        )

    def step(self) -> float:
        t = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t

    def counters(self) -> dict[str, int]:
        return {k.removeprefix("vllm_esp:"): v for k, v in self.scheduler.plugin_stats().items()}

    def drain(self) -> None:
        for _ in range(10000):
            if not self.engine.has_unfinished_requests():
                return
            self.engine.step()
        raise RuntimeError("engine did not drain")

    def resume_once(self, num_tokens: int, swap: bool) -> dict[str, float]:
        """One preempt-and-resume of a ``num_tokens``-token request."""
        from vllm.v1.core.sched.scheduler import Scheduler

        s = self.scheduler
        target = self.add(num_tokens, max_tokens=64)
        self.step()  # prefill
        request = s.requests[target]
        assert request.num_computed_tokens == num_tokens, request.num_computed_tokens
        s.running.remove(request)
        before = self.counters()
        if swap:
            s._preempt_request(request, time.monotonic())  # ours: KV to host
            assert s.swap.swapped_tokens(target) == num_tokens
        else:
            Scheduler._preempt_request(s, request, time.monotonic())  # vLLM's: KV freed
        step_s = self.step()  # resumes at once: swap-out, then load + 1 token; or L + 1 tokens
        after = self.counters()
        self.engine.abort_request([target], internal=True)
        self.drain()
        delta = {
            k: after[k] - before[k]
            for k in (
                "recomputed_tokens_total",
                "swap_in_blocks_total",
                "swap_out_time_us_total",
                "swap_in_time_us_total",
            )
        }
        if swap:
            assert delta["swap_in_blocks_total"] == -(-num_tokens // BLOCK_SIZE), delta
            assert delta["recomputed_tokens_total"] == 0, delta
        else:
            assert delta["recomputed_tokens_total"] == num_tokens, delta
        swap_out_s = delta["swap_out_time_us_total"] / 1e6
        return {
            # In service the swap-out happens at preemption, steps earlier;
            # here it shares the resume step, so it is taken out (the
            # worker times it; on CPU the copies are synchronous).
            "resume_s": step_s - swap_out_s,
            "step_s": step_s,
            "swap_out_copy_s": swap_out_s,
            "swap_in_copy_s": delta["swap_in_time_us_total"] / 1e6,
        }


def measure_length(
    llm: Any, driver: Driver, num_tokens: int, repeats: int, block_bytes: int
) -> dict[str, Any]:
    from vllm_esp.integration.swap.connector import measure_copy_bandwidth

    swap = [driver.resume_once(num_tokens, swap=True) for _ in range(repeats)]
    recompute = [driver.resume_once(num_tokens, swap=False) for _ in range(repeats)]
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    (micro,) = llm.collective_rpc(measure_copy_bandwidth, args=(num_blocks, MICRO_REPEATS))
    nbytes = micro["bytes"]
    med = statistics.median
    row = {
        "tokens": num_tokens,
        "blocks": num_blocks,
        "bytes": int(nbytes),
        "swap_in_s": med(r["resume_s"] for r in swap),
        "swap_out_s": med(r["swap_out_copy_s"] for r in swap),
        "recompute_s": med(r["resume_s"] for r in recompute),
        "swap_in_copy_s": med(r["swap_in_copy_s"] for r in swap),
        "copy_bandwidth_gbs": 2 * nbytes / (micro["swap_out_s"] + micro["swap_in_s"]) / 1e9,
        "copy_bandwidth_out_gbs": nbytes / micro["swap_out_s"] / 1e9,
        "copy_bandwidth_in_gbs": nbytes / micro["swap_in_s"] / 1e9,
        "reference_bandwidth_gbs": nbytes / micro["reference_s"] / 1e9,
        "reference_flat_bandwidth_gbs": nbytes / micro["reference_flat_s"] / 1e9,
        "live_copy_bandwidth_out_gbs": None,
        "samples": {"swap": swap, "recompute": recompute, "copy_micro": micro},
    }
    if row["swap_out_s"] > 0:
        row["live_copy_bandwidth_out_gbs"] = num_blocks * block_bytes / row["swap_out_s"] / 1e9
    row["speedup_recompute_over_swap_in"] = ratio(row["recompute_s"], row["swap_in_s"])
    row["bandwidth_fraction_of_reference"] = ratio(
        row["copy_bandwidth_gbs"], row["reference_bandwidth_gbs"]
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="3 repeats per length (default 7)")
    parser.add_argument(
        "--model", default="default", help="vllm_esp.models preset name or model folder"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)

    meta = run_metadata(seed=args.seed)
    # EngineCore in this process: the benchmark preempts by hand between steps.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the KV size comes from KV_CACHE_TOKENS
    model_dir = resolve_model(args.model)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    max_model_len = max(args.lengths) + 128
    if max(args.lengths) + 64 > KV_CACHE_TOKENS // 2:
        raise SystemExit(
            f"lengths above {KV_CACHE_TOKENS // 2 - 64} do not fit the benchmark's KV cache"
        )
    t0 = time.perf_counter()
    llm = start_engine(model_dir, max_model_len, args.seed)
    engine_start_s = time.perf_counter() - t0
    try:
        driver = Driver(llm, cfg["vocab_size"], args.seed)
        swap = driver.scheduler.swap
        # Warm-up: first-call allocations of both paths and of the copies.
        driver.resume_once(min(args.lengths), swap=True)
        driver.resume_once(min(args.lengths), swap=False)
        rows = []
        for n in args.lengths:
            row = measure_length(llm, driver, n, repeats, swap.block_bytes)
            rows.append(row)
            print(
                f"{n:5d} tokens: resume by swap-in {row['swap_in_s'] * 1e3:8.2f} ms "
                f"(copy {row['swap_in_copy_s'] * 1e3:6.2f} ms), by recompute {row['recompute_s'] * 1e3:8.2f} ms "
                f"-> {row['speedup_recompute_over_swap_in']:.1f}x; swap-out {row['swap_out_s'] * 1e3:6.2f} ms; "
                f"copy {row['copy_bandwidth_gbs']:.2f} GB/s vs plain {row['reference_bandwidth_gbs']:.2f} GB/s",
                flush=True,
            )
        vllm_config = llm.llm_engine.vllm_config
        engine = {
            "scheduler": "mlfq-swap",
            "max_num_seqs": 1,
            "block_size": BLOCK_SIZE,
            "kv_cache_tokens": (vllm_config.cache_config.num_gpu_blocks or 0) * BLOCK_SIZE,
            "dtype": str(vllm_config.model_config.dtype),
            "enable_prefix_caching": False,
            "host_pool_blocks": swap.num_host_blocks,
            "kv_block_bytes": swap.block_bytes,
            "engine_start_s": engine_start_s,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    by_len = {r["tokens"]: r for r in rows}
    at_2048 = by_len.get(2048)
    out = {
        "benchmark": "swap",
        "quick": args.quick,
        "repeats": repeats,
        "model": {"arg": args.model, "path": model_dir, "config": cfg},
        "engine": engine,
        "method": __doc__.split("\n\n", 2)[2].strip(),
        "results": rows,
        "targets": {
            "swap_in_5x_faster_than_recompute_at_2048": (
                None if at_2048 is None else at_2048["recompute_s"] >= 5 * at_2048["swap_in_s"]
            ),
            "copy_bandwidth_ge_0.8_reference": all(
                r["copy_bandwidth_gbs"] >= 0.8 * r["reference_bandwidth_gbs"] for r in rows
            ),
            "copy_bandwidth_ge_0.8_reference_by_tokens": {
                str(r["tokens"]): r["copy_bandwidth_gbs"] >= 0.8 * r["reference_bandwidth_gbs"]
                for r in rows
            },
        },
    }
    out["metadata"] = finish_metadata(meta)
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['metadata']['wall_time_s']:.0f}s); targets: {out['targets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
