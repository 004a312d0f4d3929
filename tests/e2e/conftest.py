"""Engine runs shared by the end-to-end tests (one start-up per scheduler)."""

from __future__ import annotations

import gc

import pytest

import vllm_esp
from vllm_esp.harness.engine import ENGINE_KWARGS, small_model_path
from vllm_esp.harness.offline import BLOCK_SIZE, KV_BYTES, MAX_NUM_SEQS, MAX_TOKENS, PROMPTS

#: name -> (scheduler, its settings). The "mlfq" run demotes on every spent
#: quantum (FastServe's rule), so it pauses and preempts by rank: the default
#: rule demotes nothing before output lengths are learned, and 24 requests
#: are too few to learn them. "gittins" is the plugin's default scheduler.
RUNS: dict[str, tuple[str, dict]] = {
    "fcfs": ("fcfs", {}),
    "mlfq": ("mlfq", {"demote_by_value": False}),
    "gittins": ("gittins", {}),
}


def run_offline(scheduler: str, **settings) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=small_model_path(),
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=KV_BYTES,
        block_size=BLOCK_SIZE,
        **ENGINE_KWARGS,
        **vllm_esp.scheduler_args(scheduler, **settings),
    )
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "preemptions": sum(o.metrics.num_preemptions for o in outs),
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


@pytest.fixture(scope="session")
def offline_outputs() -> dict[str, dict]:
    return {
        name: run_offline(scheduler, **settings) for name, (scheduler, settings) in RUNS.items()
    }
