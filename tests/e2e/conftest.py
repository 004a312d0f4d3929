"""Engine runs shared by the end-to-end tests (one start-up per scheduler)."""

from __future__ import annotations

import gc

import pytest

import vllm_esp
from vllm_esp.harness.engine import ENGINE_KWARGS, random_prompts, small_model_path

#: ~1,500 tokens of KV (K+V x 2 layers x 2 KV heads x head_dim 32 x fp32)
#: for 24 requests of up to ~450 tokens, 4 at a time: memory preemption.
KV_BYTES = 2 * 2 * 2 * 32 * 4 * 1536
MAX_NUM_SEQS = 4
BLOCK_SIZE = 32

PROMPTS = random_prompts(24, seed=1)
MAX_TOKENS = [8 + (7 * i) % 40 for i in range(len(PROMPTS))]


def run_offline(scheduler: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=small_model_path(),
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=KV_BYTES,
        block_size=BLOCK_SIZE,
        **ENGINE_KWARGS,
        **vllm_esp.scheduler_args(scheduler),
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
    return {name: run_offline(name) for name in ("fcfs", "mlfq")}
