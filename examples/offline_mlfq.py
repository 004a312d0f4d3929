"""Offline generation with the skip-join MLFQ scheduler.

    python examples/offline_mlfq.py [MODEL]

MODEL defaults to the embedded default model (built on first use).
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
        max_model_len=2048,
        max_num_seqs=8,
        enforce_eager=True,
        gpu_memory_utilization=0.3,  # CPU: fraction of memory reserved
        kv_cache_memory_bytes=256 << 20,
        # The whole switch: scheduler class + validated MLFQ settings.
        **vllm_esp.scheduler_args("mlfq", num_levels=8, quantum_ratio=2.0),
    )
    prompts = ["Write a haiku about queues.", "Explain preemption " * 40]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for out in outputs:
        print(repr(out.outputs[0].text[:80]))


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    main()
