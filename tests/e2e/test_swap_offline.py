"""``mlfq-swap`` on the real engine: preemption by host KV swap.

The same prompts and engine settings as ``test_offline_equality.py`` (a KV
cache of ~1,500 tokens for 24 requests of up to ~450, four at a time), so
the MLFQ scheduler preempts constantly. Two engines (the only two this
file starts): a roomy host pool, where every preempted request must come
back without recomputing a token, and a tiny one, where most preemptions
fall back to recompute. Both must produce stock vLLM's greedy tokens.

EngineCore runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
the worker is still its own process) so the tests can read the scheduler:
its counters, its block pools, and what it scheduled for every resumed
request.
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
    attach_esp_logger,
    engine_core_in_process,
    exported_counters,
    leak_report,
)

pytestmark = pytest.mark.engine


def run_swap(swap: dict, with_aborts: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=small_model_path(),
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=KV_BYTES,
        block_size=BLOCK_SIZE,
        **ENGINE_KWARGS,
        # FastServe's depth (8 levels) with quantum demotion: more rank
        # changes, more preemption.
        **vllm_esp.scheduler_args("mlfq-swap", swap=swap, num_levels=8, demote_by_value=False),
    )
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        recorder = ResumeRecorder(scheduler)
        attach_esp_logger(llm)
        exported_before = exported_counters()
        params = [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS
        ]
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False
        )
        scheduler.check_invariants()
        exported = exported_counters()
        result = {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "preemptions": sum(o.metrics.num_preemptions for o in outs),
            "stats": {k.removeprefix("vllm_esp:"): v for k, v in scheduler.plugin_stats().items()},
            "exported": {k: v - exported_before.get(k, 0.0) for k, v in exported.items()},
            "resumes": list(recorder.resumes),
            "leaks": leak_report(scheduler),
        }
        if with_aborts:
            result["aborts"] = abort_while_swapped(llm, scheduler, params)
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def swap_runs() -> dict[str, dict]:
    with engine_core_in_process():
        return {
            # ~11 MiB of host pool: room for every request's KV.
            "roomy": run_swap({"host_pool_blocks": 512}, with_aborts=True),
            # 8 blocks (256 tokens): most victims do not fit.
            "tiny": run_swap({"host_pool_blocks": 8}, with_aborts=False),
        }


def test_stock_run_is_unpreempted(offline_outputs):
    assert offline_outputs["fcfs"]["preemptions"] == 0


@pytest.mark.parametrize("run", ["roomy", "tiny"])
def test_greedy_outputs_equal_stock_vllm(swap_runs, offline_outputs, run):
    assert swap_runs[run]["tokens"] == offline_outputs["fcfs"]["tokens"]


def test_preemption_was_heavy_and_went_through_the_host(swap_runs):
    r = swap_runs["roomy"]
    assert r["preemptions"] >= 10
    stats = r["stats"]
    assert stats["swap_out_blocks_total"] > 50 and stats["swap_in_blocks_total"] > 50
    assert (
        stats["swap_out_bytes_total"] == stats["swap_out_blocks_total"] * 32 * 1024
    )  # small model: 32 KiB/block
    assert stats["swap_out_time_us_total"] > 0 and stats["swap_in_time_us_total"] > 0
    assert stats["swap_recompute_fallbacks_total"] == 0


def test_swap_counters_reach_prometheus(swap_runs):
    r = swap_runs["roomy"]
    stats, exported = r["stats"], r["exported"]
    for key in (
        "swap_out_bytes_total",
        "swap_in_bytes_total",
        "swap_out_blocks_total",
        "swap_recompute_fallbacks_total",
        "recomputed_tokens_total",
    ):
        assert exported[f"vllm_esp:{key}"] == stats[key], key
    assert exported["vllm_esp:swap_out_seconds_total"] == pytest.approx(
        stats["swap_out_time_us_total"] / 1e6
    )
    assert swap_runs["tiny"]["exported"]["vllm_esp:swap_recompute_fallbacks_total"] > 0


def test_swapped_requests_are_not_recomputed(swap_runs):
    r = swap_runs["roomy"]
    assert len(r["resumes"]) >= 10
    # Every resume starts at (at least) the most tokens it ever had computed.
    assert [x for x in r["resumes"] if x[2] < x[1]] == []
    assert r["stats"]["recomputed_tokens_total"] == 0


def test_full_host_pool_falls_back_to_recompute_and_completes(swap_runs):
    r = swap_runs["tiny"]
    assert r["stats"]["swap_recompute_fallbacks_total"] > 0
    recomputed = [x for x in r["resumes"] if x[2] < x[1]]
    assert recomputed, "the tiny pool should have forced some recompute"
    assert r["stats"]["recomputed_tokens_total"] >= sum(
        before - start for _, before, start in recomputed
    )


@pytest.mark.parametrize("run", ["roomy", "tiny"])
def test_no_device_or_host_block_leaks(swap_runs, run):
    leaks = swap_runs[run]["leaks"]
    assert leaks["device_free"] == leaks["device_total"]
    assert leaks["host_free"] == leaks["host_total"]
    assert leaks["copies"] == 0 and leaks["requests"] == 0


def test_aborts_of_swapped_requests_leak_nothing(swap_runs):
    aborts = swap_runs["roomy"]["aborts"]
    assert aborts["num_aborted"] >= 3
    assert "swapped" in aborts["aborted_states"]
    leaks = aborts["leaks"]
    assert leaks["device_free"] == leaks["device_total"]
    assert leaks["host_free"] == leaks["host_total"]
    assert leaks["copies"] == 0 and leaks["requests"] == 0
