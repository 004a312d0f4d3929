"""Pure-torch partial attention with LSE and the LSE merge (the reference path).

Runs anywhere (it is the default on CPU) and bounds memory: keys are consumed
in chunks with an online softmax, and each chunk's score tile is further cut
along queries so at most ``_MAX_SCORE_ELEMENTS`` fp32 scores exist at a time.
A 32K-token context therefore never materialises a Tq x Tk matrix.

Per sequence, the running state lives in fp32 with heads grouped by KV head
(GQA: query head ``h`` reads KV head ``h // G``, ``G = Hq // Hkv``)::

    q [n_q, Hq, D] --view--> [n_q, Hkv, G, D] --transpose--> [Hkv, n_q, G, D]
    m, l   [Hkv, n_q, G]      running max / sum of exp(score - m)
    acc    [Hkv, n_q, G, D]   running sum of exp(score - m) * v

    for each key chunk (k, v, k_pos):            # gathered or sliced
        for each query sub-chunk qs:qe:           # bounds the score tile
            s = q[:, qs:qe] @ k^T * scale         # [Hkv, bq * G, bk] batched GEMM
            s[k_pos > q_pos] = -inf               # causal on global positions
            online-softmax update of m, l, acc

    out = acc / l, lse = m + log(l)   (rows with l == 0: out 0, lse -inf)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from vllm_esp.kernels.attention.paged_cache import PagedKVCache

__all__ = [
    "attention_with_lse_torch",
    "merge_attention_states_torch",
    "merge_finite_partials_torch",
    "paged_attention_with_lse_torch",
]

# fp32 score elements per step (16 MiB) and keys per chunk. Small enough for a
# laptop, big enough that the Python loop is not the bottleneck at 32K keys.
_MAX_SCORE_ELEMENTS = 1 << 22
_MAX_KEY_CHUNK = 1024

KeyChunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k, v [n,Hkv,D]; k_pos [n]


def _attend_one_sequence(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    key_chunks: Iterator[KeyChunk],
    num_kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention of one sequence's queries over a stream of key chunks.

    Returns ``out [n_q, Hq, D]`` (fp32) and ``lse [n_q, Hq]`` (fp32).
    """
    num_queries, num_heads, head_size = q.shape
    group = num_heads // num_kv_heads
    # [Hkv, n_q, G, D]: a query sub-chunk [qs:qe] stays one contiguous run of
    # (query, head-in-group) rows, so each tile is a plain batched GEMM.
    # Pre-scaled so a tile costs one matmul.
    q_rows = (
        (q.float() * scale)
        .view(num_queries, num_kv_heads, group, head_size)
        .transpose(0, 1)
        .contiguous()
    )
    running_max = q.new_full((num_kv_heads, num_queries, group), float("-inf"), dtype=torch.float32)
    running_sum = torch.zeros_like(running_max)
    acc = q.new_zeros((num_kv_heads, num_queries, group, head_size), dtype=torch.float32)
    q_pos = q_pos.to(torch.int64)

    query_chunk: int | None = None
    query_chunk_max_pos: list[int] = []
    for key, value, key_pos in key_chunks:
        num_keys = key.shape[0]
        if num_keys == 0:
            continue
        if query_chunk is None:
            query_chunk = max(1, _MAX_SCORE_ELEMENTS // (num_heads * num_keys))
            # One host sync: the largest query position of each query sub-chunk,
            # to skip key chunks that are entirely in its future.
            query_chunk_max_pos = [int(p.max()) for p in q_pos.split(query_chunk)]
        key_pos = key_pos.to(torch.int64)
        min_key_pos = int(key_pos.min())
        # [Hkv, bk, D] in fp32 (accumulate in fp32 for 16-bit KV).
        key_h = key.float().transpose(0, 1)
        value_h = value.float().transpose(0, 1)
        for chunk_idx, q_start in enumerate(range(0, num_queries, query_chunk)):
            if min_key_pos > query_chunk_max_pos[chunk_idx]:
                continue  # every key is after every query here: fully masked
            q_end = min(q_start + query_chunk, num_queries)
            num_rows = q_end - q_start
            q_tile = q_rows[:, q_start:q_end].reshape(num_kv_heads, num_rows * group, head_size)
            scores = torch.matmul(q_tile, key_h.transpose(1, 2)).view(
                num_kv_heads, num_rows, group, num_keys
            )
            hidden = key_pos[None, :] > q_pos[q_start:q_end, None]  # [bq, bk]
            scores.masked_fill_(hidden[:, None, :], float("-inf"))
            old_max = running_max[:, q_start:q_end]
            new_max = torch.maximum(old_max, scores.amax(dim=-1))
            # Rows that have seen no visible key keep max = -inf; subtracting 0
            # instead keeps exp() at exactly 0 rather than NaN (-inf - -inf).
            safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - safe_max.unsqueeze(-1))
            rescale = torch.exp(old_max - safe_max)
            running_sum[:, q_start:q_end] = running_sum[:, q_start:q_end] * rescale + probs.sum(
                dim=-1
            )
            weighted_values = torch.matmul(
                probs.view(num_kv_heads, num_rows * group, num_keys), value_h
            )
            acc[:, q_start:q_end] = acc[:, q_start:q_end] * rescale.unsqueeze(
                -1
            ) + weighted_values.view(num_kv_heads, num_rows, group, head_size)
            running_max[:, q_start:q_end] = new_max

    has_keys = running_sum > 0
    safe_sum = torch.where(has_keys, running_sum, 1.0)
    out = torch.where(has_keys.unsqueeze(-1), acc / safe_sum.unsqueeze(-1), 0.0)
    lse = torch.where(has_keys, running_max + torch.log(safe_sum), float("-inf"))
    # [Hkv, n_q, G, ...] -> [n_q, Hkv * G = Hq, ...]; query head h = kv_head * G + g.
    out = out.transpose(0, 1).reshape(num_queries, num_heads, head_size)
    lse = lse.transpose(0, 1).reshape(num_queries, num_heads)
    return out, lse


def _contiguous_chunks(
    key: torch.Tensor, value: torch.Tensor, key_pos: torch.Tensor
) -> Iterator[KeyChunk]:
    for start in range(0, key.shape[0], _MAX_KEY_CHUNK):
        end = start + _MAX_KEY_CHUNK
        yield key[start:end], value[start:end], key_pos[start:end]


def _paged_chunks(cache: PagedKVCache, slots: torch.Tensor) -> Iterator[KeyChunk]:
    # Gather per chunk so a long context is never copied out whole.
    for start in range(0, slots.shape[0], _MAX_KEY_CHUNK):
        yield cache.gather_slots(slots[start : start + _MAX_KEY_CHUNK])


def empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of no keys for ``q``'s rows: output 0, LSE -inf (what
    the LSE merge ignores). Every backend starts from it."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def attention_with_lse_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch varlen partial attention; see ``api.attention_with_lse`` for the contract."""
    out, lse = empty_partial(q)
    q_bounds = cu_seqlens_q.tolist()
    k_bounds = cu_seqlens_k.tolist()
    num_kv_heads = k.shape[1]
    for seq_idx in range(len(q_bounds) - 1):
        q_start, q_end = q_bounds[seq_idx], q_bounds[seq_idx + 1]
        k_start, k_end = k_bounds[seq_idx], k_bounds[seq_idx + 1]
        if q_end == q_start or k_end == k_start:
            continue  # stays out = 0, lse = -inf
        seq_out, seq_lse = _attend_one_sequence(
            q[q_start:q_end],
            q_pos[q_start:q_end],
            _contiguous_chunks(k[k_start:k_end], v[k_start:k_end], k_pos[k_start:k_end]),
            num_kv_heads,
            scale,
        )
        out[q_start:q_end] = seq_out.to(out.dtype)
        lse[q_start:q_end] = seq_lse
    return out, lse


def paged_attention_with_lse_torch(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: PagedKVCache,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch paged partial attention; see ``api.paged_attention_with_lse``."""
    out, lse = empty_partial(q)
    q_bounds = cu_seqlens_q.tolist()
    seq_kv_lens = kv_lens.tolist()
    for seq_idx, kv_len in enumerate(seq_kv_lens):
        q_start, q_end = q_bounds[seq_idx], q_bounds[seq_idx + 1]
        if q_end == q_start or kv_len == 0:
            continue
        slots = cache.slot_mapping(block_tables[seq_idx], kv_len)
        seq_out, seq_lse = _attend_one_sequence(
            q[q_start:q_end],
            q_pos[q_start:q_end],
            _paged_chunks(cache, slots),
            cache.num_kv_heads,
            scale,
        )
        out[q_start:q_end] = seq_out.to(out.dtype)
        lse[q_start:q_end] = seq_lse
    return out, lse


def merge_attention_states_torch(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE-weighted merge of partials; see ``api.merge_attention_states``.

    A partial whose lse is -inf (or NaN / +inf, which no correct kernel
    produces) contributes nothing, and its ``out`` is never read into the
    sum: LoongServe leaves empty partials uninitialised, and 0 * NaN = NaN.
    """
    lse_stack = torch.stack([lse.float() for lse in lses])  # [N, T, H]
    lse_stack = torch.where(torch.isfinite(lse_stack), lse_stack, float("-inf"))
    max_lse = lse_stack.amax(dim=0)
    safe_max = torch.where(max_lse == float("-inf"), 0.0, max_lse)
    weights = torch.exp(lse_stack - safe_max)  # [N, T, H]; 0 for empty partials
    total = weights.sum(dim=0)
    acc = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for partial, weight in zip(outs, weights, strict=True):
        contributes = (weight > 0).unsqueeze(-1)
        acc += torch.where(contributes, partial.float() * weight.unsqueeze(-1), 0.0)
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, 1.0)
    out = torch.where(has_keys.unsqueeze(-1), acc / safe_total.unsqueeze(-1), 0.0)
    lse = torch.where(has_keys, safe_max + torch.log(safe_total), float("-inf"))
    return out.to(outs[0].dtype), lse


def merge_finite_partials_torch(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of :func:`merge_attention_states_torch` for partials whose
    ``out`` is finite everywhere (what this package's kernels return: 0
    where the lse is -inf), in one multiply-add pass per partial.

    An empty partial's weight is exactly 0, and 0 times a finite value is
    0, so no mask pass is needed over the ``[T, H, D]`` tensors.
    """
    lse_stack = torch.stack([lse.float() for lse in lses])  # [N, T, H]
    max_lse = lse_stack.amax(dim=0)
    safe_max = torch.where(torch.isfinite(max_lse), max_lse, 0.0)
    weights = torch.exp(lse_stack - safe_max)  # 0 for empty partials
    total = weights.sum(dim=0)
    has_keys = total > 0
    weights = weights / torch.where(has_keys, total, 1.0)
    acc = outs[0].float() * weights[0].unsqueeze(-1)
    for partial, weight in zip(outs[1:], weights[1:], strict=True):
        acc.addcmul_(partial.float(), weight.unsqueeze(-1))
    lse = torch.where(has_keys, safe_max + torch.log(torch.where(has_keys, total, 1.0)), -math.inf)
    return acc.to(outs[0].dtype), lse
