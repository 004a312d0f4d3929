"""Triton kernels == torch reference (on CPU through the Triton interpreter).

Select with ``-m triton`` (or this file). Without CUDA the module fixture
imports the kernels under ``TRITON_INTERPRET=1`` (Triton decides compiled vs
interpreted when a ``@triton.jit`` decorator runs) and restores the
environment afterwards, so other tests in the session are unaffected. Triton
itself is imported first, in its normal mode, to reproduce the state of a
process where vLLM already imported it (see ``triton_kernels``' docstring).
Sizes are tiny: the interpreter runs every program serially in numpy.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from vllm_esp.kernels.attention import (
    KVLayout,
    PagedKVCache,
    api,
    attention_with_lse,
    merge_attention_states,
    paged_attention_with_lse,
)

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol). The interpreter rounds fp32 -> bf16 by truncation (torch
# rounds to nearest), so bf16 outputs may differ by one bf16 ulp (2^-7 relative).
TOLERANCE = {
    torch.float32: (2e-5, 0.0),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}


@pytest.fixture(scope="module", autouse=True)
def triton_kernels() -> Iterator[ModuleType]:
    """The kernel module, interpreted when there is no GPU."""
    name = "vllm_esp.kernels.attention.triton_kernels"
    if DEVICE == "cuda":
        yield importlib.import_module(name)
        return
    import triton  # noqa: F401  (library helpers compiled-mode, as after `import vllm`)

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(name)
        if not module.INTERPRETED:  # imported earlier without the interpreter
            module = importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.INTERPRETED
    yield module


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "dtype,head_size,num_heads,num_kv_heads",
    [
        (torch.float32, 64, 4, 4),
        (torch.float32, 32, 4, 1),
        (torch.bfloat16, 128, 4, 2),
        (torch.float16, 64, 4, 2),
        (torch.bfloat16, 64, 2, 2),
    ],
)
def test_varlen_triton_matches_torch(
    dtype: torch.dtype, head_size: int, num_heads: int, num_kv_heads: int
) -> None:
    """Striped/random positions, an empty key segment, rows with no visible key."""
    gen = torch.Generator().manual_seed(head_size + num_heads)
    # seq 0: 20 queries over 37 keys in striped order; seq 1: 3 queries, 0 keys;
    # seq 2: 1 decode query over 18 keys in random order.
    cu_q = torch.tensor([0, 20, 23, 24], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 37, 37, 55], dtype=torch.int32, device=DEVICE)
    stripe = torch.cat([torch.arange(r, 37, 3) for r in range(3)])
    k_pos = torch.cat([stripe, torch.randperm(18, generator=gen)]).to(DEVICE)
    q_pos = torch.cat([torch.arange(0, 40, 2), torch.tensor([5, 6, 7]), torch.tensor([17])]).to(
        DEVICE
    )
    q = _randn(24, num_heads, head_size, dtype=dtype, gen=gen)
    k = _randn(55, num_kv_heads, head_size, dtype=dtype, gen=gen)
    v = _randn(55, num_kv_heads, head_size, dtype=dtype, gen=gen)
    scale = head_size**-0.5
    expected = attention_with_lse(
        q, k, v, q_pos, k_pos, scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="torch"
    )
    out, lse = attention_with_lse(
        q, k, v, q_pos, k_pos, scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton"
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, expected[1], atol=1e-4, rtol=0)
    assert torch.all(out[20:23] == 0) and torch.all(lse[20:23] == float("-inf"))


def test_triton_empty_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    q = _randn(5, 2, 32, dtype=torch.float32, gen=gen)
    k = _randn(0, 2, 32, dtype=torch.float32, gen=gen)
    positions = torch.arange(5, device=DEVICE)
    out, lse = attention_with_lse(q, k, k, positions, positions[:0], 0.2, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    # All keys in the future of every query.
    k = _randn(4, 2, 32, dtype=torch.float32, gen=gen)
    out, lse = attention_with_lse(q, k, k, positions, positions[:4] + 10, 0.2, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize(
    "layout,cpu_isa,dtype",
    [
        (KVLayout.CPU, "vec", torch.float32),
        (KVLayout.CPU, "amx", torch.bfloat16),
        (KVLayout.FLASH, None, torch.float16),
        (KVLayout.FLASH_LEGACY, None, torch.float32),
    ],
)
def test_paged_triton_matches_torch(
    layout: KVLayout, cpu_isa: str | None, dtype: torch.dtype
) -> None:
    """Every layout's addressing, random block tables and positions, a kv_len 0 sequence."""
    gen = torch.Generator().manual_seed(11)
    num_blocks, block_size, num_kv_heads, num_heads, head_size = 10, 32, 2, 4, 64
    cache = PagedKVCache.allocate(
        num_blocks, block_size, num_kv_heads, head_size, dtype, DEVICE, layout, cpu_isa=cpu_isa
    )
    kv_lens = [45, 0, 70]
    block_tables = torch.zeros(3, 3, dtype=torch.int32)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    for i, kv_len in enumerate(kv_lens):
        num_seq_blocks = -(-kv_len // block_size)
        block_tables[i, :num_seq_blocks] = torch.tensor(
            [free.pop() for _ in range(num_seq_blocks)], dtype=torch.int32
        )
        key = _randn(kv_len, num_kv_heads, head_size, dtype=dtype, gen=gen)
        value = _randn(kv_len, num_kv_heads, head_size, dtype=dtype, gen=gen)
        positions = torch.randperm(150, generator=gen)[:kv_len]
        cache.write(cache.slot_mapping(block_tables[i].to(DEVICE), kv_len), key, value, positions)
    block_tables = block_tables.to(DEVICE)
    cu_q = torch.tensor([0, 3, 5, 6], dtype=torch.int32, device=DEVICE)
    q = _randn(6, num_heads, head_size, dtype=dtype, gen=gen)
    q_pos = torch.randint(0, 150, (6,), generator=gen).to(DEVICE)
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE)
    expected = paged_attention_with_lse(
        q, cu_q, q_pos, cache, block_tables, kv_lens_t, 0.125, backend="torch"
    )
    out, lse = paged_attention_with_lse(
        q, cu_q, q_pos, cache, block_tables, kv_lens_t, 0.125, backend="triton"
    )
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, expected[1], atol=1e-4, rtol=0)
    assert torch.all(out[3:5] == 0) and torch.all(lse[3:5] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_triton_matches_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(12)
    outs = [_randn(4, 3, 64, dtype=dtype, gen=gen) for _ in range(3)]
    lses = [_randn(4, 3, dtype=torch.float32, gen=gen) * 4 for _ in range(3)]
    outs[1][2] = float("nan")  # an uninitialised empty partial...
    lses[1][2] = float("-inf")  # ...marked empty must not poison the merge
    for lse in lses:
        lse[3, 0] = float("-inf")  # (token 3, head 0) is empty everywhere
    expected = merge_attention_states(outs, lses, backend="torch")
    out, lse = merge_attention_states(outs, lses, backend="triton")
    assert out.dtype == dtype and not torch.isnan(out).any()
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, expected[1], atol=1e-5, rtol=0)
    assert torch.all(out[3, 0] == 0) and lse[3, 0] == float("-inf")


def test_triton_on_cpu_without_interpreter_is_refused(
    monkeypatch: pytest.MonkeyPatch, triton_kernels: ModuleType
) -> None:
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        api._resolve_backend("triton", torch.device("cpu"))
    # auto never picks the interpreter on CPU: it picks the fused CPU kernel.
    assert api._resolve_backend("auto", torch.device("cpu")) == "cpu"
