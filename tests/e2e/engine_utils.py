"""Shared settings for tests that start the real vLLM engine on CPU."""

from __future__ import annotations

import os
import socket

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


def test_model_path() -> str:
    """The ``small`` preset, built (deterministically, once) into the cache."""
    from vllm_esp.models import build_model

    return str(build_model("small"))


test_model_path.__test__ = False  # not a test, despite the name


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
