"""``--scheduler esp`` on the real engine: N = 2 instances (processes, gloo).

Two engines: stock vLLM (one instance with a cache large enough for every
prompt) and ESP with two instances whose caches are each too small for the
long prompt. The ESP engine is forced through every elastic move at once:

* prefill DoP 2 for every chunk (``prefill_target_ms`` tiny) with KV kept on
  the fewest instances (``prefill_storage="fewest"``: scale-down by shipping
  KV during the forward),
* a scale-up at every decode block boundary (``decode_scale_up_batch=0``),
* consolidation by migration (``migrate_blocks_per_step=2``),

and must still produce stock vLLM's greedy tokens. EngineCore runs in this
process so the tests can read the scheduler, its per-instance block pools
and the executor's counters.
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest

import vllm_esp
from vllm_esp.harness.engine import (
    ENGINE_KWARGS,
    instance_index_rpc,
    random_prompts,
    small_model_path,
)
from vllm_esp.harness.offline import engine_core_in_process

pytestmark = [pytest.mark.engine, pytest.mark.multiproc]

BLOCK_SIZE = 32
#: K+V x 2 layers x 2 KV heads x head_dim 32 x fp32 (the ``small`` preset).
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4
#: Per-instance cache: 50 blocks (1,600 tokens), too small for LONG_PROMPT.
INSTANCE_KV_TOKENS = 1600
MAX_MODEL_LEN = 2048
LONG_PROMPT_TOKENS = 1700
MAX_TOKENS = 40

PROMPTS = [
    *random_prompts(10, seed=5),
    np.random.default_rng(7).integers(5, 2000, size=LONG_PROMPT_TOKENS).tolist(),
]
LONG_INDEX = len(PROMPTS) - 1
FORCED = {
    "num_instances": 2,
    "placement": "threshold",
    "prefill_target_ms": 0.001,
    "prefill_storage": "fewest",
    "decode_scale_up_batch": 0,
    "migrate_blocks_per_step": 2,
}


def _engine_kwargs(kv_tokens: int) -> dict:
    kwargs = dict(ENGINE_KWARGS, max_model_len=MAX_MODEL_LEN)
    return dict(
        kwargs,
        max_num_seqs=4,
        max_num_batched_tokens=512,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=KV_BYTES_PER_TOKEN * kv_tokens,
    )


def _params():
    from vllm import SamplingParams

    return [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) for _ in PROMPTS
    ]


class PlanRecorder:
    """Wraps ``scheduler.schedule``: the instances holding each request's KV."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.inner = scheduler.schedule
        #: prompt length -> instances that held KV of that request
        self.holders: dict[int, set[int]] = {}
        self.num_moves = 0
        self.max_compute = 0
        scheduler.schedule = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        plan = out.esp_plan
        self.num_moves += len(plan.moves)
        for req in plan.requests:
            length = self.scheduler.requests[req.req_id].num_prompt_tokens
            self.holders.setdefault(length, set()).update(plan.holders(req))
            self.max_compute = max(self.max_compute, len(req.compute))
        return out


def free_blocks_report(scheduler) -> dict:
    free = scheduler.free_queues.free_per_instance()
    return {
        "free": free,
        "total": scheduler.blocks_per_instance,
        "requests": len(scheduler.requests),
    }


def run_stock() -> list[list[int]]:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    llm = LLM(model=small_model_path(), **_engine_kwargs(4 * INSTANCE_KV_TOKENS))
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], _params(), use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def run_esp(esp: dict) -> dict:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=small_model_path(),
        **_engine_kwargs(INSTANCE_KV_TOKENS),
        **vllm_esp.scheduler_args("esp", esp=esp),
    )
    try:
        core = llm.llm_engine.engine_core.engine_core
        scheduler, executor = core.scheduler, core.model_executor
        recorder = PlanRecorder(scheduler)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS], _params(), use_tqdm=False
        )
        result = {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "holders": {i: recorder.holders.get(len(p), set()) for i, p in enumerate(PROMPTS)},
            "counters": dataclasses.replace(scheduler.counters),
            "moves": recorder.num_moves,
            "max_compute": recorder.max_compute,
            "instances": executor.esp_counters(),
            "function_rpc": executor.collective_rpc(instance_index_rpc(), kwargs={"offset": 10}),
            "blocks_per_instance": scheduler.blocks_per_instance,
            "after_run": free_blocks_report(scheduler),
            "num_planned": getattr(scheduler.elastic, "num_planned", 0),
        }
        result["refusal"] = refuse_oversized(llm, scheduler)
        result["aborts"] = abort_mid_flight(llm, scheduler)
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def refuse_oversized(llm, scheduler) -> dict:
    """One prompt past max_model_len (refused) and one just within it,
    longer than one instance's cache (served); then the engine serves on
    and every block is free again.

    No prompt within max_model_len can outgrow the N caches together:
    vLLM refuses at start a max_model_len those caches cannot hold (see
    ``test_max_model_len_past_the_n_caches_is_refused_at_start``), so its
    length check is the capacity check at run time."""
    from vllm.inputs import TokensPrompt

    def generate(prompt: list[int]) -> dict:
        try:
            out = llm.generate(
                [TokensPrompt(prompt_token_ids=prompt)], _params()[:1], use_tqdm=False
            )
        except Exception as e:  # vLLM's own input validation (VLLMValidationError)
            return {"error": f"{type(e).__name__}: {e}", "tokens": None}
        return {"error": None, "tokens": list(out[0].outputs[0].token_ids)}

    return {
        "too_long": generate([7] * (MAX_MODEL_LEN + 1)),
        "fits": generate([7] * (MAX_MODEL_LEN - MAX_TOKENS)),
        "after": generate(PROMPTS[0]),
        "blocks": free_blocks_report(scheduler),
    }


def abort_mid_flight(llm, scheduler) -> dict:
    """Abort the long prompt mid-prefill (spanning both instances) and two
    short ones mid-decode; every block must come back on every instance."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = _params()
    for i in (LONG_INDEX, 0, 1, 2):
        engine.add_request(f"abort-{i}", TokensPrompt(prompt_token_ids=PROMPTS[i]), params[i])
    aborted: list[str] = []
    for _step in range(2000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        for rid, request in list(scheduler.requests.items()):
            if rid in aborted or request.is_finished():
                continue
            spans = (
                len(
                    {
                        b // scheduler.blocks_per_instance
                        for b in scheduler.kv_cache_manager.get_block_ids(rid)[0]
                    }
                )
                > 1
            )
            prefill = request.num_computed_tokens < request.num_prompt_tokens
            decoding = request.num_output_tokens >= 3
            if (prefill and spans) or (decoding and len(aborted) < 3):
                engine.abort_request([rid], internal=True)
                aborted.append(rid)
    else:
        raise AssertionError("abort replay did not drain")
    return {"num_aborted": len(aborted), "after": free_blocks_report(scheduler)}


@pytest.fixture(scope="module")
def esp_runs() -> dict:
    stock = run_stock()
    with engine_core_in_process():
        esp = run_esp(FORCED)
        loong = run_esp({"num_instances": 2, "placement": "loong"})
    return {"stock": stock, "esp": esp, "loong": loong}


def _no_leak(report: dict) -> None:
    # Instance 0 keeps vLLM's null block; everything else is free again.
    assert report["requests"] == 0
    assert report["free"] == [report["total"] - 1] + [report["total"]] * (len(report["free"]) - 1)


def test_greedy_outputs_identical_to_stock(esp_runs):
    assert esp_runs["esp"]["tokens"] == esp_runs["stock"]


def test_outputs_not_degenerate(esp_runs):
    assert len({tuple(t[:4]) for t in esp_runs["stock"]}) > 8


def test_long_prompt_spans_instances(esp_runs):
    esp = esp_runs["esp"]
    # 1,700 tokens need 54 blocks; one instance has 50.
    assert esp["blocks_per_instance"] * BLOCK_SIZE < LONG_PROMPT_TOKENS
    assert esp["holders"][LONG_INDEX] == {0, 1}


def test_every_elastic_move_happened(esp_runs):
    esp = esp_runs["esp"]
    counters = esp["counters"]
    assert esp["max_compute"] == 2 and counters.num_multi_instance_prefills > 0  # DoP 2
    assert counters.num_scale_ups > 0
    assert counters.num_migrated_blocks > 0 and esp["moves"] == counters.num_migrated_blocks
    for instance in esp["instances"]:  # both instances computed and exchanged
        assert instance["tokens_computed"] > 0
        # Wholly local rows (decodes of unspread requests) took vLLM's kernel.
        assert 0 < instance["local_kernel_rows"] < instance["tokens_computed"]
        assert instance["bytes_sent"] > 0 and instance["bytes_received"] > 0
        # Every DoP-2 chunk ran as a striped ring on both instances.
        assert instance["ring_rows"] > 0
    # Scale-down during the ring: the fewest-instances storage kept stripes
    # computed on the peer as they passed.
    assert sum(i["ring_kept_rows"] for i in esp["instances"]) > 0
    assert sum(i["blocks_moved_in"] for i in esp["instances"]) == counters.num_migrated_blocks


def test_no_block_leaked_after_run(esp_runs):
    _no_leak(esp_runs["esp"]["after_run"])


def is_length_refusal(error: str | None, num_prompt_tokens: int) -> bool:
    """vLLM's refusal of a prompt past max_model_len (which bounds it by the N caches)."""
    return (
        error is not None
        and error.startswith("VLLMValidationError")
        and str(MAX_MODEL_LEN) in error
        and str(num_prompt_tokens) in error
    )


def test_oversized_prompt_refused_and_engine_serves_on(esp_runs):
    refusal = esp_runs["esp"]["refusal"]
    assert is_length_refusal(refusal["too_long"]["error"], MAX_MODEL_LEN + 1)
    # The longest prompt that fits is served, over both instances' caches
    # (2,008 tokens need 63 blocks; one instance has 50).
    fits = refusal["fits"]
    assert not is_length_refusal(fits["error"], MAX_MODEL_LEN - MAX_TOKENS)
    assert fits["error"] is None and len(fits["tokens"]) == MAX_TOKENS
    assert esp_runs["esp"]["blocks_per_instance"] * BLOCK_SIZE < MAX_MODEL_LEN - MAX_TOKENS
    assert refusal["after"]["tokens"] == esp_runs["stock"][0]
    _no_leak(refusal["blocks"])


def test_aborts_leak_no_block_on_any_instance(esp_runs):
    aborts = esp_runs["esp"]["aborts"]
    assert aborts["num_aborted"] >= 2
    _no_leak(aborts["after"])


def test_function_rpcs_reach_every_instance(esp_runs):
    assert esp_runs["esp"]["function_rpc"] == [10, 11]


# ------------------------------------------------------------------ placement="loong"
def test_loong_greedy_outputs_identical_to_stock(esp_runs):
    """LoongServe's scheduler places every allocation from its cluster plan
    (the object the simulator runs) and the tokens are still stock's."""
    loong = esp_runs["loong"]
    assert loong["num_planned"] > 0
    assert loong["tokens"] == esp_runs["stock"]
    assert loong["holders"][LONG_INDEX] == {0, 1}
    assert loong["counters"].num_multi_instance_prefills > 0


def test_loong_leaks_no_block(esp_runs):
    loong = esp_runs["loong"]
    _no_leak(loong["after_run"])
    _no_leak(loong["refusal"]["blocks"])
    assert loong["refusal"]["after"]["tokens"] == esp_runs["stock"][0]
    _no_leak(loong["aborts"]["after"])
