"""Single-process attention math of the ESP core.

Partial attention that also returns the log-sum-exp (LSE), over contiguous
K/V or over one layer of vLLM's paged KV cache in its own layout, plus the
exact LSE merge of partials. ESP's striped ring prefill and multi-master
decode are compositions of these three operations (see ``api``).

Modules: ``layout`` (where vLLM backends put K/V), ``paged_cache``
(``PagedKVCache``), ``torch_ref`` (reference path), ``cpu_fused`` (the
default on CPU: torch's fused flash-attention-for-CPU kernel), ``triton_kernels``
(imported lazily; GPU, or CPU under ``TRITON_INTERPRET=1``), ``mirror``
(head-major copies kept across steps for ``cpu_fused``), ``api``.
"""

from vllm_esp.kernels.attention.api import (
    Backend,
    attention_with_lse,
    merge_attention_states,
    paged_attention_with_lse,
)
from vllm_esp.kernels.attention.layout import KVLayout
from vllm_esp.kernels.attention.mirror import BlockVersions
from vllm_esp.kernels.attention.paged_cache import KVBlocks, PagedKVCache

__all__ = [
    "Backend",
    "BlockVersions",
    "KVBlocks",
    "KVLayout",
    "PagedKVCache",
    "attention_with_lse",
    "merge_attention_states",
    "paged_attention_with_lse",
]
