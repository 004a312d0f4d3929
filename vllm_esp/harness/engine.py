"""Shared settings for tests that start the real vLLM engine on CPU."""

from __future__ import annotations

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


def random_prompts(n: int, seed: int, vocab: int = 2000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 400, size=n)
    return [rng.integers(5, vocab, size=int(k)).tolist() for k in lengths]


def instance_index_rpc():
    """A function RPC, as ``LLM.collective_rpc`` sends: each ESP instance
    answers its index plus ``offset``. Built in a closure so cloudpickle
    ships it by value (this module is not importable in the instances'
    processes)."""

    def instance_index(worker, offset: int = 0) -> int:
        return worker.esp_counters()["instance"] + offset

    return instance_index
