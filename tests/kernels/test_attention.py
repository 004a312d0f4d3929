"""ESP attention math: torch reference, LSE merge, vLLM KV layouts, paged == contiguous.

Everything here runs the torch path on CPU. The Triton kernels are checked
against this reference in ``test_attention_triton.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_esp.kernels.attention import (
    KVLayout,
    PagedKVCache,
    attention_with_lse,
    merge_attention_states,
    paged_attention_with_lse,
    torch_ref,
)
from vllm_esp.kernels.attention.layout import default_cpu_attn_isa

# Output tolerances by dtype: the reference accumulates in fp32, so the error
# is about one rounding of the output (bf16 has 8 mantissa bits, fp16 11).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
LSE_ATOL = 1e-4
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 masked softmax over one sequence; empty rows -> (0, -inf)."""
    group = q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, Tk, D]
    values = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [H, Tq, Tk]
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    out = (probs @ values).transpose(0, 1)
    return out, lse.transpose(0, 1).float()


def random_qkv(
    num_q: int,
    num_k: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(num_q, num_heads, head_size, generator=generator).to(dtype)
    k = torch.randn(num_k, num_kv_heads, head_size, generator=generator).to(dtype)
    v = torch.randn(num_k, num_kv_heads, head_size, generator=generator).to(dtype)
    return q, k, v


def assert_empty_rows(out: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor) -> None:
    assert torch.all(out[rows] == 0)
    assert torch.all(lse[rows] == float("-inf"))


# --------------------------------------------------------------------------- reference vs SDPA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [32, 64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_reference_matches_sdpa(
    dtype: torch.dtype, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    """Varlen batch (prefill, chunked prefill, decode) vs torch SDPA per sequence."""
    gen = torch.Generator().manual_seed(head_size * 10 + num_heads)
    # (num_queries, context_len): the queries are the last tokens of the context.
    seqs = [(17, 17), (5, 40), (1, 23)]
    scale = head_size**-0.5
    qs, ks, vs, q_pos, k_pos = [], [], [], [], []
    for num_q, num_k in seqs:
        q, k, v = random_qkv(num_q, num_k, num_heads, num_kv_heads, head_size, dtype, gen)
        qs.append(q)
        ks.append(k)
        vs.append(v)
        q_pos.append(torch.arange(num_k - num_q, num_k))
        k_pos.append(torch.arange(num_k))
    cu_q = torch.tensor([0, 17, 22, 23], dtype=torch.int32)
    cu_k = torch.tensor([0, 17, 57, 80], dtype=torch.int32)
    out, lse = attention_with_lse(
        torch.cat(qs),
        torch.cat(ks),
        torch.cat(vs),
        torch.cat(q_pos),
        torch.cat(k_pos),
        scale,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        backend="torch",
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    for i in range(len(seqs)):
        q, k, v = qs[i].float(), ks[i].float(), vs[i].float()
        mask = k_pos[i][None, :] <= q_pos[i][:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        torch.testing.assert_close(out[rows].float(), expected, atol=ATOL[dtype], rtol=0)
        _, expected_lse = dense_reference(qs[i], ks[i], vs[i], q_pos[i], k_pos[i], scale)
        torch.testing.assert_close(lse[rows], expected_lse, atol=LSE_ATOL, rtol=0)


def test_reference_chunking_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many key chunks and query sub-chunks (incl. skipped future chunks) change nothing."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(70, 300, 4, 2, 64, torch.float32, gen)
    q_pos = torch.randperm(400, generator=gen)[:70]
    k_pos = torch.arange(300)  # contiguous keys: late chunks are skipped for early queries
    expected = dense_reference(q, k, v, q_pos, k_pos, 0.125)
    monkeypatch.setattr(torch_ref, "_MAX_KEY_CHUNK", 32)
    monkeypatch.setattr(torch_ref, "_MAX_SCORE_ELEMENTS", 4 * 32 * 8)  # 8 query rows per tile
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, 0.125, backend="torch")
    torch.testing.assert_close(out.double(), expected[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, expected[1], atol=LSE_ATOL, rtol=0)


def test_reference_long_context_is_memory_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """No score tile ever exceeds the budget, however long the context."""
    largest_tile = 0
    real_matmul = torch.matmul

    def spy_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonlocal largest_tile
        result = real_matmul(a, b)
        largest_tile = max(largest_tile, result.numel())
        return result

    monkeypatch.setattr(torch_ref, "_MAX_KEY_CHUNK", 256)
    monkeypatch.setattr(torch_ref, "_MAX_SCORE_ELEMENTS", 2 * 256 * 64)
    monkeypatch.setattr(torch_ref.torch, "matmul", spy_matmul)
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(512, 2048, 2, 1, 32, torch.float32, gen)
    positions = torch.arange(2048)
    out, _lse = attention_with_lse(q, k, v, positions[-512:], positions, 32**-0.5, backend="torch")
    assert largest_tile <= 2 * 256 * 64
    monkeypatch.undo()
    expected = dense_reference(q, k, v, positions[-512:], positions, 32**-0.5)
    torch.testing.assert_close(out.double(), expected[0], atol=2e-5, rtol=0)


# --------------------------------------------------------------------------- empty rows


def test_empty_rows_give_zero_and_neg_inf() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(6, 5, 4, 2, 64, torch.bfloat16, gen)
    q_pos = torch.tensor([0, 1, 2, 3, 4, 100])
    k_pos = torch.tensor([10, 11, 2, 13, 14])  # rows 0, 1 see nothing; rows 2.. see key 2
    # Segments: seq 0 = q rows 0..3 with keys 0..5; seq 1 = q rows 4..5 with no keys.
    cu_q = torch.tensor([0, 4, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 5], dtype=torch.int32)
    out, lse = attention_with_lse(
        q, k, v, q_pos, k_pos, 0.1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch"
    )
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_empty_rows(out, lse, torch.tensor([0, 1, 4, 5]))
    torch.testing.assert_close(out[2], v[2].repeat_interleave(2, dim=0), atol=0, rtol=0)

    out, lse = attention_with_lse(q, k[:0], v[:0], q_pos, k_pos[:0], 0.1, backend="torch")
    assert_empty_rows(out, lse, torch.arange(6))

    out, lse = attention_with_lse(q[:0], k, v, q_pos[:0], k_pos, 0.1, backend="torch")
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_padding_rows_past_cu_seqlens_are_empty() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(5, 4, 2, 2, 32, torch.float32, gen)
    cu_q = torch.tensor([0, 3], dtype=torch.int32)  # rows 3, 4 are padding
    cu_k = torch.tensor([0, 4], dtype=torch.int32)
    out, lse = attention_with_lse(
        q, k, v, torch.full((5,), 9), torch.arange(4), 0.2, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    assert_empty_rows(out, lse, torch.tensor([3, 4]))
    assert torch.isfinite(lse[:3]).all()


def test_invalid_inputs_are_rejected() -> None:
    q = torch.zeros(2, 3, 8)
    kv = torch.zeros(2, 2, 8)
    pos = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple"):
        attention_with_lse(q, kv, kv, pos, pos, 1.0)
    with pytest.raises(ValueError, match="both"):
        attention_with_lse(
            q[:, :2], kv, kv, pos, pos, 1.0, cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="backend"):
        attention_with_lse(q[:, :2], kv, kv, pos, pos, 1.0, backend="flash")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- merge


@dataclass(frozen=True)
class ShardedSequence:
    """One sequence: its key count, the shard of every key, its query positions."""

    num_keys: int
    shard_of_key: torch.Tensor  # [num_keys] shard id of key position i
    q_pos: torch.Tensor  # [num_queries]
    seed: int


@dataclass(frozen=True)
class ShardedProblem:
    """A varlen batch whose keys are dealt into ``num_shards`` shards."""

    seqs: list[ShardedSequence]
    num_shards: int
    head_size: int
    num_heads: int
    num_kv_heads: int


@st.composite
def sharded_problems(draw: st.DrawFn) -> ShardedProblem:
    """Shards may be empty; keys may be dealt contiguously, striped or at random."""
    num_shards = draw(st.integers(1, 4))
    order = draw(st.sampled_from(["contiguous", "striped", "random"]))
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        num_keys = draw(st.integers(0, 24))
        num_queries = draw(st.integers(1, 4))
        seed = draw(st.integers(0, 2**16))
        gen = torch.Generator().manual_seed(seed)
        if order == "contiguous":
            shard_of_key = torch.arange(num_keys) * num_shards // max(num_keys, 1)
        elif order == "striped":  # LoongServe: token t lives on rank t mod N
            shard_of_key = torch.arange(num_keys) % num_shards
        else:
            shard_of_key = torch.randint(0, num_shards, (num_keys,), generator=gen)
        if draw(st.booleans()):  # the newest tokens: prefill tail or decode
            first = max(num_keys - num_queries, 0)
            q_pos = torch.arange(first, first + num_queries)
        else:  # arbitrary, including before every key and after all of them
            q_pos = torch.randint(-1, num_keys + 1, (num_queries,), generator=gen)
        seqs.append(ShardedSequence(num_keys, shard_of_key, q_pos, seed))
    num_heads, num_kv_heads = draw(st.sampled_from([(2, 2), (4, 1), (4, 2)]))
    return ShardedProblem(
        seqs, num_shards, draw(st.sampled_from([32, 64])), num_heads, num_kv_heads
    )


@HYPOTHESIS
@given(problem=sharded_problems())
def test_sharded_keys_merge_to_unsharded(problem: ShardedProblem) -> None:
    """Any split of any sequence's keys into N shards, merged by LSE, equals the whole."""
    qs: list[torch.Tensor] = []
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    k_pos: list[torch.Tensor] = []
    shard_ids: list[torch.Tensor] = []
    for seq in problem.seqs:
        gen = torch.Generator().manual_seed(seq.seed)
        q, k, v = random_qkv(
            len(seq.q_pos),
            seq.num_keys,
            problem.num_heads,
            problem.num_kv_heads,
            problem.head_size,
            torch.float32,
            gen,
        )
        # Keys sit in a random local order; their positions travel with them.
        local_order = torch.randperm(seq.num_keys, generator=gen)
        qs.append(q)
        ks.append(k[local_order])
        vs.append(v[local_order])
        k_pos.append(local_order)  # key i of the sequence has global position i
        shard_ids.append(seq.shard_of_key[local_order])
    num_keys = [seq.num_keys for seq in problem.seqs]
    cu_q = torch.tensor([0] + [len(seq.q_pos) for seq in problem.seqs]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *num_keys]).cumsum(0).to(torch.int32)
    q_all, k_all, v_all = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    q_pos_all = torch.cat([seq.q_pos for seq in problem.seqs])
    k_pos_all, shard_all = torch.cat(k_pos), torch.cat(shard_ids)
    seq_of_key = torch.repeat_interleave(torch.arange(len(num_keys)), torch.tensor(num_keys))
    scale = problem.head_size**-0.5

    full_out, full_lse = attention_with_lse(
        q_all,
        k_all,
        v_all,
        q_pos_all,
        k_pos_all,
        scale,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        backend="torch",
    )
    outs: list[torch.Tensor] = []
    lses: list[torch.Tensor] = []
    for shard in range(problem.num_shards):
        keep = shard_all == shard
        shard_counts = torch.bincount(seq_of_key[keep], minlength=len(num_keys))
        cu_shard = torch.cat([torch.zeros(1, dtype=torch.int64), shard_counts.cumsum(0)])
        out, lse = attention_with_lse(
            q_all,
            k_all[keep],
            v_all[keep],
            q_pos_all,
            k_pos_all[keep],
            scale,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_shard.to(torch.int32),
            backend="torch",
        )
        outs.append(out)
        lses.append(lse)
    merged_out, merged_lse = merge_attention_states(outs, lses)
    assert not torch.isnan(merged_out).any() and not torch.isnan(merged_lse).any()
    torch.testing.assert_close(merged_out, full_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_lse, full_lse, atol=1e-5, rtol=0)
    # And against the fp64 dense reference per sequence.
    for i, seq in enumerate(problem.seqs):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        expected_out, expected_lse = dense_reference(
            qs[i], ks[i], vs[i], seq.q_pos, k_pos[i], scale
        )
        torch.testing.assert_close(merged_out[rows].double(), expected_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged_lse[rows], expected_lse, atol=LSE_ATOL, rtol=0)


def test_merge_ignores_empty_partials_even_if_garbage() -> None:
    gen = torch.Generator().manual_seed(5)
    out_a = torch.randn(3, 2, 16, generator=gen)
    lse_a = torch.randn(3, 2, generator=gen)
    garbage = torch.full((3, 2, 16), float("nan"))
    empty = torch.full((3, 2), float("-inf"))
    out, lse = merge_attention_states([garbage, out_a, garbage], [empty, lse_a, empty])
    torch.testing.assert_close(out, out_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, lse_a, atol=1e-6, rtol=0)

    out, lse = merge_attention_states([garbage, garbage], [empty, empty])
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_merge_matches_vllm_combine_ops() -> None:
    """Same numbers as vLLM's DCP combine and merge_attn_states (torch fallbacks)."""
    from vllm.v1.attention.ops.dcp import _lse_weighted_combine
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    gen = torch.Generator().manual_seed(6)
    outs = [torch.randn(5, 4, 64, generator=gen) for _ in range(3)]
    lses = [torch.randn(5, 4, generator=gen) * 3 for _ in range(3)]
    lses[2][1] = float("-inf")  # one empty shard for token 1
    out, lse = merge_attention_states(outs, lses)
    vllm_out, vllm_lse = _lse_weighted_combine(
        torch.stack(outs), torch.stack(lses), return_lse=True
    )
    torch.testing.assert_close(out, vllm_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, vllm_lse, atol=1e-6, rtol=0)

    two_out, two_lse = merge_attention_states(outs[:2], lses[:2])
    vllm_two = torch.empty_like(outs[0])
    vllm_two_lse = torch.empty(4, 5)
    merge_attn_states(
        vllm_two, outs[0], lses[0].T.contiguous(), outs[1], lses[1].T.contiguous(), vllm_two_lse
    )
    torch.testing.assert_close(two_out, vllm_two, atol=1e-6, rtol=0)
    torch.testing.assert_close(two_lse, vllm_two_lse.T, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- KV layouts


def _vllm_cpu_isas() -> list[str]:
    """The CPU ISAs whose reshape-and-cache op this vLLM build runs here."""
    from vllm import _custom_ops as ops

    isas = []
    for isa in ("vec", "vec16", "amx"):
        cache = torch.zeros(1, 1, 32, 64, dtype=torch.bfloat16)
        key_cache, value_cache = cache.view(1, 1, 64, 32).chunk(2, dim=2)
        kv = torch.zeros(1, 1, 32, dtype=torch.bfloat16)
        try:
            ops.cpu_attn_reshape_and_cache(
                kv, kv, key_cache, value_cache, torch.zeros(1, dtype=torch.int64), isa
            )
        except RuntimeError:
            continue
        isas.append(isa)
    return isas


VLLM_CPU_ISAS = _vllm_cpu_isas()


def _cpu_isa_cases() -> list[tuple[str, torch.dtype, int, int]]:
    cases = []
    for isa in VLLM_CPU_ISAS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if isa == "amx" and dtype == torch.float32:
                continue  # vLLM selects AMX only for bf16; fp32 has no VNNI packing
            for block_size, head_size in ((32, 64), (64, 128), (32, 32)):
                cases.append((isa, dtype, block_size, head_size))
        if isa == "vec16":
            cases.append((isa, torch.float32, 16, 80))  # vec16's reason to exist
    return cases


def vllm_cpu_write(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, isa: str
) -> None:
    """Write K/V exactly as CPUAttentionBackendImpl.do_kv_cache_update does."""
    from vllm import _custom_ops as ops

    num_blocks, num_kv_heads, block_size, _ = cache.shape
    key_cache, value_cache = cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(
        2, dim=2
    )
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def test_vllm_cpu_isas_available() -> None:
    # The layout test below must cover at least the ISA vLLM uses on x86 without AMX.
    assert "vec" in VLLM_CPU_ISAS


@pytest.mark.parametrize("isa,dtype,block_size,head_size", _cpu_isa_cases())
def test_cpu_layout_matches_vllm_reshape_and_cache(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int
) -> None:
    """Bit-identical cache after our write vs vLLM's op; gather reads vLLM's writes back."""
    gen = torch.Generator().manual_seed(block_size + head_size)
    num_blocks, num_kv_heads, num_tokens = 5, 2, 3 * block_size // 2 + 7
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # PAD_SLOT_ID is skipped by both
    key = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_size, generator=gen).to(dtype)

    vllm_tensor = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    vllm_cpu_write(vllm_tensor, key, value, slots, isa)
    ours = PagedKVCache.allocate(
        num_blocks, block_size, num_kv_heads, head_size, dtype, "cpu", KVLayout.CPU, cpu_isa=isa
    )
    ours.write(slots, key, value, torch.arange(num_tokens))
    assert torch.equal(
        ours.kv_cache.view(torch.uint8) if dtype != torch.float32 else ours.kv_cache,
        vllm_tensor.view(torch.uint8) if dtype != torch.float32 else vllm_tensor,
    )

    wrapped = PagedKVCache.wrap(vllm_tensor, KVLayout.CPU, cpu_isa=isa)
    keep = slots >= 0
    got_key, got_value, _ = wrapped.gather_slots(slots[keep])
    assert torch.equal(got_key, key[keep]) and torch.equal(got_value, value[keep])


def test_default_cpu_isa_matches_vllm() -> None:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for block_size in (16, 32, 128):
            for head_size in (64, 80, 128):
                assert default_cpu_attn_isa(dtype, block_size, head_size) == _get_attn_isa(
                    dtype, block_size, head_size
                ), (dtype, block_size, head_size)


@pytest.mark.parametrize("physical_order", ["LBHNC", "LBNHC"])
def test_flash_layout_matches_vllm_views(physical_order: str) -> None:
    """FLASH: vLLM 0.32 reads K/V as kv.transpose(1, 2).split(D, -1), in any stride order."""
    num_blocks, block_size, num_kv_heads, head_size = 4, 16, 2, 64
    if physical_order == "LBHNC":
        tensor = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size)
    else:  # physically [B, N, H, C], logically [B, H, N, C]
        tensor = torch.zeros(num_blocks, block_size, num_kv_heads, 2 * head_size).permute(
            0, 2, 1, 3
        )
    cache = PagedKVCache.wrap(tensor, KVLayout.FLASH)
    gen = torch.Generator().manual_seed(7)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:20]
    key, value = torch.randn(2, 20, num_kv_heads, head_size, generator=gen)
    cache.write(slots, key, value, torch.arange(20))
    key_cache, value_cache = tensor.transpose(1, 2).split(head_size, dim=-1)  # vLLM's own view
    blocks, offsets = slots // block_size, slots % block_size
    assert torch.equal(key_cache[blocks, offsets], key)
    assert torch.equal(value_cache[blocks, offsets], value)


def test_flash_legacy_layout() -> None:
    cache = PagedKVCache.allocate(3, 16, 2, 32, torch.float16, "cpu", KVLayout.FLASH_LEGACY)
    gen = torch.Generator().manual_seed(8)
    slots = torch.tensor([0, 17, 47, 5])
    key, value = torch.randn(2, 4, 2, 32, generator=gen).to(torch.float16)
    cache.write(slots, key, value, torch.arange(4))
    assert torch.equal(cache.kv_cache[0, slots // 16, slots % 16], key)
    assert torch.equal(cache.kv_cache[1, slots // 16, slots % 16], value)


@pytest.mark.parametrize(
    "layout,cpu_isa",
    [
        (KVLayout.CPU, "vec"),
        (KVLayout.CPU, "amx"),
        (KVLayout.FLASH, None),
        (KVLayout.FLASH_LEGACY, None),
    ],
)
def test_block_copy_roundtrip(layout: KVLayout, cpu_isa: str | None) -> None:
    """read_blocks / write_blocks move whole blocks (KV and positions) bit-exactly."""
    src = PagedKVCache.allocate(6, 32, 2, 64, torch.bfloat16, "cpu", layout, cpu_isa=cpu_isa)
    dst = PagedKVCache.allocate(4, 32, 2, 64, torch.bfloat16, "cpu", layout, cpu_isa=cpu_isa)
    gen = torch.Generator().manual_seed(9)
    key, value = torch.randn(2, 64, 2, 64, generator=gen).to(torch.bfloat16)
    src_table = torch.tensor([4, 1])
    src.write(src.slot_mapping(src_table, 64), key, value, torch.arange(100, 164))
    dst_table = torch.tensor([2, 0])
    dst.write_blocks(dst_table, src.read_blocks(src_table))
    got_key, got_value, got_pos = dst.gather(dst_table, 64)
    assert torch.equal(got_key, key) and torch.equal(got_value, value)
    assert torch.equal(got_pos, torch.arange(100, 164))
    other = PagedKVCache.allocate(
        4,
        32,
        2,
        64,
        torch.bfloat16,
        "cpu",
        KVLayout.CPU,
        cpu_isa="vec16" if cpu_isa != "vec16" else "vec",
    )
    with pytest.raises(ValueError, match="cannot write"):
        other.write_blocks(dst_table, src.read_blocks(src_table))


# --------------------------------------------------------------------------- paged == contiguous


def build_paged_problem(
    cache: PagedKVCache, kv_lens: list[int], num_queries: list[int], num_heads: int, seed: int
) -> tuple[torch.Tensor, ...]:
    """Random block tables, KV, arbitrary positions; returns paged and contiguous inputs."""
    gen = torch.Generator().manual_seed(seed)
    block_size, dtype = cache.block_size, cache.dtype
    max_blocks = max(1, max(math.ceil(n / block_size) for n in kv_lens))
    free_blocks = torch.randperm(cache.num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(kv_lens), max_blocks, dtype=torch.int32)
    keys, values, key_pos = [], [], []
    for i, kv_len in enumerate(kv_lens):
        num_blocks = math.ceil(kv_len / block_size)
        block_tables[i, :num_blocks] = torch.tensor(
            [free_blocks.pop() for _ in range(num_blocks)], dtype=torch.int32
        )
        key = torch.randn(kv_len, cache.num_kv_heads, cache.head_size, generator=gen).to(dtype)
        value = torch.randn(kv_len, cache.num_kv_heads, cache.head_size, generator=gen).to(dtype)
        positions = torch.randperm(3 * kv_len + 1, generator=gen)[:kv_len]  # any subset, any order
        cache.write(cache.slot_mapping(block_tables[i], kv_len), key, value, positions)
        keys.append(key)
        values.append(value)
        key_pos.append(positions)
    q = torch.randn(sum(num_queries), num_heads, cache.head_size, generator=gen).to(dtype)
    q_pos = torch.randint(0, 3 * max(kv_lens) + 2, (sum(num_queries),), generator=gen)
    cu_q = torch.tensor([0, *num_queries]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *kv_lens]).cumsum(0).to(torch.int32)
    return (
        q,
        cu_q,
        q_pos,
        block_tables,
        torch.tensor(kv_lens, dtype=torch.int32),
        torch.cat(keys),
        torch.cat(values),
        torch.cat(key_pos),
        cu_k,
    )


@HYPOTHESIS
@given(
    kv_lens=st.lists(st.integers(0, 70), min_size=1, max_size=3),
    num_queries=st.integers(1, 3),
    layout_case=st.sampled_from(
        [
            (KVLayout.CPU, "vec", torch.float32),
            (KVLayout.CPU, "amx", torch.bfloat16),
            (KVLayout.FLASH, None, torch.float16),
            (KVLayout.FLASH_LEGACY, None, torch.float32),
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_paged_matches_contiguous(
    kv_lens: list[int],
    num_queries: int,
    layout_case: tuple[KVLayout, str | None, torch.dtype],
    seed: int,
) -> None:
    layout, cpu_isa, dtype = layout_case
    cache = PagedKVCache.allocate(12, 32, 2, 64, dtype, "cpu", layout, cpu_isa=cpu_isa)
    (q, cu_q, q_pos, block_tables, kv_lens_t, keys, values, key_pos, cu_k) = build_paged_problem(
        cache, kv_lens, [num_queries] * len(kv_lens), 4, seed
    )
    paged = paged_attention_with_lse(
        q, cu_q, q_pos, cache, block_tables, kv_lens_t, 0.125, backend="torch"
    )
    contiguous = attention_with_lse(
        q,
        keys,
        values,
        q_pos,
        key_pos,
        0.125,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        backend="torch",
    )
    # Same math on the same values in the same order: identical.
    assert torch.equal(paged[0], contiguous[0])
    assert torch.equal(paged[1], contiguous[1])
    for i, kv_len in enumerate(kv_lens):
        if kv_len == 0:
            assert_empty_rows(paged[0], paged[1], torch.arange(int(cu_q[i]), int(cu_q[i + 1])))


# --------------------------------------------------------------------------- vs vLLM's CPU kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["decode", "prefill"])
def test_paged_matches_vllm_cpu_attention(dtype: torch.dtype, batch: str) -> None:
    """paged_attention_with_lse reads vLLM-written caches and agrees with vLLM's kernel."""
    from vllm import _custom_ops as ops

    num_heads, num_kv_heads, head_size, block_size, num_blocks = 8, 2, 64, 32, 16
    isa = default_cpu_attn_isa(dtype, block_size, head_size)  # what the engine would use
    if batch == "decode":
        seq_lens, query_lens = [37, 64, 5], [1, 1, 1]
    else:  # a fresh prefill, a chunked-prefill continuation, and a decode
        seq_lens, query_lens = [21, 70, 33], [21, 30, 1]
    gen = torch.Generator().manual_seed(10)
    tensor = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(3, 3, dtype=torch.int32)
    positions = []
    for i, seq_len in enumerate(seq_lens):
        num_seq_blocks = math.ceil(seq_len / block_size)
        block_tables[i, :num_seq_blocks] = torch.tensor(
            [free.pop() for _ in range(num_seq_blocks)], dtype=torch.int32
        )
        slots = (
            block_tables[i].long()[torch.arange(seq_len) // block_size] * block_size
            + torch.arange(seq_len) % block_size
        )
        key = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        value = torch.randn(seq_len, num_kv_heads, head_size, generator=gen).to(dtype)
        vllm_cpu_write(tensor, key, value, slots, isa)
        positions.append((slots, torch.arange(seq_len)))
    q = torch.randn(sum(query_lens), num_heads, head_size, generator=gen).to(dtype)
    cu_q = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_size**-0.5

    expected = torch.empty_like(q)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=3,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        seq_lens=seq_lens_t,
        dtype=dtype,
        query_start_loc=cu_q,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    key_cache, value_cache = tensor.view(num_blocks, num_kv_heads, 2 * block_size, head_size).chunk(
        2, dim=2
    )
    ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=expected,
        query_start_loc=cu_q,
        seq_lens=seq_lens_t,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_tables,
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
    )

    cache = PagedKVCache.wrap(tensor, KVLayout.CPU, cpu_isa=isa)
    for slots, slot_positions in positions:
        cache.positions[slots] = slot_positions
    # vLLM's causal convention: the queries are the last query_len tokens.
    q_pos = torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, query_lens, strict=True)])
    out, lse = paged_attention_with_lse(q, cu_q, q_pos, cache, block_tables, seq_lens_t, scale)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=0)
    assert torch.isfinite(lse).all()
