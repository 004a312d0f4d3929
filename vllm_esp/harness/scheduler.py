"""Real vLLM schedulers driven by fabricated model-runner outputs, on CPU.

Shared by the scheduler tests, the JCT simulator and the scheduler-overhead
benchmark, so all three drive the same classes the same way.

The same approach as vLLM's own ``tests/v1/core/utils.py``: the scheduler
under test is the real class with a real ``KVCacheManager``; only the
model runner is replaced by hand-made ``ModelRunnerOutput``s. No engine,
no weights: ``model`` is a folder holding just ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}

EOS = 0


def config_only_model(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return str(root)


def create_scheduler(
    model_dir: str,
    *,
    scheduler_cls: Any = None,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 8192,
    max_model_len: int = 8192,
    num_blocks: int = 10000,
    block_size: int = 16,
    enable_prefix_caching: bool = False,
    enable_chunked_prefill: bool = True,
    long_prefill_token_threshold: int = 0,
    async_scheduling: bool = False,
    additional_config: dict | None = None,
    kv_transfer_config: Any = None,
    **kwargs: Any,
):
    from vllm_esp.integration.mlfq.scheduler import MLFQScheduler

    scheduler_cls = scheduler_cls or MLFQScheduler
    model_config = ModelConfig(
        model=model_dir,
        dtype="float32",
        seed=0,
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=enable_chunked_prefill,
        long_prefill_token_threshold=long_prefill_token_threshold,
        async_scheduling=async_scheduling,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        cache_dtype="auto",
        enable_prefix_caching=enable_prefix_caching,
    )
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        additional_config=additional_config or {},
        kv_transfer_config=kv_transfer_config,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(
                    block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32
                ),
            )
        ],
    )
    cache_config.num_gpu_blocks = num_blocks
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        block_size=block_size,
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        **kwargs,
    )


_hasher_ready = False


def make_request(
    request_id: str,
    num_prompt_tokens: int,
    max_tokens: int,
    *,
    block_size: int = 16,
    prompt_token_ids: list[int] | None = None,
    arrival_time: float | None = None,
) -> Request:
    global _hasher_ready
    if not _hasher_ready:
        init_none_hash(sha256)
        _hasher_ready = True
    if prompt_token_ids is None:
        seed = sum(ord(c) for c in request_id)
        prompt_token_ids = [1 + (seed * 31 + i * 7) % 997 for i in range(num_prompt_tokens)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=params,
        pooling_params=None,
        arrival_time=arrival_time,
        block_hasher=get_request_block_hasher(block_size, sha256),
    )


def fake_output(
    scheduler: Any, scheduler_output: SchedulerOutput, token: int = 7
) -> ModelRunnerOutput:
    """One sampled token for every request of ``scheduler`` that finished its
    prompt chunk in ``scheduler_output`` (what the model runner reports)."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for rid in req_ids:
        request = scheduler.requests.get(rid)
        sampled.append([token] if request is None or not request.is_prefill_chunk else [])
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
        sampled_token_ids=sampled,
    )


class SwapWorker:
    """The worker half of host swap, fabricated: every step's outputs plus
    the KV connector's report, with each prefetch landing ``delay`` steps
    after it was issued (0: in the same step, as on CPU, where copies are
    synchronous). Shared by the swap scheduler tests and the simulator."""

    def __init__(self, delay: int = 0, swap_out_us: int = 3, swap_in_us: int = 2) -> None:
        self.delay = delay
        self.swap_out_us = swap_out_us
        self.swap_in_us = swap_in_us
        self.in_flight: list[tuple[int, str]] = []
        self.step_index = 0

    def output(
        self, scheduler: Any, scheduler_output: SchedulerOutput, token: int = 7
    ) -> ModelRunnerOutput:
        """The runner output for ``scheduler_output``, with landed prefetches."""
        from vllm.v1.outputs import KVConnectorOutput

        from vllm_esp.integration.swap.connector import HostSwapWorkerMetadata

        meta = scheduler_output.kv_connector_metadata
        self.in_flight += [(self.step_index + self.delay, c.request_id) for c in meta.prefetch]
        done = {r for due, r in self.in_flight if due <= self.step_index}
        self.in_flight = [(due, r) for due, r in self.in_flight if r not in done]
        self.step_index += 1
        mro = fake_output(scheduler, scheduler_output, token)
        mro.kv_connector_output = KVConnectorOutput(
            finished_recving=done or None,
            kv_connector_worker_meta=HostSwapWorkerMetadata(self.swap_out_us, self.swap_in_us),
        )
        return mro

    def step(self, scheduler: Any, token: int = 7) -> tuple[SchedulerOutput, Any]:
        """schedule -> fabricated output (+ connector report) -> update."""
        out = scheduler.schedule()
        return out, scheduler.update_from_output(out, self.output(scheduler, out, token))


def step(scheduler: Any, token: int = 7) -> tuple[SchedulerOutput, Any]:
    """schedule -> fabricated output -> update_from_output."""
    out = scheduler.schedule()
    engine_outputs = scheduler.update_from_output(out, fake_output(scheduler, out, token))
    return out, engine_outputs
