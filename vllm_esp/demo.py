"""The main job: serve a model with the MLFQ scheduler and replay ShareGPT.

    python -m vllm_esp.demo [--model PATH] [--scheduler mlfq] [--num-requests 100] [--rate 1.5]

Starts ``vllm-esp serve MODEL --scheduler ...`` (vLLM's own OpenAI server,
with the plugin's flag), replays a seeded ShareGPT trace against it over
HTTP in real time (Poisson arrivals, streamed completions so the time to
the first token is measured), prints a JCT summary and the scheduler's
queue state from ``/metrics``, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float = 600) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}; log:\n" + log_path.read_text()[-4000:]
            )
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout_s} s (log: {log_path})")


def stream_one(
    base: str, model: str, prompt_ids: list[int], max_tokens: int
) -> tuple[float, float, int]:
    """Returns (ttft_s, jct_s, num_tokens) measured from the send time."""
    import requests

    start = time.perf_counter()
    ttft = None
    n = 0
    with requests.post(
        f"{base}/v1/completions",
        stream=True,
        timeout=3600,
        json={
            "model": model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0].get("text") is not None:
                if ttft is None:
                    ttft = time.perf_counter() - start
                n += 1
    jct = time.perf_counter() - start
    return (ttft if ttft is not None else jct), jct, n


def replay(base: str, model: str, trace) -> list[tuple[float, float, int]]:
    results: list[tuple[float, float, int] | None] = [None] * len(trace)
    threads = []
    t0 = time.perf_counter()

    def run(i, req):
        results[i] = stream_one(base, model, list(req.prompt_token_ids), req.output_len)

    for i, req in enumerate(trace):
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=run, args=(i, req), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return [r for r in results if r is not None]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model folder (default: the built default preset)"
    )
    parser.add_argument("--scheduler", default="mlfq")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument(
        "--rate",
        type=float,
        default=1.5,
        help="Poisson arrival rate (requests/s); ~1.3/s saturates 2 cores",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    import requests
    from transformers import AutoTokenizer

    from vllm_esp.data.trace import make_sharegpt_trace
    from vllm_esp.models import build_model

    model = args.model or str(build_model("default"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    trace = make_sharegpt_trace(
        tokenizer,
        args.num_requests,
        args.rate,
        args.seed,
        max_prompt_len=1024,
        max_output_len=256,
        max_model_len=2048,
    )
    base = f"http://127.0.0.1:{args.port}"
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-esp-demo-{args.port}.log"
    print(f"starting `vllm-esp serve {model} --scheduler {args.scheduler}` (log: {log_path})")
    proc = start_server(model, args.scheduler, args.port, log_path)
    try:
        wait_healthy(proc, base, log_path)
        print(f"replaying {len(trace)} ShareGPT requests at {args.rate}/s (seed {args.seed})...")
        t0 = time.perf_counter()
        results = replay(base, model, trace)
        wall = time.perf_counter() - t0
        metrics = requests.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    ttfts = [r[0] for r in results]
    jcts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    print(f"\n== {args.scheduler}: {len(results)}/{len(trace)} requests finished in {wall:.1f} s")
    print(
        f"JCT  mean {statistics.mean(jcts):.2f} s  p50 {percentile(jcts, 50):.2f} s  "
        f"p99 {percentile(jcts, 99):.2f} s"
    )
    print(f"TTFT mean {statistics.mean(ttfts):.2f} s  p99 {percentile(ttfts, 99):.2f} s")
    print(f"throughput {tokens / wall:.1f} output tokens/s")
    wanted = (
        "vllm_esp:mlfq_demotions_total",
        "vllm_esp:mlfq_promotions_total",
        "vllm_esp:mlfq_rank_preemptions_total",
        "vllm:num_preemptions_total",
    )
    for line in metrics.splitlines():
        if line.startswith(wanted):
            print("  " + line)


if __name__ == "__main__":
    main()
