"""The OpenAI-compatible server with ``--scheduler mlfq``, over HTTP.

Started the way the README tells users to (``vllm-esp serve``, i.e.
``python -m vllm_esp.cli serve``, which accepts exactly ``vllm serve``'s
flags), with the same engine settings as the offline runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import BLOCK_SIZE, KV_BYTES, MAX_NUM_SEQS, MAX_TOKENS, PROMPTS

from vllm_esp.harness.engine import cpu_env, free_port, running_server, small_model_path

pytestmark = pytest.mark.engine


def serve_cmd(port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vllm_esp.cli", "serve", small_model_path(),
        "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
        "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(KV_BYTES),
        "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", "512", *extra,
    ]


@pytest.fixture(scope="module")
def server():
    with running_server(serve_cmd(free_port(), "--scheduler", "mlfq")) as base:
        yield base


def complete(base: str, prompt: list[int], max_tokens: int) -> list[int]:
    r = requests.post(f"{base}/v1/completions", timeout=300, json={
        "model": small_model_path(), "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
    })
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["token_ids"]


def test_http_greedy_outputs_equal_stock_offline(server, offline_outputs):
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        got = list(pool.map(lambda a: complete(server, *a), zip(PROMPTS, MAX_TOKENS)))
    assert got == offline_outputs["fcfs"]["tokens"]


def test_metrics_endpoint_exports_queue_state(server):
    complete(server, PROMPTS[0], 4)
    deadline = time.time() + 30
    text = ""
    while time.time() < deadline:
        text = requests.get(f"{server}/metrics", timeout=10).text
        if "vllm_esp:mlfq_queue_length" in text:
            break
        time.sleep(1)
    assert "vllm_esp:mlfq_queue_length" in text
    assert "vllm_esp:mlfq_demotions_total" in text
    assert "vllm_esp:mlfq_rank_preemptions_total" in text
    assert "vllm:num_preemptions" in text  # vLLM's own series are untouched


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduler", "lottery"], "invalid choice: 'lottery'"),
        (["--scheduler", "mlfq", "--mlfq-config", '{"num_levels": 0}'], "num_levels"),
        (["--scheduler", "mlfq", "--mlfq-config", '{"quantum": 3}'], "unknown MLFQ setting"),
    ],
)
def test_bad_flags_fail_before_starting_an_engine(flags, message):
    start = time.time()
    proc = subprocess.run(serve_cmd(free_port(), *flags), env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "EngineCore" not in proc.stderr  # refused before anything was spawned
    assert time.time() - start < 60
