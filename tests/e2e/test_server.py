"""The OpenAI-compatible server with ``--scheduler mlfq``, over HTTP.

Started the way the README tells users to (``vllm-esp serve``, i.e.
``python -m vllm_esp.cli serve``, which accepts exactly ``vllm serve``'s
flags), with the same engine settings as the offline runs.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from vllm_esp.harness.offline import MAX_TOKENS, PROMPTS
from vllm_esp.harness.serve import complete, cpu_env, free_port, running_server, serve_cmd

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server():
    with running_server(serve_cmd(free_port(), "--scheduler", "mlfq")) as base:
        yield base


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
    proc = subprocess.run(
        serve_cmd(free_port(), *flags), env=cpu_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "EngineCore" not in proc.stderr  # refused before anything was spawned
    assert time.time() - start < 60
