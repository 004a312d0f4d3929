"""ESP instances on a Ray cluster (``--esp-config '{"backend": "ray"}'``).

A real local Ray cluster (``ray start --head``, its own raylet, GCS and
worker processes) with two CPUs; the engine connects to it by address, as
it would to a multi-node cluster, places one instance per bundle of a
placement group, serves the stock run's prompts with the same greedy
tokens, and on shutdown gives every CPU back (actors killed, placement
group removed).
"""

from __future__ import annotations

import gc
import shutil
import subprocess
import time

import pytest

import vllm_esp
from vllm_esp.harness.engine import ENGINE_KWARGS, instance_index_rpc, small_model_path
from vllm_esp.harness.offline import (
    BLOCK_SIZE,
    KV_BYTES,
    MAX_NUM_SEQS,
    MAX_TOKENS,
    PROMPTS,
    engine_core_in_process,
)
from vllm_esp.harness.serve import free_port

pytestmark = [pytest.mark.engine, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def ray_cluster():
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.fail("the ray CLI is missing: scripts/setup.sh installs ray")
    port = free_port()
    subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True)


@pytest.fixture(scope="module")
def ray_run(ray_cluster) -> dict:
    import ray
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with engine_core_in_process():
        llm = LLM(
            model=small_model_path(),
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=512,
            kv_cache_memory_bytes=KV_BYTES,
            block_size=BLOCK_SIZE,
            **ENGINE_KWARGS,
            **vllm_esp.scheduler_args(
                "esp",
                esp={
                    "num_instances": 2,
                    "backend": "ray",
                    "ray_address": ray_cluster,
                    "placement": "threshold",
                    "prefill_target_ms": 0.001,
                },
            ),
        )
        try:
            executor = llm.llm_engine.engine_core.engine_core.model_executor
            kinds = [type(i).__name__ for i in executor.instances]
            nodes = [i.node_ip() for i in executor.instances]
            cpus_in_use = 2 - ray.available_resources().get("CPU", 0)
            params = [
                SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS
            ]
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False
            )
            counters = executor.esp_counters()
            function_rpc = executor.collective_rpc(instance_index_rpc(), kwargs={"offset": 10})
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        deadline = time.time() + 30
        while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.5)
        cpus_after = ray.available_resources().get("CPU", 0)
        ray.shutdown()
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "kinds": kinds,
        "nodes": nodes,
        "cpus_in_use": cpus_in_use,
        "cpus_after": cpus_after,
        "counters": counters,
        "function_rpc": function_rpc,
    }


def test_instances_are_ray_actors_in_the_placement_group(ray_run):
    assert ray_run["kinds"] == ["RayInstance", "RayInstance"]
    assert all(ray_run["nodes"])
    assert ray_run["cpus_in_use"] == 2  # one bundle (CPU) per instance


def test_ray_instances_serve_stock_greedy_tokens(ray_run, offline_outputs):
    assert ray_run["tokens"] == offline_outputs["fcfs"]["tokens"]
    # Both instances computed (prefill DoP 2) and exchanged partials.
    assert all(c["tokens_computed"] > 0 and c["bytes_sent"] > 0 for c in ray_run["counters"])


def test_shutdown_gives_every_cpu_back(ray_run):
    assert ray_run["cpus_after"] == 2


def test_function_rpcs_reach_every_instance(ray_run):
    assert ray_run["function_rpc"] == [10, 11]
