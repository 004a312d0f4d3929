"""Public entry points: partial attention with LSE (contiguous and paged) and the merge.

These are the single-process building blocks of ESP. Striped ring prefill
calls ``attention_with_lse`` once per ring hop and merges the hops; multi-master
decode has every instance call ``paged_attention_with_lse`` over its local
slice of each request's KV and the master merges the ``(out, lse)`` partials::

    instance 0: keys {0, 3, 6, ..}  -> (o0, lse0) --+
    instance 1: keys {1, 4, 7, ..}  -> (o1, lse1) --+--> merge_attention_states
    instance 2: keys {} (empty)     -> (0,  -inf) --+     == attention over all keys

Exactness of the merge relies on each partial being *normalised over its own
visible keys* with ``lse = log(sum(exp(score)))`` in natural log, and on empty
partials reporting ``lse = -inf`` (LoongServe leaves them uninitialised).

Backends: ``"torch"`` (reference, any device), ``"cpu"`` (fused: torch's
flash-attention-for-CPU kernel, see ``cpu_fused``), ``"triton"`` (GPU, or CPU
under ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA, cpu on CPU, torch
otherwise). On CUDA, xformers' ``memory_efficient_attention`` family can also
return the LSE (``xformers.ops.fmha.memory_efficient_attention_partial`` /
``merge_attentions``) and could serve the dense contiguous case; we keep our
own kernels because ESP needs per-token global positions as the mask and
vLLM's paged layouts, which xformers does not take (and xformers is not
installable on CPU here).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch

from vllm_esp.kernels.attention.cpu_fused import (
    attention_with_lse_cpu,
    fused_cpu_available,
    paged_attention_with_lse_cpu,
)
from vllm_esp.kernels.attention.paged_cache import PagedKVCache
from vllm_esp.kernels.attention.torch_ref import (
    attention_with_lse_torch,
    merge_attention_states_torch,
    merge_finite_partials_torch,
    paged_attention_with_lse_torch,
)

__all__ = ["Backend", "attention_with_lse", "merge_attention_states", "paged_attention_with_lse"]

Backend = Literal["auto", "torch", "cpu", "triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_kernels() -> ModuleType:
    # Imported on first use: the import decides compiled vs interpreted kernels.
    from vllm_esp.kernels.attention import triton_kernels

    return triton_kernels


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    if backend == "torch":
        return "torch"
    if backend == "cpu":
        if device.type != "cpu" or not fused_cpu_available(dtype):
            raise RuntimeError(
                f"backend='cpu' needs CPU tensors and torch's flash-attention-for-CPU "
                f"kernel for {dtype}; got {device.type}"
            )
        return "cpu"
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if fused_cpu_available(dtype) else "torch"
        if device.type != "cuda":
            return "torch"
        try:
            _triton_kernels()
        except ImportError:
            return "torch"
        return "triton"
    if backend == "triton":
        kernels = _triton_kernels()
        if device.type != "cuda" and not kernels.INTERPRETED:
            raise RuntimeError(
                "backend='triton' on a non-CUDA tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before vllm_esp.kernels.attention.triton_kernels is imported"
            )
        return "triton"
    raise ValueError(
        f"unknown attention backend {backend!r}; use 'auto', 'torch', 'cpu' or 'triton'"
    )


def _check_heads(q: torch.Tensor, num_kv_heads: int, head_size: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D]; got {tuple(q.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if q.shape[2] != head_size:
        raise ValueError(f"head size mismatch: q has {q.shape[2]}, KV has {head_size}")
    if num_kv_heads == 0 or q.shape[1] % num_kv_heads != 0:
        raise ValueError(
            f"num query heads {q.shape[1]} is not a multiple of num KV heads {num_kv_heads}"
        )


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    # Kernels assume a unit stride on the head dim.
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str) -> torch.Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [B+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor; got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    decreasing = any(later < earlier for earlier, later in itertools.pairwise(bounds))
    if bounds[0] != 0 or decreasing or bounds[-1] > total:
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end <= {total}; got {bounds}"
        )
    return cu_seqlens.to(torch.int32).contiguous()


def _single_sequence(length: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen partial attention over contiguous K/V, returning the LSE.

    Args:
        q: ``[Tq, Hq, D]``.
        k, v: ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (MHA and GQA; query head
            ``h`` reads KV head ``h // (Hq // Hkv)``, as in vLLM).
        q_pos, k_pos: int ``[Tq]`` / ``[Tk]`` GLOBAL token positions. A key is
            visible to a query iff ``k_pos <= q_pos`` and both are in the same
            sequence, so striped or arbitrary token orders work.
        scale: softmax scale (usually ``D ** -0.5``).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` sequence boundaries; q
            segment ``i`` attends only k segment ``i``. Both ``None`` means a
            single sequence. Query rows at or past ``cu_seqlens_q[-1]`` are
            padding and come back as out 0, lse -inf.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.

    Returns:
        ``out [Tq, Hq, D]`` in ``q.dtype``, normalised over the visible keys,
        and ``lse [Tq, Hq]`` float32 (natural log). A row with no visible key
        (including ``Tk == 0`` or an empty segment) has out 0 and lse -inf.
    """
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"k and v must both be [Tk, Hkv, D]; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_heads(q, k.shape[1], k.shape[2])
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k and v must be on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q_pos.shape != (q.shape[0],) or k_pos.shape != (k.shape[0],):
        raise ValueError("q_pos must be [Tq] and k_pos must be [Tk]")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        cu_seqlens_q = _single_sequence(q.shape[0], q.device)
        cu_seqlens_k = _single_sequence(k.shape[0], q.device)
    else:
        cu_seqlens_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
        cu_seqlens_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(
                "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences"
            )
    q, k, v = _as_rows(q), _as_rows(k), _as_rows(v)
    q_pos = q_pos.to(torch.int64).contiguous()
    k_pos = k_pos.to(torch.int64).contiguous()
    resolved = _resolve_backend(backend, q.device, q.dtype)
    if resolved == "triton":
        return _triton_kernels().varlen_attention_with_lse_triton(
            q, k, v, q_pos, k_pos, scale, cu_seqlens_q, cu_seqlens_k
        )
    if resolved == "cpu":
        return attention_with_lse_cpu(q, k, v, q_pos, k_pos, scale, cu_seqlens_q, cu_seqlens_k)
    return attention_with_lse_torch(q, k, v, q_pos, k_pos, scale, cu_seqlens_q, cu_seqlens_k)


def paged_attention_with_lse(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: PagedKVCache,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention with LSE over a paged cache; same contract as ``attention_with_lse``.

    Sequence ``i`` reads the first ``kv_lens[i]`` slots of ``block_tables[i]``
    (int32 ``[B, max_blocks]``): entry ``j`` lives at slot
    ``block_tables[i, j // bs] * bs + j % bs``. Key positions come from
    ``cache.positions`` (per-slot global positions), so an instance may hold
    any subset of a request's tokens, in any order. ``kv_lens[i] == 0`` gives
    out 0 and lse -inf for that sequence's queries.
    """
    _check_heads(q, cache.num_kv_heads, cache.head_size)
    if cache.dtype != q.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the cache dtype {cache.dtype}")
    if q.device != cache.device:
        raise ValueError("q and the cache must be on the same device")
    if q_pos.shape != (q.shape[0],):
        raise ValueError("q_pos must be [Tq]")
    cu_seqlens_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be [B={num_seqs}, max_blocks]; got {tuple(block_tables.shape)}"
        )
    if kv_lens.shape != (num_seqs,):
        raise ValueError(f"kv_lens must be [B={num_seqs}]; got {tuple(kv_lens.shape)}")
    max_kv_len = int(kv_lens.max()) if num_seqs > 0 else 0
    if max_kv_len > block_tables.shape[1] * cache.block_size or (
        num_seqs > 0 and int(kv_lens.min()) < 0
    ):
        raise ValueError("kv_lens must be in [0, max_blocks * block_size]")
    q = _as_rows(q)
    q_pos = q_pos.to(torch.int64).contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    kv_lens = kv_lens.to(torch.int32).contiguous()
    resolved = _resolve_backend(backend, q.device, q.dtype)
    if resolved == "triton":
        return _triton_kernels().paged_attention_with_lse_triton(
            q, cu_seqlens_q, q_pos, cache, block_tables, kv_lens, scale
        )
    if resolved == "cpu":
        return paged_attention_with_lse_cpu(
            q, cu_seqlens_q, q_pos, cache, block_tables, kv_lens, scale
        )
    return paged_attention_with_lse_torch(
        q, cu_seqlens_q, q_pos, cache, block_tables, kv_lens, scale
    )


def merge_attention_states(
    outs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    backend: Backend = "auto",
    finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE-weighted merge of N partial attention results.

    Args:
        outs: N tensors ``[T, H, D]``, each normalised over its own keys.
        lses: N tensors ``[T, H]`` (natural log). -inf marks an empty partial,
            whose ``out`` is ignored (it may be garbage); NaN and +inf are
            treated the same way.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` (the torch merge) or
            ``"triton"``.
        finite: every ``out`` is finite, also where its lse is -inf (as
            this package's kernels return them); the torch merge then
            skips its masking passes.

    Returns:
        ``(out [T, H, D]`` in ``outs[0].dtype``, ``lse [T, H]`` float32). Where
        every partial is empty: out 0 and lse -inf.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(
            f"need the same positive number of outs and lses; got {len(outs)}, {len(lses)}"
        )
    shape = outs[0].shape
    if len(shape) != 3:
        raise ValueError(f"outs must be [T, H, D]; got {tuple(shape)}")
    for out, lse in zip(outs, lses, strict=True):
        if out.shape != shape or lse.shape != shape[:2]:
            raise ValueError("every partial must be out [T, H, D] and lse [T, H] of one shape")
        if out.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError("all partials must be on one device")
    if _resolve_backend(backend, outs[0].device, outs[0].dtype) == "triton":
        return _triton_kernels().merge_attention_states_triton(outs, lses)
    if finite:
        return merge_finite_partials_torch(outs, lses)
    return merge_attention_states_torch(outs, lses)
