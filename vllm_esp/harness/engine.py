"""Shared settings for tests that start the real vLLM engine on CPU."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import numpy as np

#: Every engine in the tests: small model, float32 (deterministic greedy
#: argmax across batch shapes), a bounded KV cache, eager mode.
ENGINE_KWARGS = dict(
    dtype="float32",
    max_model_len=1024,
    enforce_eager=True,
    seed=0,
    gpu_memory_utilization=0.3,
    disable_log_stats=False,
)


def small_model_path() -> str:
    """The ``small`` preset, built (deterministically, once) into the cache."""
    from vllm_esp.models import build_model

    return str(build_model("small"))


small_model_path.__test__ = False  # not a test, despite the name


def random_prompts(n: int, seed: int, vocab: int = 2000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 400, size=n)
    return [rng.integers(5, vocab, size=int(k)).tolist() for k in lengths]


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
    import requests

    port = cmd[cmd.index("--port") + 1]
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
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


def instance_index_rpc():
    """A function RPC, as ``LLM.collective_rpc`` sends: each ESP instance
    answers its index plus ``offset``. Built in a closure so cloudpickle
    ships it by value (this module is not importable in the instances'
    processes)."""
    def instance_index(worker, offset: int = 0) -> int:
        return worker.esp_counters()["instance"] + offset

    return instance_index
