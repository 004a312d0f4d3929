"""Micro-benchmark of the ESP attention kernels (vllm_esp.kernels.attention).

Times, per shape, the partial-attention-with-LSE paths against dense SDPA:

* ``torch``   -- the chunked online-softmax reference (``backend="torch"``)
* ``cpu``     -- the fused CPU kernel (``backend="cpu"``, CPU only)
* ``triton``  -- the Triton kernels (CUDA only; the CPU interpreter is far
  too slow to time)
* ``sdpa``    -- ``torch.nn.functional.scaled_dot_product_attention`` on the
  same contiguous causal problem (no LSE, no paging; a speed-of-light line)
* ``paged-*`` -- the same keys read from a paged cache in the device's vLLM
  layout (CPU_ATTN on CPU, FLASH on CUDA)
* ``merge-*`` -- merging ``--num-shards`` partials

With ``--vs-vllm`` (CPU) it instead times the fused CPU kernel
(``backend="cpu"``, the default there) against vLLM's own CPU attention op
(``torch.ops._C.cpu_attention_with_kv_cache``, what ``CPU_ATTN`` runs) on one
paged cache in vLLM's layout and ISA, whole KV local: prefill of one sequence
(2048 and 4096 tokens, causal), a chunked-prefill step (the last 512 of 4096
tokens) and decode (16 sequences x 1 query over 2048 keys), for the default model's heads and a realistic 32/8 x 128. Rounds
alternate the two (the order flips every round) and each round gives a
paired ratio, since shared machines drift in speed within minutes.

Usage::

    python benchmarks/esp_kernels.py                      # default shapes
    python benchmarks/esp_kernels.py --context 32768 --queries 1 --dtype bfloat16
    python -m benchmarks.esp_kernels --vs-vllm --threads 1 2 --out /tmp/esp_kernels_cpu.json

On CPU the torch, cpu and SDPA paths run. Keep CPU runs small on shared hosts.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vllm_esp.kernels.attention import (
    Backend,
    BlockVersions,
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
    backends: list[Backend] = ["torch", "triton" if device.type == "cuda" else "cpu"]
    results: dict[str, float] = {}

    for backend in backends:
        results[backend] = time_ms(
            partial(attention_with_lse, q, k, v, q_pos, k_pos, scale, backend=backend),
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
            partial(
                paged_attention_with_lse,
                q,
                cu_q,
                q_pos,
                cache,
                block_table[None],
                kv_lens,
                scale,
                backend=backend,
            ),
            device,
            warmup,
            iters,
        )

    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, scale, backend="torch")
    outs, lses = [out] * num_shards, [lse] * num_shards
    for backend in backends:
        results[f"merge-{backend}"] = time_ms(
            partial(merge_attention_states, outs, lses, backend=backend), device, warmup, iters
        )
    return results


# --------------------------------------------------------------------------- vs vLLM (CPU)

#: Head configurations: the ``default`` preset's model and a realistic one.
VLLM_HEADS = {"default_model": (8, 4, 64), "realistic": (32, 8, 128)}
#: (name, num_seqs, query_len, context_len); queries are the last tokens.
VLLM_SHAPES = (
    ("prefill_2048", 1, 2048, 2048),
    ("prefill_4096", 1, 4096, 4096),
    ("chunk_512_of_4096", 1, 512, 4096),
    ("decode_16x2048", 16, 1, 2048),
    ("decode_4x8192", 4, 1, 8192),
)
#: The issue's headline: a long prompt's prefill on the default model, one core.
HEADLINE = ("default_model", "prefill_4096", 1)


@dataclass
class PagedProblem:
    """One batch over one layer's paged cache, shared by both kernels."""

    cache: PagedKVCache
    isa: str
    query: torch.Tensor
    query_start_loc: torch.Tensor
    query_pos: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    num_heads: int
    scale: float


def build_paged_problem(
    heads: tuple[int, int, int],
    num_seqs: int,
    query_len: int,
    context_len: int,
    dtype: torch.dtype,
    block_size: int,
    seed: int,
) -> PagedProblem:
    """Sequences in shuffled blocks of a cache in the layout and ISA vLLM picks here."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    num_heads, num_kv_heads, head_size = heads
    isa = _get_attn_isa(dtype, block_size, head_size)
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = math.ceil(context_len / block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    cache = PagedKVCache.allocate(
        num_blocks, block_size, num_kv_heads, head_size, dtype, "cpu", KVLayout.CPU, cpu_isa=isa
    )
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * blocks_per_seq]
    table = table.view(num_seqs, blocks_per_seq).to(torch.int32)
    for row in table:
        kv = torch.randn(2, context_len, num_kv_heads, head_size, generator=gen).to(dtype)
        cache.write(cache.slot_mapping(row, context_len), kv[0], kv[1], torch.arange(context_len))
    query = torch.randn(num_seqs * query_len, num_heads, head_size, generator=gen).to(dtype)
    return PagedProblem(
        cache=cache,
        isa=isa,
        query=query,
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32) * query_len,
        query_pos=torch.arange(context_len - query_len, context_len).repeat(num_seqs),
        seq_lens=torch.full((num_seqs,), context_len, dtype=torch.int32),
        block_table=table,
        num_heads=num_heads,
        scale=head_size**-0.5,
    )


def vllm_cpu_attention(problem: PagedProblem) -> Callable[[], torch.Tensor]:
    """What ``CPUAttentionBackendImpl.forward`` runs for this batch, per layer."""
    from vllm import _custom_ops as ops

    cache = problem.cache
    num_blocks, num_kv_heads, block_size, two_d = cache.kv_cache.shape
    key_cache, value_cache = cache.kv_cache.view(
        num_blocks, num_kv_heads, 2 * block_size, two_d // 2
    ).chunk(2, dim=2)
    output = torch.empty_like(problem.query)
    # Built once per step in the engine and shared by every layer: not timed.
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=problem.seq_lens.shape[0],
        num_heads=problem.num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=two_d // 2,
        seq_lens=problem.seq_lens,
        dtype=problem.query.dtype,
        query_start_loc=problem.query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=problem.isa,
        enable_kv_split=False,
    )

    def run() -> torch.Tensor:
        ops.cpu_attention_with_kv_cache(
            query=problem.query,
            key_cache=key_cache,
            value_cache=value_cache,
            output=output,
            query_start_loc=problem.query_start_loc,
            seq_lens=problem.seq_lens,
            scale=problem.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=problem.block_table,
            softcap=0.0,
            scheduler_metadata=metadata,
            s_aux=None,
        )
        return output

    return run


def esp_cpu_attention(problem: PagedProblem, mirror: bool = True) -> Callable[[], torch.Tensor]:
    """The fused partial-attention kernel (with LSE) on the same cache and batch.

    With ``mirror`` (the engine's setting) it reads the cache through a
    head-major mirror, and each call first marks the blocks holding the
    batch's query positions as written, as the step that computed their KV
    would: a decode re-gathers its last block, a prefill every block it
    wrote, a chunk only the chunk's blocks."""
    cache = problem.cache
    written = torch.empty(0, dtype=torch.int64)
    if mirror:
        versions = BlockVersions(cache.num_blocks, "cpu")
        cache = PagedKVCache.wrap(
            cache.kv_cache, KVLayout.CPU, cache.positions, cpu_isa=problem.isa, versions=versions
        )
        bounds = problem.query_start_loc.tolist()
        written = torch.cat(
            [
                problem.block_table[
                    seq, problem.query_pos[bounds[seq] : bounds[seq + 1]] // cache.block_size
                ]
                for seq in range(len(bounds) - 1)
            ]
        ).unique()

    def run() -> torch.Tensor:
        if mirror:
            versions.new_step()
            cache.mark_written(written)
        out, _lse = paged_attention_with_lse(
            problem.query,
            problem.query_start_loc,
            problem.query_pos,
            cache,
            problem.block_table,
            problem.seq_lens,
            problem.scale,
            backend="cpu",
        )
        return out

    return run


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_rounds(
    esp: Callable[[], object], vllm: Callable[[], object], rounds: int, iters: int
) -> dict[str, Any]:
    """Interleave the two kernels call by call (who goes first alternates);
    each round's ratio is the ratio of its two medians."""
    esp()
    vllm()  # warm-up: first-call allocations and oneDNN kernel selection
    esp_s: list[float] = []
    vllm_s: list[float] = []
    ratios = []
    for r in range(rounds):
        round_esp, round_vllm = [], []
        for i in range(iters):
            if (r + i) % 2 == 0:
                round_esp.append(_seconds(esp))
                round_vllm.append(_seconds(vllm))
            else:
                round_vllm.append(_seconds(vllm))
                round_esp.append(_seconds(esp))
        esp_s.extend(round_esp)
        vllm_s.extend(round_vllm)
        ratios.append(statistics.median(round_esp) / statistics.median(round_vllm))
    return {
        "kernel": {"esp_s": statistics.median(esp_s), "vllm_s": statistics.median(vllm_s)},
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


def bench_vs_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """Every (threads, heads, shape) pair: the fused kernel vs vLLM's CPU attention."""
    from benchmarks.common import finish_metadata, run_metadata

    meta = run_metadata(seed=args.seed)
    if hasattr(torch.cpu, "_init_amx"):
        # vLLM's AMX kernel assumes the process already has the AMX tile
        # permission (the engine's oneDNN GEMMs request it); ask for it here.
        torch.cpu._init_amx()
    dtype = _DTYPES[args.dtype]
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for heads_name, heads in VLLM_HEADS.items():
            for shape_name, num_seqs, query_len, context_len in VLLM_SHAPES:
                problem = build_paged_problem(
                    heads, num_seqs, query_len, context_len, dtype, args.block_size, args.seed
                )
                esp = esp_cpu_attention(problem, mirror=not args.no_mirror)
                vllm = vllm_cpu_attention(problem)
                max_abs_diff = (esp().float() - vllm().float()).abs().max().item()
                row = {
                    "threads": threads,
                    "heads": heads_name,
                    "num_heads": heads[0],
                    "num_kv_heads": heads[1],
                    "head_size": heads[2],
                    "shape": shape_name,
                    "num_seqs": num_seqs,
                    "query_len": query_len,
                    "context_len": context_len,
                    "isa": problem.isa,
                    "max_abs_diff": max_abs_diff,
                    **paired_rounds(esp, vllm, args.rounds, args.iters),
                }
                results.append(row)
                print(
                    f"threads={threads} {heads_name:13s} {shape_name:15s} isa={problem.isa} "
                    f"esp={row['kernel']['esp_s'] * 1e3:9.2f} ms "
                    f"vllm={row['kernel']['vllm_s'] * 1e3:9.2f} ms ratio={row['ratio']:.2f} "
                    f"(rounds {', '.join(f'{x:.2f}' for x in row['round_ratios'])}) "
                    f"max|diff|={max_abs_diff:.2g}",
                    flush=True,
                )
    headline = (
        next(r for r in results if (r["heads"], r["shape"], r["threads"]) == HEADLINE)
        if HEADLINE[2] in args.threads
        else results[0]
    )
    return {
        "metadata": finish_metadata(meta),
        "dtype": args.dtype,
        "block_size": args.block_size,
        "rounds": args.rounds,
        "iters": args.iters,
        "target_ratio": 1.3,
        "esp_path": "gathered every call"
        if args.no_mirror
        else ("head-major mirror, the blocks holding the queries re-gathered every call"),
        "kernel": {
            **headline["kernel"],
            "ratio": headline["ratio"],
            "shape": headline["shape"],
            "heads": headline["heads"],
            "threads": headline["threads"],
        },
        "shapes": results,
    }


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
    parser.add_argument(
        "--vs-vllm", action="store_true", help="fused CPU kernel vs vLLM's CPU attention"
    )
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--no-mirror",
        action="store_true",
        help="with --vs-vllm: gather every call instead of the engine's head-major mirror",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for --vs-vllm results")
    args = parser.parse_args()
    if args.vs_vllm:
        result = bench_vs_vllm(args)
        if args.out:
            from benchmarks.common import write_json

            write_json(args.out, result)
        return

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
