"""The OpenAI-compatible server with ``--scheduler esp --esp-instances 2``, over HTTP.

Same engine settings as the stock offline run of ``conftest.py`` (per
instance), every elastic move forced (see ``test_esp_offline.py``); the
greedy tokens must equal stock vLLM's, ``/metrics`` must carry the ESP
series, and an oversized prompt must be refused without stopping the server.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from vllm_esp.harness.offline import MAX_TOKENS, PROMPTS
from vllm_esp.harness.serve import complete, free_port, running_server, serve_cmd

pytestmark = [pytest.mark.engine, pytest.mark.multiproc]

FORCED = {
    "placement": "threshold",
    "prefill_target_ms": 0.001,
    "decode_scale_up_batch": 0,
    "migrate_blocks_per_step": 2,
}


@pytest.fixture(scope="module")
def esp_server():
    cmd = serve_cmd(
        free_port(),
        "--scheduler",
        "esp",
        "--esp-instances",
        "2",
        "--esp-config",
        json.dumps(FORCED),
    )
    with running_server(cmd, timeout_s=400) as base:
        yield base


def test_http_greedy_outputs_equal_stock(esp_server, offline_outputs):
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda a: complete(esp_server, *a), zip(PROMPTS, MAX_TOKENS)))
    assert got == offline_outputs["fcfs"]["tokens"]


def _series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_export_esp_series(esp_server):
    complete(esp_server, PROMPTS[0], 4)
    deadline = time.time() + 30
    while True:
        text = requests.get(f"{esp_server}/metrics", timeout=10).text
        steps = _series(text, "vllm_esp:esp_request_steps_total")
        if (steps and max(steps.values()) > 0) or time.time() > deadline:
            break
        time.sleep(1)
    assert max(steps.values()) > 0
    free = _series(text, "vllm_esp:esp_instance_free_blocks")
    assert {re.search(r'instance="(\d+)"', k).group(1) for k in free} == {"0", "1"}
    assert max(_series(text, "vllm_esp:esp_multi_instance_prefills_total").values()) > 0
    assert "vllm:num_requests_running" in text  # vLLM's own metrics are still there


def test_oversized_prompt_refused_server_serves_on(esp_server, offline_outputs):
    r = requests.post(
        f"{esp_server}/v1/completions",
        timeout=60,
        json={"model": serve_cmd(0)[4], "prompt": [7] * 1200, "max_tokens": 4},
    )
    assert r.status_code == 400
    assert "maximum context length" in r.text
    assert complete(esp_server, PROMPTS[1], MAX_TOKENS[1]) == offline_outputs["fcfs"]["tokens"][1]
