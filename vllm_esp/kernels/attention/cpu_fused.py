"""Fused CPU partial attention with LSE on torch's flash-attention-for-CPU kernel.

``aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p,
is_causal, *, attn_mask, scale) -> (out, lse)`` is a blocked online-softmax
kernel (fp32 accumulation, AMX / AVX-512 GEMMs for 16-bit inputs) that also
returns the log-sum-exp. What it does, checked in torch 2.13 (the tests pin
the points the results depend on):

* ``lse`` is ``[B, H, L]`` float32 in natural log, ``log(sum(exp(score)))``.
* GQA is native: query head ``h`` reads KV head ``h // (Hq // Hkv)``, as vLLM.
  Native GQA with one query row per head (every decode), or any odd row
  count, runs its 16-bit GEMMs several times slower; ``_flash`` folds the
  heads into rows in calls without a causal mask and pads odd row counts.
* ``is_causal`` is top-left aligned (row ``i`` sees keys ``j <= i``).
* ``attn_mask`` is additive and must have ``q``'s dtype (no bool masks).
* A row with every key masked comes back as out 0 with lse **0**; zero keys
  crash the process (SIGFPE). Both are handled here: such rows get lse -inf,
  which is what ``merge_attention_states`` reads as an empty partial.

ESP masks are causal on per-token global positions. Two shapes cover them::

    arithmetic: q_pos = q0 + s*i, k_pos = k0 + s*j (same step s)
        prefill, chunked prefill, decode (s = 1) and LoongServe stripes
        (s = number of instances). Row i sees keys j <= i + off, with
        off = floor((q0 - k0) / s):

               keys  0 .. off-1 | off .. off+nq-1
        row 0        all        | x
        row 1        all        | x x          one non-causal call on the
        row 2        all        | x x x        left part, one top-left causal
                                               call on the right, LSE-merged
    anything else: keys sorted by position, so each row sees a prefix of
        them; rows go in chunks, each one call over the longest prefix in
        the chunk with an additive 0 / -inf mask.

The paged entry point gathers a sequence's blocks once per call (one
``index_select`` of whole blocks, then one reordering copy into head-major
``[Hkv, keys, D]``, the layout the kernel reads fastest) and runs the same
code. Long contexts are gathered in bounded key chunks and merged. A cache
with a mirror (``mirror.py``, the engine's caches) keeps each sequence's
head-major copy across steps and re-gathers only the blocks that changed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vllm_esp.kernels.attention.layout import BlockAddressing, KVLayout, layer_addressing
from vllm_esp.kernels.attention.paged_cache import PagedKVCache
from vllm_esp.kernels.attention.torch_ref import empty_partial, merge_finite_partials_torch

__all__ = [
    "attention_with_lse_cpu",
    "fused_cpu_available",
    "gather_blocks_head_major",
    "paged_attention_with_lse_cpu",
]

# Additive-mask elements per kernel call (8 MiB of bf16); bounds the general path.
_MAX_MASK_ELEMENTS = 1 << 22
# Keys gathered out of a paged cache at a time (64 MiB of bf16 K+V at 8 KV heads x 128).
_MAX_GATHER_KEYS = 16384

Partial = tuple[torch.Tensor, torch.Tensor]  # out [nq, Hq, D] (q dtype), lse [nq, Hq] fp32


def _flash_op() -> Any:
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_cpu_available(dtype: torch.dtype) -> bool:
    """Whether this torch build has the kernel and it takes ``dtype``."""
    return _flash_op() is not None and dtype in (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------- kernel call


def _flash(
    q: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> Partial:
    """One kernel call: ``q [nq, Hq, D]`` over ``k/v [Hkv, nk, D]`` (``nk > 0``).

    The kernel's 16-bit GEMMs run several times slower on one (or any odd
    number of) query row per head, which is every decode. So without a
    causal mask the ``G = Hq / Hkv`` query heads that share a KV head are
    folded into that head's rows, and every call pads an odd row count
    (``_call``)::

        q [nq, Hq, D] -> [Hkv, G*nq, D]    row g*nq + i = head kvh*G + g, query i
    """
    num_queries, num_heads, head_size = q.shape
    num_kv_heads = k_heads.shape[0]
    group = num_heads // num_kv_heads
    if causal or group == 1:
        out, lse = _call(q.transpose(0, 1), k_heads, v_heads, scale, causal, mask)
        return out.transpose(0, 1), lse.transpose(0, 1)
    rows = q.permute(1, 0, 2).reshape(num_kv_heads, group * num_queries, head_size)
    out, lse = _call(
        rows, k_heads, v_heads, scale, False, None if mask is None else mask.repeat(group, 1)
    )
    out = out.view(num_kv_heads, group, num_queries, head_size)
    lse = lse.view(num_kv_heads, group, num_queries)
    return (
        out.permute(2, 0, 1, 3).reshape(num_queries, num_heads, head_size),
        lse.permute(2, 0, 1).reshape(num_queries, num_heads),
    )


def _call(
    rows: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on ``rows [H, n, D]``: ``(out [H, n, D], lse [H, n])``. An
    odd ``n`` gets a copy of its last row appended and dropped again (with
    a top-left causal mask the extra row only sees more keys)."""
    num_rows = rows.shape[1]
    if num_rows % 2:
        rows = torch.cat((rows, rows[:, -1:]), dim=1)
        if mask is not None:
            mask = torch.cat((mask, mask[-1:]), dim=0)
    out, lse = _flash_op()(
        rows.unsqueeze(0),
        k_heads.unsqueeze(0),
        v_heads.unsqueeze(0),
        0.0,
        causal,
        attn_mask=mask,
        scale=scale,
    )
    return out[0, :, :num_rows], lse[0, :, :num_rows]


def _assemble(q: torch.Tensor, pieces: list[tuple[int, int, Partial]]) -> Partial:
    """The full ``[nq, ...]`` result from row ranges; uncovered rows are (0, -inf).

    A single piece covering every row is returned as is: the kernel's output
    for token-major queries is already a dense ``[nq, Hq, D]``.
    """
    if len(pieces) == 1 and pieces[0][:2] == (0, q.shape[0]):
        out, lse = pieces[0][2]
        return out if out.is_contiguous() else out.contiguous(), lse
    out, lse = empty_partial(q)
    for start, end, (piece_out, piece_lse) in pieces:
        out[start:end] = piece_out
        lse[start:end] = piece_lse
    return out, lse


def _merge(parts: list[Partial]) -> Partial:
    if len(parts) == 1:
        return parts[0]
    # Kernel outputs: finite everywhere (rows without keys are 0).
    return merge_finite_partials_torch([o for o, _ in parts], [lse for _, lse in parts])


def _merge_two_nonempty(first: Partial, second: Partial) -> Partial:
    """LSE merge of two partials in which every row saw a key (finite lse):
    four passes over ``out`` instead of the general merge's guarded ones."""
    (first_out, first_lse), (second_out, second_lse) = first, second
    lse = torch.logaddexp(first_lse, second_lse)
    first_weight = torch.exp(first_lse - lse).unsqueeze(-1)
    second_weight = torch.exp(second_lse - lse).unsqueeze(-1)
    out = torch.addcmul(first_out * first_weight, second_out, second_weight)
    return out.to(first_out.dtype), lse


# ----------------------------------------------------------------------- mask shapes


def _arithmetic(positions: torch.Tensor) -> tuple[int, int] | None:
    """``(first, step)`` if ``positions`` is ``first + step * i`` with
    ``step > 0``; a single position has step 0 (any step fits it)."""
    if positions.shape[0] == 1:
        return int(positions[0]), 0
    first, second = positions[:2].tolist()
    step = second - first
    if step <= 0 or int(positions[-1]) != first + step * (positions.shape[0] - 1):
        return None
    if not bool(torch.all(positions.diff() == step)):
        return None
    return first, step


def _diagonal_offset(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int | None:
    """``off`` such that row ``i`` sees key ``j`` iff ``j <= i + off``, if the
    positions are arithmetic with one step; else None."""
    q_run, k_run = _arithmetic(q_pos), _arithmetic(k_pos)
    if q_run is None or k_run is None:
        return None
    (q_first, q_step), (k_first, k_step) = q_run, k_run
    if q_step and k_step and q_step != k_step:
        return None
    step = q_step or k_step or 1
    return (q_first - k_first) // step


def _attend_diagonal(
    q: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor, scale: float, offset: int
) -> Partial:
    """Row ``i`` sees keys ``j <= i + offset``: at most two calls, no mask."""
    num_queries, num_keys = q.shape[0], k_heads.shape[1]
    first_row = max(0, -offset)  # rows before it precede every key
    if first_row >= num_queries:
        return empty_partial(q)
    rows, offset = q[first_row:], offset + first_row
    if rows.shape[0] == 1 or offset >= num_keys - 1:
        # One row, or every row sees every key (decode): keys 0..offset.
        seen = min(num_keys, offset + 1)
        part = _flash(rows, k_heads[:, :seen], v_heads[:, :seen], scale)
    else:
        diagonal = slice(offset, min(num_keys, offset + rows.shape[0]))
        part = _flash(rows, k_heads[:, diagonal], v_heads[:, diagonal], scale, causal=True)
        if offset > 0:  # every row also sees all of keys 0..offset-1
            prefix = _flash(rows, k_heads[:, :offset], v_heads[:, :offset], scale)
            part = _merge_two_nonempty(prefix, part)
    return _assemble(q, [(first_row, num_queries, part)])


def _attend_masked(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> Partial:
    """Any positions: sort the keys, then row chunks over visible key prefixes."""
    if not bool(torch.all(k_pos[1:] >= k_pos[:-1])):
        # Attention is invariant to key order; sorted keys make every row's
        # visible set a prefix.
        order = torch.argsort(k_pos, stable=True)
        k_pos = k_pos[order]
        k_heads, v_heads = k_heads.index_select(1, order), v_heads.index_select(1, order)
    num_queries, num_keys = q.shape[0], k_heads.shape[1]
    visible = torch.searchsorted(k_pos, q_pos, right=True)  # [nq] prefix lengths
    pieces = []
    rows_per_call = max(1, _MAX_MASK_ELEMENTS // num_keys)
    for start in range(0, num_queries, rows_per_call):
        end = min(start + rows_per_call, num_queries)
        counts = visible[start:end]
        fewest, most = int(counts.min()), int(counts.max())
        if most == 0:
            continue
        mask = None
        if fewest < most:
            hidden = torch.arange(most, device=q.device)[None, :] >= counts[:, None]
            mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(hidden, float("-inf"))
        chunk_out, chunk_lse = _flash(
            q[start:end], k_heads[:, :most], v_heads[:, :most], scale, mask=mask
        )
        if fewest == 0:  # the kernel gives lse 0 to rows it masked entirely
            empty = counts == 0
            chunk_out = chunk_out.masked_fill(empty[:, None, None], 0.0)
            chunk_lse = chunk_lse.masked_fill(empty[:, None], float("-inf"))
        pieces.append((start, end, (chunk_out, chunk_lse)))
    return _assemble(q, pieces)


def _attend(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> Partial:
    """One sequence: ``q [nq, Hq, D]`` over head-major ``k/v [Hkv, nk, D]``."""
    if q.shape[0] == 0 or k_heads.shape[1] == 0:
        return empty_partial(q)
    offset = _diagonal_offset(q_pos, k_pos)
    if offset is not None:
        return _attend_diagonal(q, k_heads, v_heads, scale, offset)
    return _attend_masked(q, q_pos, k_heads, v_heads, k_pos, scale)


# ----------------------------------------------------------------------- entry points


def attention_with_lse_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> Partial:
    """Fused varlen partial attention; see ``api.attention_with_lse``."""
    pieces = []
    q_bounds, k_bounds = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for seq_idx in range(len(q_bounds) - 1):
        q_start, q_end = q_bounds[seq_idx], q_bounds[seq_idx + 1]
        k_start, k_end = k_bounds[seq_idx], k_bounds[seq_idx + 1]
        if q_end == q_start or k_end == k_start:
            continue
        part = _attend(
            q[q_start:q_end],
            q_pos[q_start:q_end],
            k[k_start:k_end].transpose(0, 1),
            v[k_start:k_end].transpose(0, 1),
            k_pos[k_start:k_end],
            scale,
        )
        pieces.append((q_start, q_end, part))
    return _assemble(q, pieces)


def _as_words(raw: torch.Tensor, addr: BlockAddressing, shape: tuple[int, ...]) -> torch.Tensor:
    """The 5-D ``[n, hkv, bs/TQ, TQ, D/2]`` view of ``raw`` moving each pair of
    adjacent 16-bit dims as one 32-bit word (AMX's VNNI-packed K)."""
    num_blocks, num_kv_heads, block_size, head_size = shape
    strides = (
        addr.stride_block,
        addr.stride_head,
        addr.stride_tok_hi,
        addr.stride_tok_lo,
        addr.stride_dim_hi,
    )
    words = raw.view(-1).view(torch.int32)
    return torch.as_strided(
        words,
        (
            num_blocks,
            num_kv_heads,
            block_size // addr.token_group,
            addr.token_group,
            head_size // 2,
        ),
        tuple(s // 2 for s in strides),
        words.storage_offset() + addr.base // 2,
    )


def _head_major(raw: torch.Tensor, addr: BlockAddressing, shape: tuple[int, ...]) -> torch.Tensor:
    """Plain ``[hkv, n * bs, D]`` copy of K or V out of whole gathered blocks."""
    num_blocks, num_kv_heads, block_size, head_size = shape
    strides = (
        addr.base,
        addr.stride_block,
        addr.stride_head,
        addr.stride_tok_hi,
        addr.stride_tok_lo,
        addr.stride_dim_hi,
    )
    if (
        raw.element_size() == 2
        and addr.dim_group == 2
        and addr.stride_dim_lo == 1
        and raw.is_contiguous()
        and all(s % 2 == 0 for s in strides)
    ):
        # 2-byte copies are several times slower than 4-byte ones here.
        words = _as_words(raw, addr, shape).permute(1, 0, 2, 3, 4)
        word_rows = _unit_stride_rows(
            words.reshape(num_kv_heads, num_blocks * block_size, head_size // 2)
        )
        return word_rows.view(raw.dtype)
    view = addr.view(raw, *shape).permute(1, 0, 2, 3, 4, 5)
    return _unit_stride_rows(view.reshape(num_kv_heads, num_blocks * block_size, head_size))


def _unit_stride_rows(rows: torch.Tensor) -> torch.Tensor:
    # reshape returns a view where it can (a single block); the kernel reads
    # each row as one dense run and silently misreads any other stride.
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def gather_blocks_head_major(
    cache: PagedKVCache, block_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, v [Hkv, n * bs, D], positions [n * bs])`` of whole blocks, in order.

    One ``index_select`` copies the blocks' raw bytes (a memcpy per block);
    one reordering copy per K and V turns the layout's in-block order into
    plain head-major rows.
    """
    ids = block_ids.to(device=cache.device, dtype=torch.int64)
    block_dim = 1 if cache.layout is KVLayout.FLASH_LEGACY else 0
    raw = cache.kv_cache.index_select(block_dim, ids)
    addr = layer_addressing(raw, cache.layout, cache.cpu_isa)
    shape = (ids.shape[0], cache.num_kv_heads, cache.block_size, cache.head_size)
    positions = cache.positions.view(cache.num_blocks, cache.block_size).index_select(0, ids)
    return (
        _head_major(raw, addr.key, shape),
        _head_major(raw, addr.value, shape),
        positions.view(-1),
    )


def _attend_paged(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: PagedKVCache,
    block_table_row: torch.Tensor,
    kv_len: int,
    scale: float,
) -> Partial:
    """One sequence over its first ``kv_len`` paged slots: from the cache's
    head-major mirror when it has one, else gathered in key chunks."""
    if cache.mirror is not None and cache.mirror.can_hold(cache, kv_len):
        k_heads, v_heads, k_pos = cache.mirror.head_major(cache, block_table_row, kv_len)
        return _attend(q, q_pos, k_heads, v_heads, k_pos, scale)
    blocks_per_chunk = max(1, _MAX_GATHER_KEYS // cache.block_size)
    num_blocks = math.ceil(kv_len / cache.block_size)
    parts = []
    for first in range(0, num_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, num_blocks)
        k_heads, v_heads, k_pos = gather_blocks_head_major(cache, block_table_row[first:last])
        num_keys = min(kv_len, last * cache.block_size) - first * cache.block_size
        parts.append(
            _attend(q, q_pos, k_heads[:, :num_keys], v_heads[:, :num_keys], k_pos[:num_keys], scale)
        )
    return _merge(parts)


def paged_attention_with_lse_cpu(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: PagedKVCache,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> Partial:
    """Fused paged partial attention; see ``api.paged_attention_with_lse``."""
    pieces = []
    q_bounds = cu_seqlens_q.tolist()
    for seq_idx, kv_len in enumerate(kv_lens.tolist()):
        q_start, q_end = q_bounds[seq_idx], q_bounds[seq_idx + 1]
        if q_end == q_start or kv_len == 0:
            continue
        part = _attend_paged(
            q[q_start:q_end], q_pos[q_start:q_end], cache, block_tables[seq_idx], kv_len, scale
        )
        pieces.append((q_start, q_end, part))
    return _assemble(q, pieces)
