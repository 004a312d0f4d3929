"""A streaming HTTP client for the OpenAI server: one completion timed as a
user sees it, a whole trace replayed in real time, and a fixed CPU speed
probe. The demo and ``benchmarks.serve_suite`` share it.

Every request is a token prompt with greedy sampling and ``ignore_eos``, so
the server generates exactly ``max_tokens`` tokens (the trace's output
length) whatever the model predicts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from vllm_esp.data.trace import TraceRequest


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float = 600) -> None:
    """Poll ``/health`` until the server answers 200; raise with the tail of
    its log if it exits first or does not answer within ``timeout_s``."""
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
    """Returns (ttft_s, jct_s, num_tokens) measured from the send time.

    ``num_tokens`` is the server's ``usage.completion_tokens`` (a streamed
    chunk can carry several tokens when the client falls behind), or the
    number of chunks if the server sends no usage."""
    import requests

    start = time.perf_counter()
    ttft = None
    n = 0
    usage_tokens = None
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
            "stream_options": {"include_usage": True},
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
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
    jct = time.perf_counter() - start
    return (
        (ttft if ttft is not None else jct),
        jct,
        (usage_tokens if usage_tokens is not None else n),
    )


def replay(
    base: str, model: str, trace: list[TraceRequest], late_s: list[float] | None = None
) -> list[tuple[float, float, int]]:
    """Send every request of ``trace`` at its arrival time (one thread each)
    and wait for all of them: ``(ttft_s, e2e_s, num_tokens)`` per request,
    from its send time, in trace order. Requests that failed are left out, so a short
    result means some did not finish. ``late_s``, if given, receives each
    request's send time minus its arrival time (the client's own lateness),
    in trace order."""
    results: list[tuple[float, float, int] | None] = [None] * len(trace)
    late = [0.0] * len(trace)
    threads = []
    t0 = time.perf_counter()

    def run(i: int, req: TraceRequest) -> None:
        late[i] = time.perf_counter() - t0 - req.arrival_s
        results[i] = stream_one(base, model, list(req.prompt_token_ids or ()), req.output_len)

    for i, req in enumerate(trace):
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=run, args=(i, req), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if late_s is not None:
        late_s[:] = late
    return [r for r in results if r is not None]


def speed_probe() -> float:
    """Seconds for a fixed pure-Python workload: the machine's speed now."""
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i * i % 7
    return time.perf_counter() - start
