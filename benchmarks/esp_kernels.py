"""Micro-benchmark of the ESP attention kernels (vllm_esp.kernels.attention).

Times, per shape, the partial-attention-with-LSE paths against dense SDPA:

* ``torch``   -- the chunked online-softmax reference (``backend="torch"``)
* ``triton``  -- the Triton kernels (CUDA only; the CPU interpreter is far
  too slow to time)
* ``sdpa``    -- ``torch.nn.functional.scaled_dot_product_attention`` on the
  same contiguous causal problem (no LSE, no paging; a speed-of-light line)
* ``paged-*`` -- the same keys read from a paged cache in the device's vLLM
  layout (CPU_ATTN on CPU, FLASH on CUDA)
* ``merge-*`` -- merging ``--num-shards`` partials

Usage::

    python benchmarks/esp_kernels.py                      # default shapes
    python benchmarks/esp_kernels.py --context 32768 --queries 1 --dtype bfloat16

On CPU only the torch and SDPA paths run. Keep CPU runs small on shared hosts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_esp.kernels.attention import (
    KVLayout,
    PagedKVCache,
    attention_with_lse,
    merge_attention_states,
    paged_attention_with_lse,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: a single sequence's queries over its context."""

    num_queries: int
    context_len: int
    num_heads: int
    num_kv_heads: int
    head_size: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def bench_shape(
    shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    num_shards: int,
    warmup: int,
    iters: int,
) -> dict[str, float]:
    """Time every available path on one shape; returns {path: ms}."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype=dtype, device=device)

    q = randn(shape.num_queries, shape.num_heads, shape.head_size)
    k = randn(shape.context_len, shape.num_kv_heads, shape.head_size)
    v = randn(shape.context_len, shape.num_kv_heads, shape.head_size)
    k_pos = torch.arange(shape.context_len, device=device)
    q_pos = k_pos[-shape.num_queries :]
    scale = shape.head_size**-0.5
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    results: dict[str, float] = {}

    for backend in backends:
        results[backend] = time_ms(
            lambda b=backend: attention_with_lse(q, k, v, q_pos, k_pos, scale, backend=b),
            device,
            warmup,
            iters,
        )

    # SDPA with an explicit bottom-right causal mask (queries are the last tokens).
    q_h, k_h, v_h = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = k_pos[None, :] <= q_pos[:, None]
    results["sdpa"] = time_ms(
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q_h, k_h, v_h, attn_mask=mask, scale=scale, enable_gqa=True
        ),
        device,
        warmup,
        iters,
    )

    layout = KVLayout.FLASH if device.type == "cuda" else KVLayout.CPU
    num_blocks = -(-shape.context_len // block_size)
    cache = PagedKVCache.allocate(
        num_blocks + 1, block_size, shape.num_kv_heads, shape.head_size, dtype, device, layout
    )
    block_table = torch.randperm(num_blocks + 1, generator=gen)[:num_blocks].to(
        device=device, dtype=torch.int32
    )
    cache.write(cache.slot_mapping(block_table, shape.context_len), k, v, k_pos)
    cu_q = torch.tensor([0, shape.num_queries], dtype=torch.int32, device=device)
    kv_lens = torch.tensor([shape.context_len], dtype=torch.int32, device=device)
    for backend in backends:
        results[f"paged-{backend}"] = time_ms(
            lambda b=backend: paged_attention_with_lse(
                q, cu_q, q_pos, cache, block_table[None], kv_lens, scale, backend=b
            ),
            device,
            warmup,
            iters,
        )

    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, scale, backend="torch")
    outs, lses = [out] * num_shards, [lse] * num_shards
    for backend in backends:
        results[f"merge-{backend}"] = time_ms(
            lambda b=backend: merge_attention_states(outs, lses, backend=b), device, warmup, iters
        )
    return results


def main() -> None:
    """Parse arguments, run every shape, print one line per shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--queries", type=int, nargs="*", default=[1, 512])
    parser.add_argument("--context", type=int, nargs="*", default=[2048])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    print(
        f"device={device} dtype={args.dtype} heads={args.num_heads}/{args.num_kv_heads} "
        f"head_size={args.head_size} block_size={args.block_size} (median ms)"
    )
    for context_len in args.context:
        for num_queries in args.queries:
            shape = Shape(
                min(num_queries, context_len),
                context_len,
                args.num_heads,
                args.num_kv_heads,
                args.head_size,
            )
            results = bench_shape(
                shape, dtype, device, args.block_size, args.num_shards, args.warmup, args.iters
            )
            cells = "  ".join(f"{name}={ms:8.3f}" for name, ms in results.items())
            print(f"q={shape.num_queries:6d} ctx={context_len:6d}  {cells}")


if __name__ == "__main__":
    main()
