"""The OpenAI server as tests, benchmarks and the demo start it: a free port,
the process started and awaited on ``/health``, a command line for the
heavy-preemption workload and a greedy completion over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import requests

from vllm_esp.harness.engine import small_model_path
from vllm_esp.harness.offline import BLOCK_SIZE, KV_BYTES, MAX_NUM_SEQS


def serve_cmd(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm_esp.cli",
        "serve",
        small_model_path(),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--seed",
        "0",
        "--gpu-memory-utilization",
        "0.3",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--block-size",
        str(BLOCK_SIZE),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-num-batched-tokens",
        "512",
        *extra,
    ]


def complete(base: str, prompt: list[int], max_tokens: int) -> list[int]:
    r = requests.post(
        f"{base}/v1/completions",
        timeout=300,
        json={
            "model": small_model_path(),
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    return env


@contextlib.contextmanager
def running_server(cmd: list[str], timeout_s: float = 300) -> Iterator[str]:
    """Start an OpenAI server (``cmd`` ends with its flags), wait for
    ``/health``, yield its base URL, terminate it on exit."""
    port = cmd[cmd.index("--port") + 1]
    proc = subprocess.Popen(
        cmd, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                stderr = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"server exited {proc.returncode}: {stderr[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"server did not become healthy in {timeout_s:.0f} s")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
