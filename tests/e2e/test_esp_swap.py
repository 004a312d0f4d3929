"""MLFQ + host KV swap + ESP together: ``--scheduler esp --swap-config ...``.

The stock run's prompts (``conftest.py``) on two instances whose caches
together hold what one stock instance holds in ``test_swap_offline.py``
(so preemption is heavy), MLFQ with FastServe's 8 levels, prefill DoP 2
and forced scale-ups (so swapped KV leaves one instance and comes back on
another). Greedy tokens must equal stock vLLM's, every resume must start
from its swapped tokens (no recompute), both instances must move blocks to
and from host memory, and nothing may leak, aborts included.
"""

from __future__ import annotations

import gc

import pytest

import vllm_esp
from vllm_esp.harness.engine import ENGINE_KWARGS, small_model_path
from vllm_esp.harness.offline import (
    BLOCK_SIZE,
    KV_BYTES,
    MAX_NUM_SEQS,
    MAX_TOKENS,
    PROMPTS,
    ResumeRecorder,
    abort_while_swapped,
    engine_core_in_process,
    leak_report,
)

pytestmark = [pytest.mark.engine, pytest.mark.multiproc]

ESP = {
    "num_instances": 2,
    "placement": "threshold",
    "prefill_target_ms": 0.001,
    "decode_scale_up_batch": 0,
}


@pytest.fixture(scope="module")
def esp_swap_run() -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with engine_core_in_process():
        llm = LLM(
            model=small_model_path(),
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=512,
            kv_cache_memory_bytes=KV_BYTES // 2,
            block_size=BLOCK_SIZE,
            **ENGINE_KWARGS,
            **vllm_esp.scheduler_args(
                "esp",
                esp=ESP,
                swap={"host_pool_blocks": 512},
                num_levels=8,
                demote_by_value=False,
            ),
        )
        try:
            core = llm.llm_engine.engine_core.engine_core
            scheduler, executor = core.scheduler, core.model_executor
            recorder = ResumeRecorder(scheduler)
            params = [
                SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS
            ]
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False
            )
            scheduler.check_invariants()
            result = {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "preemptions": sum(o.metrics.num_preemptions for o in outs),
                "stats": {
                    k.removeprefix("vllm_esp:"): v for k, v in scheduler.plugin_stats().items()
                },
                "resumes": list(recorder.resumes),
                "instances": executor.esp_counters(),
                "leaks": leak_report(scheduler),
                "free": scheduler.free_queues.free_per_instance(),
                "blocks_per_instance": scheduler.blocks_per_instance,
            }
            result["aborts"] = abort_while_swapped(llm, scheduler, params)
            return result
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def test_greedy_outputs_equal_stock(esp_swap_run, offline_outputs):
    assert esp_swap_run["tokens"] == offline_outputs["fcfs"]["tokens"]


def test_swapped_requests_resume_without_recompute(esp_swap_run):
    r = esp_swap_run
    assert r["preemptions"] >= 5 and len(r["resumes"]) >= 5
    assert [x for x in r["resumes"] if x[2] < x[1]] == []
    assert r["stats"]["recomputed_tokens_total"] == 0
    assert r["stats"]["swap_recompute_fallbacks_total"] == 0


def test_both_instances_swap_through_host_memory(esp_swap_run):
    for inst in esp_swap_run["instances"]:
        assert inst["host_blocks_out"] > 0 and inst["host_blocks_in"] > 0
    stats = esp_swap_run["stats"]
    out_blocks = sum(i["host_blocks_out"] for i in esp_swap_run["instances"])
    assert out_blocks == stats["swap_out_blocks_total"]


def test_no_block_leaks_on_any_instance_or_host(esp_swap_run):
    for leaks in (esp_swap_run["leaks"], esp_swap_run["aborts"]["leaks"]):
        assert leaks["device_free"] == leaks["device_total"]
        assert leaks["host_free"] == leaks["host_total"]
        assert leaks["copies"] == 0 and leaks["requests"] == 0
    nb = esp_swap_run["blocks_per_instance"]
    assert esp_swap_run["free"] == [nb - 1, nb]
    assert esp_swap_run["aborts"]["num_aborted"] >= 3
