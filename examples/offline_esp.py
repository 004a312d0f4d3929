"""Offline generation with elastic sequence parallelism over two instances.

    python examples/offline_esp.py [MODEL]

Each instance gets a small KV cache (2,048 tokens of the default
model); the long prompt below needs more than one instance holds, so its
KV is spread over both and attention is merged across them.
"""

from __future__ import annotations

import sys

from vllm import LLM, SamplingParams

import vllm_esp
from vllm_esp.models import build_model


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else str(build_model("default"))
    llm = LLM(
        model=model,
        max_model_len=3072,  # more than one instance's cache holds
        max_num_seqs=8,
        block_size=32,
        enforce_eager=True,  # ESP instances run eagerly
        gpu_memory_utilization=0.3,  # CPU: fraction of memory reserved
        kv_cache_memory_bytes=12 << 20,  # per instance: 2,048 tokens of this model
        **vllm_esp.scheduler_args("esp", esp={"num_instances": 2}),
    )
    prompts = ["Write a haiku about queues.", "Explain sequence parallelism. " * 270]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for out in outputs:
        print(len(out.prompt_token_ids), repr(out.outputs[0].text[:80]))


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    main()
