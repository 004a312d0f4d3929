"""Triton kernels: varlen / paged partial attention with LSE, and the LSE merge.

Importing this module decorates the kernels, and Triton decides *at that
moment* between compiling them (GPU) and interpreting them with numpy
(``TRITON_INTERPRET=1``, the only way they run on a CPU). ``api`` imports it
lazily, so set the variable before the first ``backend="triton"`` call.

Attention kernel grid: one program per (sequence, query head, BLOCK_M query
rows). Each walks its sequence's keys BLOCK_N at a time::

    program (seq, h, m):   q rows [q_start + m*BLOCK_M, +BLOCK_M) of head h
                           kv head = h // num_queries_per_kv        (GQA)
    for key tile n:        s = q @ k^T * scale * log2(e)            (fp32)
                           s = -inf where k_pos > q_pos or outside the sequence
                           online softmax in base 2: m, l, acc
    store:                 out = acc / l, lse = (m + log2 l) * ln 2   (l == 0: 0, -inf)

The paged kernel differs only in how key tile rows are found: sequence index
``j`` -> ``block_tables[seq, j // bs]`` and offset ``j % bs``, then the layout
formula of ``layout.BlockAddressing`` (constexpr TQ/DQ select plain strides or
AMX VNNI packing).

Interpreter caveats (triton 3.9), both handled here:

* ``tl.dot`` on bf16 operands multiplies the raw uint16 storage (numpy has no
  bf16), so interpreted kernels upcast every dot operand to fp32
  (``UPCAST_DOT``).
* Triton's own library helpers (``tl.sum``, ``tl.max``, ``tl.zeros``, ...) are
  ``@jit`` functions decorated when ``triton`` is first imported. If that
  happened without ``TRITON_INTERPRET=1`` (vLLM imports triton at start-up),
  an interpreted kernel cannot call them ("Cannot call @triton.jit'd outside
  of the scope of a kernel"). The kernels therefore use only builtins
  (``tl.reduce``, ``tl.full``, ...) plus their own helpers, which makes them
  work whether or not triton itself was imported under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from vllm_esp.kernels.attention.paged_cache import PagedKVCache
from vllm_esp.kernels.attention.torch_ref import empty_partial

__all__ = [
    "INTERPRETED",
    "merge_attention_states_triton",
    "paged_attention_with_lse_triton",
    "varlen_attention_with_lse_triton",
]

_LOG2_E = 1.4426950408889634  # scores are kept in base 2: exp(x) = exp2(x * log2(e))

# NOTE: @triton.jit parameters carry no Python annotations on purpose: Triton
# reads annotations as type/specialisation hints (tl.constexpr, tl.int64), so
# only those are written. The host-side launchers below are fully typed.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _online_softmax_step(
    q,
    k,
    v,
    visible,
    m_i,
    l_i,
    acc,
    qk_scale,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One key tile of base-2 online softmax; returns updated (m_i, l_i, acc)."""
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=INPUT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    # A row with no visible key so far keeps m = -inf; use 0 as the pivot so
    # exp2(-inf - pivot) is 0 instead of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
    if UPCAST_DOT:
        pv = tl.dot(p, v.to(tl.float32), input_precision=INPUT_PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _store_out_lse(
    out_ptr,
    lse_ptr,
    offs_m,
    offs_d,
    m_mask,
    d_mask,
    head,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    m_i,
    l_i,
    acc,
):
    """Normalise and store one query tile; empty rows get out 0, lse -inf."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = tl.where(has_keys[:, None], acc / l_safe[:, None], 0.0)
    # m_i and log2(l) are base-2 quantities; ln(2) converts lse back to natural log.
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = out_ptr + offs_m[:, None] * stride_o_t + head * stride_o_h + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + offs_m * stride_lse_t + head, lse, mask=m_mask)


@triton.jit
def _varlen_attention_lse_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_pos_ptr,
    k_pos_ptr,
    cu_q_ptr,
    cu_k_ptr,
    out_ptr,
    lse_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    qk_scale,
    num_queries_per_kv,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Partial attention over contiguous varlen K/V (see module docstring)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    q_end = tl.load(cu_q_ptr + seq + 1).to(tl.int64)
    row_start = q_start + tl.program_id(2) * BLOCK_M
    if row_start >= q_end:
        return
    k_start = tl.load(cu_k_ptr + seq).to(tl.int64)
    k_end = tl.load(cu_k_ptr + seq + 1).to(tl.int64)
    kv_head = head // num_queries_per_kv

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    d_mask = offs_d < HEAD_SIZE
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = tl.load(q_pos_ptr + offs_m, mask=m_mask, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for tile_start in range(k_start, k_end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Out-of-range rows load as 0 (never garbage/NaN, since p * v must be 0).
        k = tl.load(
            k_ptr + offs_n[:, None] * stride_k_t + kv_head * stride_k_h + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + offs_n[:, None] * stride_v_t + kv_head * stride_v_h + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        k_pos = tl.load(k_pos_ptr + offs_n, mask=n_mask, other=0)
        visible = n_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _online_softmax_step(
            q, k, v, visible, m_i, l_i, acc, qk_scale, UPCAST_DOT, INPUT_PRECISION
        )
    _store_out_lse(
        out_ptr,
        lse_ptr,
        offs_m,
        offs_d,
        m_mask,
        d_mask,
        head,
        stride_o_t,
        stride_o_h,
        stride_lse_t,
        m_i,
        l_i,
        acc,
    )


@triton.jit
def _in_block_offsets(
    token,
    dim,
    stride_tok_hi,
    stride_tok_lo,
    stride_dim_hi,
    stride_dim_lo,
    TQ: tl.constexpr,
    DQ: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] element offsets of (token-in-block, dim) pairs."""
    tok = (token // TQ) * stride_tok_hi + (token % TQ) * stride_tok_lo
    dim_off = (dim // DQ) * stride_dim_hi + (dim % DQ) * stride_dim_lo
    return tok[:, None] + dim_off[None, :]


@triton.jit
def _paged_attention_lse_kernel(
    q_ptr,
    q_pos_ptr,
    cu_q_ptr,
    cache_ptr,
    slot_pos_ptr,
    block_tables_ptr,
    kv_lens_ptr,
    out_ptr,
    lse_ptr,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_lse_t,
    stride_bt,
    k_base,
    k_stride_block,
    k_stride_head,
    k_stride_tok_hi,
    k_stride_tok_lo,
    k_stride_dim_hi,
    k_stride_dim_lo,
    v_base,
    v_stride_block,
    v_stride_head,
    v_stride_tok_hi,
    v_stride_tok_lo,
    v_stride_dim_hi,
    v_stride_dim_lo,
    qk_scale,
    num_queries_per_kv,
    block_size,
    K_TQ: tl.constexpr,
    K_DQ: tl.constexpr,
    V_TQ: tl.constexpr,
    V_DQ: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Partial attention over a paged cache in any ``KVLayout`` (see module docstring)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int64)
    q_end = tl.load(cu_q_ptr + seq + 1).to(tl.int64)
    row_start = q_start + tl.program_id(2) * BLOCK_M
    if row_start >= q_end:
        return
    kv_len = tl.load(kv_lens_ptr + seq).to(tl.int64)
    kv_head = head // num_queries_per_kv

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    d_mask = offs_d < HEAD_SIZE
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = tl.load(q_pos_ptr + offs_m, mask=m_mask, other=0)
    k_head_ptr = cache_ptr + k_base + kv_head * k_stride_head
    v_head_ptr = cache_ptr + v_base + kv_head * v_stride_head

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for tile_start in range(0, kv_len, BLOCK_N):
        #   sequence index j -> (block_tables[seq, j // bs], j % bs) -> slot
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        block = tl.load(
            block_tables_ptr + seq * stride_bt + offs_n // block_size, mask=n_mask, other=0
        ).to(tl.int64)
        token = offs_n % block_size
        k_pos = tl.load(slot_pos_ptr + block * block_size + token, mask=n_mask, other=0)
        k_off = block[:, None] * k_stride_block + _in_block_offsets(
            token,
            offs_d,
            k_stride_tok_hi,
            k_stride_tok_lo,
            k_stride_dim_hi,
            k_stride_dim_lo,
            K_TQ,
            K_DQ,
        )
        v_off = block[:, None] * v_stride_block + _in_block_offsets(
            token,
            offs_d,
            v_stride_tok_hi,
            v_stride_tok_lo,
            v_stride_dim_hi,
            v_stride_dim_lo,
            V_TQ,
            V_DQ,
        )
        # Slots past kv_len may hold stale or uninitialised data: never load them.
        k = tl.load(k_head_ptr + k_off, mask=kv_mask, other=0.0)
        v = tl.load(v_head_ptr + v_off, mask=kv_mask, other=0.0)
        visible = n_mask[None, :] & (k_pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _online_softmax_step(
            q, k, v, visible, m_i, l_i, acc, qk_scale, UPCAST_DOT, INPUT_PRECISION
        )
    _store_out_lse(
        out_ptr,
        lse_ptr,
        offs_m,
        offs_d,
        m_mask,
        d_mask,
        head,
        stride_o_t,
        stride_o_h,
        stride_lse_t,
        m_i,
        l_i,
        acc,
    )


@triton.jit
def _merge_states_kernel(
    outs_ptr,
    lses_ptr,
    out_ptr,
    lse_ptr,
    num_partials,
    stride_in_n,
    stride_in_t,
    stride_in_h,
    stride_il_n,
    stride_il_t,
    stride_il_h,
    stride_o_t,
    stride_o_h,
    stride_ol_t,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge N partials of one (token, head).

    out = sum_i w_i o_i / sum_i w_i and lse = max + log(sum_i w_i), w_i = e^(lse_i - max).
    """
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE

    # Pass 1: the pivot. NaN / +inf lse count as empty (-inf), like vLLM's
    # _lse_weighted_combine.
    max_lse = tl.full([], float("-inf"), tl.float32)
    for i in range(num_partials):
        lse_i = tl.load(lses_ptr + i * stride_il_n + token * stride_il_t + head * stride_il_h)
        lse_i = tl.where((lse_i == lse_i) & (lse_i != float("inf")), lse_i, float("-inf"))
        max_lse = tl.maximum(max_lse, lse_i)
    pivot = tl.where(max_lse == float("-inf"), 0.0, max_lse)

    # Pass 2: weighted sum. An empty partial's out may be uninitialised
    # (LoongServe never writes it), so it must not reach the sum at all.
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for i in range(num_partials):
        lse_i = tl.load(lses_ptr + i * stride_il_n + token * stride_il_t + head * stride_il_h)
        lse_i = tl.where((lse_i == lse_i) & (lse_i != float("inf")), lse_i, float("-inf"))
        weight = tl.math.exp(lse_i - pivot)
        partial = tl.load(
            outs_ptr + i * stride_in_n + token * stride_in_t + head * stride_in_h + offs_d,
            mask=d_mask,
            other=0.0,
        )
        # A select, not a multiply: weight 0 must drop a NaN partial entirely.
        acc += tl.where(weight > 0.0, partial.to(tl.float32) * weight, 0.0)
        total += weight
    has_keys = total > 0.0
    total_safe = tl.where(has_keys, total, 1.0)
    out = tl.where(has_keys, acc / total_safe, 0.0)
    lse = tl.where(has_keys, pivot + tl.math.log(total_safe), float("-inf"))
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )
    tl.store(lse_ptr + token * stride_ol_t + head, lse)


# The decorator has already chosen compiled vs interpreted for every kernel.
INTERPRETED: bool = isinstance(_merge_states_kernel, InterpretedFunction)


def _tile_sizes(max_seqlen_q: int, head_size: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_size))
    if INTERPRETED:
        # numpy executes every program serially: keep tiles (and waste) small.
        return 16, 16, block_d
    block_m = 64 if max_seqlen_q > 16 else 16  # decode batches have 1 row each
    block_n = 64 if head_size <= 128 else 32
    return block_m, block_n, block_d


def _input_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs must not silently drop to TF32 on Ampere+; 16-bit inputs
    # keep the target's default (None).
    return "ieee" if dtype == torch.float32 else None


def _launch_config(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float
) -> tuple[int, int, int, float, dict[str, object]]:
    num_seqs = cu_seqlens_q.shape[0] - 1
    max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if num_seqs > 0 else 0
    block_m, block_n, block_d = _tile_sizes(max_seqlen_q, q.shape[2])
    meta: dict[str, object] = dict(
        HEAD_SIZE=q.shape[2],
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST_DOT=INTERPRETED,
        INPUT_PRECISION=_input_precision(q.dtype),
    )
    return num_seqs, max_seqlen_q, block_m, scale * _LOG2_E, meta


def varlen_attention_with_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton varlen partial attention; inputs validated by ``api.attention_with_lse``."""
    out, lse = empty_partial(q)  # rows past cu_seqlens_q[-1] are never visited
    num_seqs, max_seqlen_q, block_m, qk_scale, meta = _launch_config(q, cu_seqlens_q, scale)
    if max_seqlen_q == 0 or k.shape[0] == 0:
        return out, lse
    grid = (num_seqs, q.shape[1], triton.cdiv(max_seqlen_q, block_m))
    _varlen_attention_lse_kernel[grid](
        q,
        k,
        v,
        q_pos,
        k_pos,
        cu_seqlens_q,
        cu_seqlens_k,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        qk_scale,
        q.shape[1] // k.shape[1],
        **meta,
    )
    return out, lse


def paged_attention_with_lse_triton(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    q_pos: torch.Tensor,
    cache: PagedKVCache,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton paged partial attention; inputs validated by ``api.paged_attention_with_lse``."""
    out, lse = empty_partial(q)  # rows past cu_seqlens_q[-1] are never visited
    num_seqs, max_seqlen_q, block_m, qk_scale, meta = _launch_config(q, cu_seqlens_q, scale)
    if max_seqlen_q == 0:
        return out, lse
    key, value = cache.addressing.key, cache.addressing.value
    grid = (num_seqs, q.shape[1], triton.cdiv(max_seqlen_q, block_m))
    _paged_attention_lse_kernel[grid](
        q,
        q_pos,
        cu_seqlens_q,
        cache.kv_cache,
        cache.positions,
        block_tables,
        kv_lens,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        block_tables.stride(0),
        key.base,
        key.stride_block,
        key.stride_head,
        key.stride_tok_hi,
        key.stride_tok_lo,
        key.stride_dim_hi,
        key.stride_dim_lo,
        value.base,
        value.stride_block,
        value.stride_head,
        value.stride_tok_hi,
        value.stride_tok_lo,
        value.stride_dim_hi,
        value.stride_dim_lo,
        qk_scale,
        q.shape[1] // cache.num_kv_heads,
        cache.block_size,
        K_TQ=key.token_group,
        K_DQ=key.dim_group,
        V_TQ=value.token_group,
        V_DQ=value.dim_group,
        **meta,
    )
    return out, lse


def merge_attention_states_triton(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton LSE merge; inputs validated by ``api.merge_attention_states``."""
    stack_dtype = outs[0].dtype
    for partial in outs[1:]:
        stack_dtype = torch.promote_types(stack_dtype, partial.dtype)
    out_stack = torch.stack([partial.to(stack_dtype) for partial in outs])  # [N, T, H, D]
    lse_stack = torch.stack([lse.float() for lse in lses])  # [N, T, H]
    num_partials, num_tokens, num_heads, head_size = out_stack.shape
    out = torch.empty(outs[0].shape, dtype=outs[0].dtype, device=outs[0].device)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=outs[0].device)
    if num_tokens == 0 or num_heads == 0:
        return out, lse
    _merge_states_kernel[(num_tokens, num_heads)](
        out_stack,
        lse_stack,
        out,
        lse,
        num_partials,
        out_stack.stride(0),
        out_stack.stride(1),
        out_stack.stride(2),
        lse_stack.stride(0),
        lse_stack.stride(1),
        lse_stack.stride(2),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        HEAD_SIZE=head_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_size)),
    )
    return out, lse
