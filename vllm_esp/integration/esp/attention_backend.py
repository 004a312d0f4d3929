"""The ESP attention backends: vLLM's own backend classes with an ESP-aware impl.

Registered by the ESP worker (and only there) as an override of the member
vLLM's platform picks anyway: ``CPU_ATTN`` on CPU (the CPU platform ignores
``--attention-backend``), ``FLASH_ATTN`` on CUDA. Metadata builder, KV cache
shape and layout stay the stock ones, so the engine allocates the cache as
usual; when the forward context carries an
:class:`~vllm_esp.integration.esp.step_context.ESPStepContext` the impl hands the layer to it
(distributed paged attention), otherwise it runs the stock kernel (warm-up
and profiling passes of vLLM's own model runner).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_esp.integration.esp.step_context import ESPStepContext


def _esp_forward(
    impl: Any,
    stock_forward: Any,
    layer: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    attn_metadata: Any,
    output: torch.Tensor,
    *args: Any,
    local_kernel: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    if isinstance(attn_metadata, ESPStepContext):
        n = attn_metadata.num_rows

        def store_kernel(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
            # vLLM's own cache write: the layout (and CPU ISA order) is its.
            impl.do_kv_cache_update(layer, k.contiguous(), v.contiguous(), kv_cache, slots)

        out = attn_metadata.attend(
            layer, query, key, value, kv_cache, impl.scale, local_kernel, store_kernel
        )
        output = output.view(query.shape[0], impl.num_heads, -1)
        output[:n] = out
        if query.shape[0] > n:
            output[n:] = 0  # padding rows of an instance with nothing to compute
        return output
    return stock_forward(
        impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
    )


def _check_supported(impl: Any) -> None:
    if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
        raise NotImplementedError("ESP attention does not support sliding windows")
    if getattr(impl, "alibi_slopes", None) is not None:
        raise NotImplementedError("ESP attention does not support ALiBi")
    if getattr(impl, "logits_soft_cap", None):
        raise NotImplementedError("ESP attention does not support logit soft-capping")


def _cpu_classes() -> tuple[type, type]:
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadata,
    )

    class ESPCPUAttentionImpl(CPUAttentionBackendImpl):
        """``CPU_ATTN`` impl that runs ESP steps through the ESP step context.

        Rows of requests whose KV and step are wholly local (most of them)
        run vLLM's own CPU kernel; only requests spread over instances take
        the partial-attention + LSE path.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _check_supported(self)

        def forward(
            self, layer, query, key, value, kv_cache, attn_metadata, output=None, *args, **kwargs
        ):
            return _esp_forward(
                self,
                CPUAttentionBackendImpl.forward,
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                *args,
                local_kernel=self._local_kernel,
                **kwargs,
            )

        def _local_kernel(
            self, ctx: ESPStepContext, layer: Any, q: torch.Tensor, kv_cache: torch.Tensor
        ) -> torch.Tensor:
            meta = ctx.fast_state
            if meta is None:  # once per step: every layer has the same geometry
                fast = ctx.fast
                meta = CPUAttentionMetadata(
                    num_actual_tokens=fast.num_rows,
                    max_query_len=int((fast.cu_seqlens[1:] - fast.cu_seqlens[:-1]).max()),
                    query_start_loc=fast.cu_seqlens,
                    max_seq_len=int(fast.kv_lens.max()),
                    seq_lens=fast.kv_lens,
                    block_table=fast.block_tables,
                    slot_mapping=torch.empty(0, dtype=torch.int64),
                    scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                        num_reqs=fast.kv_lens.shape[0],
                        num_heads=self.num_heads,
                        num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_size,
                        seq_lens=fast.kv_lens,
                        dtype=q.dtype,
                        query_start_loc=fast.cu_seqlens,
                        causal=True,
                        sliding_window_size=-1,
                        isa=layer.isa,
                        enable_kv_split=False,
                        dynamic_causal=None,
                        kv_cache_dtype=self.kv_cache_dtype,
                    ),
                    causal=True,
                )
                ctx.fast_state = meta
            out = torch.empty_like(q)
            CPUAttentionBackendImpl.forward(self, layer, q, q, q, kv_cache, meta, out)
            return out

    class ESPCPUAttentionBackend(CPUAttentionBackend):
        """``CPU_ATTN`` with :class:`ESPCPUAttentionImpl` (same name, cache and layout)."""

        @staticmethod
        def get_impl_cls():
            return ESPCPUAttentionImpl

    return ESPCPUAttentionBackend, ESPCPUAttentionImpl


def _cuda_classes() -> tuple[type, type]:
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
    )

    class ESPFlashAttentionImpl(FlashAttentionImpl):
        """``FLASH_ATTN`` impl that runs ESP steps through the ESP step context."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _check_supported(self)

        def forward(
            self, layer, query, key, value, kv_cache, attn_metadata, output=None, *args, **kwargs
        ):
            return _esp_forward(
                self,
                FlashAttentionImpl.forward,
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                *args,
                **kwargs,
            )

    class ESPFlashAttentionBackend(FlashAttentionBackend):
        """``FLASH_ATTN`` with :class:`ESPFlashAttentionImpl`."""

        @staticmethod
        def get_impl_cls():
            return ESPFlashAttentionImpl

    return ESPFlashAttentionBackend, ESPFlashAttentionImpl


def __getattr__(name: str) -> Any:
    # Built on first access: importing a backend module pulls in its kernels,
    # which exist only on that platform.
    if name in ("ESPCPUAttentionBackend", "ESPCPUAttentionImpl"):
        backend, impl = _cpu_classes()
    elif name in ("ESPFlashAttentionBackend", "ESPFlashAttentionImpl"):
        backend, impl = _cuda_classes()
    else:
        raise AttributeError(name)
    globals().update({backend.__name__: backend, impl.__name__: impl})
    return globals()[name]


def register_esp_backend() -> str:
    """Override this platform's default backend member with the ESP one; returns its name."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    if current_platform.is_cpu():
        register_backend(
            AttentionBackendEnum.CPU_ATTN,
            "vllm_esp.integration.esp.attention_backend.ESPCPUAttentionBackend",
        )
        return "CPU_ATTN"
    if current_platform.is_cuda():
        register_backend(
            AttentionBackendEnum.FLASH_ATTN,
            "vllm_esp.integration.esp.attention_backend.ESPFlashAttentionBackend",
        )
        return "FLASH_ATTN"
    raise NotImplementedError(f"ESP has no attention backend for {current_platform.device_name}")
