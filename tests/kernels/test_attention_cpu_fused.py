"""The fused CPU partial-attention path (``cpu_fused``) against a float64 reference.

Covers the kernel conventions it relies on, every mask shape it dispatches on
(diagonal: prefill, chunked prefill, decode, stripes; masked: any positions),
fully masked rows and empty partials, the LSE merge of partials, and the
paged gather in every layout.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_esp.kernels.attention import (
    KVLayout,
    PagedKVCache,
    api,
    attention_with_lse,
    cpu_fused,
    merge_attention_states,
    paged_attention_with_lse,
)
from vllm_esp.kernels.attention.layout import default_cpu_attn_isa

pytestmark = pytest.mark.skipif(
    not cpu_fused.fused_cpu_available(torch.float32),
    reason="torch has no _scaled_dot_product_flash_attention_for_cpu",
)

# The kernel accumulates in fp32; bf16 outputs carry one or two bf16 roundings.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
LSE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GQA = [(4, 4), (8, 2)]
DTYPES = [torch.float32, torch.bfloat16]
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 masked softmax of one sequence; rows with no visible key -> (0, -inf)."""
    group = q.shape[1] // k.shape[1]
    keys = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, Tk, D]
    values = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [H, Tq, Tk]
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (probs @ values).transpose(0, 1), lse.transpose(0, 1)


def random_qkv(
    num_q: int, num_k: int, heads: tuple[int, int], head_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    q = torch.randn(num_q, num_heads, head_size, generator=gen).to(dtype)
    k = torch.randn(num_k, num_kv_heads, head_size, generator=gen).to(dtype)
    v = torch.randn(num_k, num_kv_heads, head_size, generator=gen).to(dtype)
    return q, k, v


def assert_matches(
    out: torch.Tensor,
    lse: torch.Tensor,
    expected: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    expected_out, expected_lse = expected
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected_out, atol=ATOL[dtype], rtol=0)
    empty = expected_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), "empty rows must be exactly the -inf rows"
    assert torch.all(out[empty.any(dim=1)] == 0)
    torch.testing.assert_close(
        lse[~empty].double(), expected_lse[~empty], atol=LSE_ATOL[dtype], rtol=0
    )


# --------------------------------------------------------------------------- kernel conventions


def test_kernel_conventions_the_wrapper_relies_on() -> None:
    """Natural-log LSE [B, H, L], top-left causal, native GQA, masked rows -> lse 0."""
    q, k, v = random_qkv(5, 7, (4, 2), 16, torch.float32, seed=0)
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    out, lse = FLASH(qh, kh, vh, 0.0, True, scale=0.3)
    # Query i at position i, key j at position j: row i sees keys 0..i (top-left).
    expected = reference(q, k, v, torch.arange(5), torch.arange(7), 0.3)
    assert lse.shape == (1, 4, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(out[0].transpose(0, 1).double(), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[0].T.double(), expected[1], atol=1e-5, rtol=0)

    mask = torch.zeros(5, 7)
    mask[2] = float("-inf")
    out, lse = FLASH(qh, kh, vh, 0.0, False, attn_mask=mask, scale=0.3)
    # Why the wrapper rewrites such rows: the kernel reports lse 0, not -inf.
    assert torch.all(out[0, :, 2] == 0) and torch.all(lse[0, :, 2] == 0)


# --------------------------------------------------------------------------- contiguous


def _positions(case: str, num_q: int, num_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if case == "prefill":
        return torch.arange(num_k)[:num_q], torch.arange(num_k)
    if case == "chunk":  # the queries are the last tokens of the context
        return torch.arange(num_k - num_q, num_k), torch.arange(num_k)
    if case == "decode":
        return torch.tensor([num_k + 3] * num_q), torch.arange(num_k)
    if case == "stripes":  # LoongServe: instance 1 of 3 queries instance 2's keys
        return torch.arange(num_q) * 3 + 1, torch.arange(num_k) * 3 + 2
    if case == "overhang":  # queries run past the last key (a peer's earlier KV)
        return torch.arange(num_k - 2, num_k - 2 + num_q), torch.arange(num_k)
    if case == "late_keys":  # the first queries precede every key
        return torch.arange(num_q), torch.arange(num_k) + num_q // 2
    if case == "random":  # no structure: the masked path, unsorted keys
        return (
            torch.randint(0, 2 * num_k, (num_q,), generator=gen),
            torch.randperm(2 * num_k, generator=gen)[:num_k],
        )
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize(
    "case", ["prefill", "chunk", "decode", "overhang", "stripes", "late_keys", "random"]
)
def test_contiguous_matches_float64(case: str, heads: tuple[int, int], dtype: torch.dtype) -> None:
    num_q, num_k = (1, 300) if case == "decode" else (40, 300)
    q, k, v = random_qkv(num_q, num_k, heads, 64, dtype, seed=len(case) + heads[1])
    q_pos, k_pos = _positions(case, num_q, num_k, seed=heads[0])
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, 0.125, backend="cpu")
    assert_matches(out, lse, reference(q, k, v, q_pos, k_pos, 0.125), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 2)])
@pytest.mark.parametrize("num_q", [1, 3, 41])
@pytest.mark.parametrize("case", ["decode", "random", "late_keys"])
def test_folded_heads_and_odd_rows_match_float64(
    case: str, num_q: int, heads: tuple[int, int], dtype: torch.dtype
) -> None:
    # Non-causal calls fold each KV head's query heads into its rows and pad
    # an odd row count (the mask rows with them): odd groups (6/2) included.
    q, k, v = random_qkv(num_q, 300, heads, 64, dtype, seed=num_q + heads[0])
    q_pos, k_pos = _positions(case, num_q, 300, seed=num_q)
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, 0.125, backend="cpu")
    assert_matches(out, lse, reference(q, k, v, q_pos, k_pos, 0.125), dtype)


@pytest.mark.parametrize("step", [1, 3])
def test_every_diagonal_offset(step: int) -> None:
    """Queries at every offset from the keys: before all, across, past all of them."""
    q, k, v = random_qkv(6, 9, (4, 2), 32, torch.float32, seed=step)
    k_pos = torch.arange(9) * step + 5
    for first in range(5 - 8 * step - 1, 5 + 10 * step, 2 if step > 1 else 1):
        for num_q in (1, 6):
            q_pos = torch.arange(num_q) * step + first
            out, lse = attention_with_lse(q[:num_q], k, v, q_pos, k_pos, 0.3, backend="cpu")
            expected = reference(q[:num_q], k, v, q_pos, k_pos, 0.3)
            assert_matches(out, lse, expected, torch.float32)


@pytest.mark.parametrize("case", ["chunk", "random"])
def test_many_kernel_blocks(case: str) -> None:
    """Long enough that the kernel splits keys into several blocks, some fully masked."""
    q, k, v = random_qkv(300, 1100, (4, 2), 32, torch.bfloat16, seed=5)
    q_pos, k_pos = _positions(case, 300, 1100, seed=6)
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, 32**-0.5, backend="cpu")
    assert_matches(out, lse, reference(q, k, v, q_pos, k_pos, 32**-0.5), torch.bfloat16)


def test_masked_path_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row chunks over visible prefixes (incl. chunks with no visible key) change nothing."""
    q, k, v = random_qkv(70, 90, (4, 2), 32, torch.float32, seed=7)
    q_pos = torch.cat([torch.arange(20), torch.randint(0, 200, (50,))])  # rows 0..19 see little
    k_pos = torch.randperm(200)[:90] + 15
    expected = reference(q, k, v, q_pos, k_pos, 0.2)
    monkeypatch.setattr(cpu_fused, "_MAX_MASK_ELEMENTS", 90 * 8)  # 8 rows per call
    out, lse = attention_with_lse(q, k, v, q_pos, k_pos, 0.2, backend="cpu")
    assert_matches(out, lse, expected, torch.float32)
    assert (expected[1][:15] == float("-inf")).all()  # some chunks are entirely empty


def test_varlen_batch_with_empty_segments() -> None:
    """Sequences with no keys or no queries, and padding rows, are (0, -inf)."""
    q, k, v = random_qkv(12, 20, (8, 2), 32, torch.bfloat16, seed=8)
    # seq 0: 5 queries / 8 keys; seq 1: 3 queries / 0 keys; seq 2: 0 queries / 12 keys;
    # seq 3: 2 queries / 0 keys (the last); rows 10, 11 are padding.
    cu_q = torch.tensor([0, 5, 8, 8, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 8, 8, 20, 20], dtype=torch.int32)
    q_pos = torch.arange(12) + 3
    k_pos = torch.cat([torch.arange(8), torch.arange(12)])
    out, lse = attention_with_lse(
        q, k, v, q_pos, k_pos, 0.1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cpu"
    )
    expected = reference(q[:5], k[:8], v[:8], q_pos[:5], k_pos[:8], 0.1)
    assert_matches(out[:5], lse[:5], expected, torch.bfloat16)
    assert torch.all(out[5:] == 0) and torch.all(lse[5:] == float("-inf"))


def test_empty_partials() -> None:
    q, k, v = random_qkv(6, 5, (4, 2), 32, torch.float32, seed=9)
    positions = torch.arange(6)
    out, lse = attention_with_lse(q, k[:0], v[:0], positions, positions[:0], 0.1, backend="cpu")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out, lse = attention_with_lse(q[:0], k, v, positions[:0], positions[:5], 0.1, backend="cpu")
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)
    # Every key in every query's future: a partial with keys but nothing visible.
    out, lse = attention_with_lse(q, k, v, positions, positions[:5] + 10, 0.1, backend="cpu")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", GQA)
def test_merge_of_two_partials_equals_the_whole(heads: tuple[int, int], dtype: torch.dtype) -> None:
    """Keys split in two (an instance may see none of a query's keys) merge back exactly."""
    q, k, v = random_qkv(30, 200, heads, 64, dtype, seed=10)
    q_pos, k_pos = torch.arange(170, 200), torch.arange(200)
    q_pos[:4] = torch.tensor([0, 1, 2, 3])  # these rows see only keys 0..3
    side = torch.zeros(200, dtype=torch.bool)
    side[torch.randperm(200)[:100]] = True
    side[:4] = True  # rows 0..3 see nothing on the other side
    partials = [
        attention_with_lse(q, k[s], v[s], q_pos, k_pos[s], 0.125, backend="cpu")
        for s in (side, ~side)
    ]
    assert (partials[1][1][:4] == float("-inf")).all()
    out, lse = merge_attention_states([o for o, _ in partials], [x for _, x in partials])
    assert_matches(out, lse, reference(q, k, v, q_pos, k_pos, 0.125), dtype)
    whole = attention_with_lse(q, k, v, q_pos, k_pos, 0.125, backend="cpu")
    torch.testing.assert_close(out.float(), whole[0].float(), atol=ATOL[dtype], rtol=0)


# --------------------------------------------------------------------------- paged


def _layouts() -> list[tuple[KVLayout, str | None, torch.dtype, int]]:
    cases: list[tuple[KVLayout, str | None, torch.dtype, int]] = [
        (KVLayout.CPU, "vec", torch.float32, 64),
        (KVLayout.CPU, "vec", torch.bfloat16, 64),
        (KVLayout.CPU, "vec16", torch.float32, 80),
        (KVLayout.CPU, "amx", torch.bfloat16, 64),  # layout math only; needs no AMX unit
        (KVLayout.FLASH, None, torch.bfloat16, 64),
        (KVLayout.FLASH_LEGACY, None, torch.float32, 64),
    ]
    return cases


@pytest.mark.parametrize("layout,isa,dtype,head_size", _layouts())
def test_gather_blocks_head_major(
    layout: KVLayout, isa: str | None, dtype: torch.dtype, head_size: int
) -> None:
    """Whole blocks (one or many) come out as unit-stride head-major rows of what was written."""
    block_size = 16 if isa == "vec16" else 32
    cache = PagedKVCache.allocate(6, block_size, 2, head_size, dtype, "cpu", layout, cpu_isa=isa)
    num_tokens = 3 * block_size
    table = torch.tensor([4, 0, 3])
    key = torch.randn(num_tokens, 2, head_size).to(dtype)
    value = torch.randn(num_tokens, 2, head_size).to(dtype)
    positions = torch.randperm(1000)[:num_tokens]
    cache.write(cache.slot_mapping(table, num_tokens), key, value, positions)
    for blocks, tokens in ((table, slice(None)), (table[2:], slice(2 * block_size, None))):
        k_heads, v_heads, k_pos = cpu_fused.gather_blocks_head_major(cache, blocks)
        assert k_heads.stride(-1) == 1 and v_heads.stride(-1) == 1
        assert torch.equal(k_heads, key[tokens].transpose(0, 1))
        assert torch.equal(v_heads, value[tokens].transpose(0, 1))
        assert torch.equal(k_pos, positions[tokens])


def _paged_problem(
    layout: KVLayout, isa: str | None, dtype: torch.dtype, head_size: int, heads: tuple[int, int]
) -> tuple[PagedKVCache, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Three sequences in shuffled blocks: contiguous, striped and permuted key positions."""
    block_size = 16 if isa == "vec16" else 32
    kv_lens = [70, 45, 33]
    gen = torch.Generator().manual_seed(11)
    cache = PagedKVCache.allocate(
        12, block_size, heads[1], head_size, dtype, "cpu", layout, cpu_isa=isa
    )
    free = torch.randperm(12, generator=gen).tolist()
    width = max(math.ceil(n / block_size) for n in kv_lens)
    tables = torch.zeros(len(kv_lens), width, dtype=torch.int32)
    seqs = []
    for i, kv_len in enumerate(kv_lens):
        blocks = [free.pop() for _ in range(math.ceil(kv_len / block_size))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        positions = [torch.arange(kv_len), torch.arange(kv_len) * 2 + 1, torch.randperm(kv_len)][i]
        _, k, v = random_qkv(0, kv_len, heads, head_size, dtype, seed=20 + i)
        cache.write(cache.slot_mapping(tables[i], kv_len), k, v, positions)
        seqs.append((k, v, positions))
    return cache, tables, seqs


@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("layout,isa,dtype,head_size", _layouts())
def test_paged_matches_float64(
    layout: KVLayout, isa: str | None, dtype: torch.dtype, head_size: int, heads: tuple[int, int]
) -> None:
    cache, tables, seqs = _paged_problem(layout, isa, dtype, head_size, heads)
    # seq 0: chunked prefill over its context; seq 1: decode; seq 2: prefill
    # with permuted key positions (masked path); then an empty-KV sequence.
    q_pos = torch.cat(
        [torch.arange(50, 70), torch.tensor([200]), torch.arange(33), torch.arange(4)]
    )
    cu_q = torch.tensor([0, 20, 21, 54, 58], dtype=torch.int32)
    tables = torch.cat([tables, tables[:1]])
    kv_lens = torch.tensor([70, 45, 33, 0], dtype=torch.int32)
    q, _, _ = random_qkv(58, 0, heads, head_size, dtype, seed=12)
    scale = head_size**-0.5
    out, lse = paged_attention_with_lse(
        q, cu_q, q_pos, cache, tables, kv_lens, scale, backend="cpu"
    )
    for i, (k, v, positions) in enumerate(seqs):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        expected = reference(q[rows], k, v, q_pos[rows], positions, scale)
        assert_matches(out[rows], lse[rows], expected, dtype)
    assert torch.all(out[54:] == 0) and torch.all(lse[54:] == float("-inf"))


def test_paged_key_chunks_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """A context gathered in several key chunks gives the one-chunk result."""
    cache, tables, seqs = _paged_problem(KVLayout.CPU, "vec", torch.float32, 64, (8, 2))
    q, _, _ = random_qkv(20, 0, (8, 2), 64, torch.float32, seed=13)
    q_pos = torch.arange(50, 70)
    cu_q = torch.tensor([0, 20], dtype=torch.int32)
    kv_lens = torch.tensor([70], dtype=torch.int32)
    monkeypatch.setattr(cpu_fused, "_MAX_GATHER_KEYS", 32)  # one block per chunk
    out, lse = paged_attention_with_lse(
        q, cu_q, q_pos, cache, tables[:1], kv_lens, 0.125, backend="cpu"
    )
    k, v, positions = seqs[0]
    assert_matches(out, lse, reference(q, k, v, q_pos, positions, 0.125), torch.float32)


# --------------------------------------------------------------------------- dispatch


def test_auto_picks_the_fused_path_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert api._resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "cpu"
    assert api._resolve_backend("torch", torch.device("cpu"), torch.bfloat16) == "torch"
    calls = []

    def spy(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(args)
        return cpu_fused.paged_attention_with_lse_cpu(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "paged_attention_with_lse_cpu", spy)
    cache, tables, _ = _paged_problem(KVLayout.CPU, "vec", torch.float32, 64, (4, 4))
    q, _, _ = random_qkv(1, 0, (4, 4), 64, torch.float32, seed=14)
    cu_q = torch.tensor([0, 1], dtype=torch.int32)
    args = (q, cu_q, torch.tensor([69]), cache, tables[:1], torch.tensor([70]), 0.125)
    fused = paged_attention_with_lse(*args)
    reference_path = paged_attention_with_lse(*args, backend="torch")
    assert len(calls) == 1
    torch.testing.assert_close(fused[0], reference_path[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(fused[1], reference_path[1], atol=1e-5, rtol=0)


def test_default_cpu_isa_layout_is_covered() -> None:
    """The ISA the engine uses here for bf16 and fp32 is one of the tested layouts."""
    tested = {isa for _, isa, _, _ in _layouts()}
    for dtype in DTYPES:
        assert default_cpu_attn_isa(dtype, 128, 64) in tested


def test_mirror_copies_only_changed_blocks_and_matches_a_fresh_gather() -> None:
    """Steps of decodes on two sequences with a shared-versions cache: the
    mirror serves what a fresh gather would, copies only the block each step
    wrote (or a block rewritten around the cache), and its partials equal
    the uncached ones."""
    from vllm_esp.kernels.attention import BlockVersions

    block_size, heads, head_size = 32, (4, 2), 64
    versions = BlockVersions(10, "cpu")
    cache = PagedKVCache.wrap(
        torch.zeros(10, heads[1], block_size, 2 * head_size, dtype=torch.bfloat16),
        KVLayout.CPU,
        cpu_isa="amx",
        versions=versions,
    )
    plain = PagedKVCache.wrap(cache.kv_cache, KVLayout.CPU, cache.positions, cpu_isa="amx")
    assert cache.mirror is not None and plain.mirror is None
    tables = [torch.tensor([7, 2, 5, 0]), torch.tensor([3, 8, 1, 4])]
    lens = [70, 33]
    gen = torch.Generator().manual_seed(3)

    def write(seq: int, start: int, num: int) -> None:
        slots = cache.slot_mapping(tables[seq], start + num)[start:]
        k = torch.randn(num, heads[1], head_size, generator=gen).to(torch.bfloat16)
        v = torch.randn(num, heads[1], head_size, generator=gen).to(torch.bfloat16)
        cache.write(slots, k, v, torch.arange(start, start + num))

    versions.new_step()
    for seq, kv_len in enumerate(lens):
        write(seq, 0, kv_len)
    for step in range(40):
        versions.new_step()
        copied = cache.mirror.num_blocks_copied
        for seq in range(2):
            write(seq, lens[seq], 1)
            lens[seq] += 1
        if step == 20:  # a block rewritten around the cache (a swap-in)
            cache.kv_cache[2] = torch.randn(cache.kv_cache[2].shape, generator=gen).to(
                torch.bfloat16
            )
            cache.mark_written(torch.tensor([2]))
        q = torch.randn(2, heads[0], head_size, generator=gen).to(torch.bfloat16)
        args = (
            torch.tensor([0, 1, 2]),
            torch.tensor(lens) - 1,
            torch.stack(tables),
            torch.tensor(lens),
            0.125,
        )
        got = cpu_fused.paged_attention_with_lse_cpu(q, args[0], args[1], cache, *args[2:])
        want = cpu_fused.paged_attention_with_lse_cpu(q, args[0], args[1], plain, *args[2:])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for seq in range(2):
            k, v, pos = cache.mirror.head_major(cache, tables[seq], lens[seq])
            k_ref, v_ref, pos_ref = cpu_fused.gather_blocks_head_major(
                cache, tables[seq][: -(-lens[seq] // block_size)]
            )
            assert torch.equal(k, k_ref[:, : lens[seq]]) and torch.equal(v, v_ref[:, : lens[seq]])
            assert torch.equal(pos, pos_ref[: lens[seq]])
        # After the first copy, each sequence re-copies the block it
        # appended to (and block 2 once, after its rewrite).
        if step > 0:
            assert cache.mirror.num_blocks_copied - copied == 2 + (step == 20)
    assert cache.mirror.num_blocks_reused > cache.mirror.num_blocks_copied


def test_mirror_fraction_bounds_the_mirror_and_zero_turns_it_off() -> None:
    from vllm_esp.kernels.attention import BlockVersions

    versions = BlockVersions(8, "cpu")
    kv = torch.zeros(8, 2, 32, 128, dtype=torch.bfloat16)
    assert PagedKVCache.wrap(kv, KVLayout.CPU, versions=versions, mirror_fraction=0).mirror is None
    cache = PagedKVCache.wrap(kv, KVLayout.CPU, versions=versions, mirror_fraction=0.5)
    assert cache.mirror is not None and cache.mirror.max_tokens == 4 * 32
    for first in range(0, 8, 2):  # four 2-block sequences: only two fit
        cache.mirror.head_major(cache, torch.tensor([first, first + 1]), 64)
        assert cache.mirror.num_tokens <= 4 * 32
    # A sequence longer than the bound is gathered in chunks, unmirrored.
    assert cache.mirror.can_hold(cache, 128) and not cache.mirror.can_hold(cache, 129)
    q = torch.randn(1, 4, 64).to(torch.bfloat16)
    args = (torch.tensor([0, 1]), torch.tensor([160]), torch.arange(6)[None], torch.tensor([161]))
    copied = cache.mirror.num_blocks_copied
    got = cpu_fused.paged_attention_with_lse_cpu(q, *args[:2], cache, *args[2:], 0.125)
    plain = PagedKVCache.wrap(kv, KVLayout.CPU, cache.positions)
    want = cpu_fused.paged_attention_with_lse_cpu(q, *args[:2], plain, *args[2:], 0.125)
    assert cache.mirror.num_blocks_copied == copied
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
