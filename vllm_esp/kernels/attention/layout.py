"""Where vLLM's attention backends put one token's K and V inside a paged cache.

Every layout here is described by one small descriptor, ``BlockAddressing``,
that maps ``(block, kv_head, token_in_block, dim)`` to an element offset in
the layer tensor's storage. The torch paths (``PagedKVCache``) and the Triton
kernels evaluate the same formula, so both read exactly what vLLM wrote.

Layouts (vLLM 0.32, per-layer tensor as handed to ``AttentionImpl.forward``)
---------------------------------------------------------------------------
``KVLayout.CPU`` -- ``CPU_ATTN``: ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``, row-major (the backend only accepts ``LBHNC``). The backend
views it as ``[nb, hkv, 2 * bs, D]`` and splits dim 2 in halves, so each
``(block, kv_head)`` owns ``2 * bs * D`` contiguous elements: the first
``bs * D`` are K, the next ``bs * D`` are V. Inside each half the order is
chosen by the CPU ISA that ``cpu_attn_reshape_and_cache`` is given (verified
by writing index-encoded tensors with vLLM's own op, see the tests)::

    ISA "vec" / "vec16" (AVX2/AVX-512 without AMX, or block/head sizes AMX
    cannot take): K transposed, V plain

        K half: [D][bs]     offset = d * bs + t
        V half: [bs][D]     offset = t * D + d

    ISA "amx" (bf16 on CPUs with AMX tiles, bs % 32 == 0, D % 32 == 0):
    VNNI packing, pairs of 2-byte elements interleaved for the tile ops

        K half: 16-token groups, each [D/2][16 tokens][2 dims]
                offset = (t // 16) * 16 * D + (d // 2) * 32 + (t % 16) * 2 + d % 2
        V half: 16-dim groups, each [bs/2][16 dims][2 tokens]
                offset = (d // 16) * 16 * bs + (t // 2) * 32 + (d % 16) * 2 + t % 2

``KVLayout.FLASH`` -- ``FLASH_ATTN`` (also ``TRITON_ATTN``, ``FLASHINFER``,
``FLEX_ATTENTION`` in 0.32): logical ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` with any physical stride order (``KVCacheLayout`` LBHNC,
LBNHC, ...). The backend does ``kv.transpose(1, 2).split(D, dim=-1)``: K is
``kv[b, h, t, :D]`` and V is ``kv[b, h, t, D:]``. NOTE: earlier vLLM releases used
``[2, num_blocks, block_size, num_kv_heads, D]``; that is ``FLASH_LEGACY``.

``KVLayout.FLASH_LEGACY``: ``[2, num_blocks, block_size, num_kv_heads, D]``,
K is ``kv[0, b, t, h]``, V is ``kv[1, b, t, h]``.

All of them fit one two-level strided formula (``t`` = token in block, ``d`` =
dim; ``TQ`` and ``DQ`` are 1 for the plainly strided layouts)::

    offset(b, h, t, d) = base + b * stride_block + h * stride_head
                       + (t // TQ) * stride_tok_hi + (t % TQ) * stride_tok_lo
                       + (d // DQ) * stride_dim_hi + (d % DQ) * stride_dim_lo
"""

from __future__ import annotations

import enum
import platform
from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_CPU_ISAS",
    "BlockAddressing",
    "KVLayout",
    "LayerAddressing",
    "default_cpu_attn_isa",
    "layer_addressing",
]


class KVLayout(enum.Enum):
    """The per-layer paged KV tensor layouts of vLLM's attention backends."""

    CPU = "cpu"
    """``CPU_ATTN``: ``[nb, hkv, bs, 2*D]`` with the ISA-specific in-block order."""
    FLASH = "flash"
    """vLLM 0.32 ``FLASH_ATTN``: logical ``[nb, hkv, bs, 2*D]``, K/V split on the last dim."""
    FLASH_LEGACY = "flash_legacy"
    """``FLASH_ATTN`` of earlier vLLM releases: ``[2, nb, bs, hkv, D]``."""


# The in-block orders verified against vLLM's own cpu_attn_reshape_and_cache.
# NEON, VXE, VSX and RVV builds are not available on x86 to check against, so
# they are refused rather than guessed.
SUPPORTED_CPU_ISAS: tuple[str, ...] = ("vec", "vec16", "amx")

# AMX tiles take 16 rows of VNNI pairs (2 x 16-bit elements per 32-bit lane).
_AMX_TOKEN_GROUP = 16
_AMX_DIM_GROUP = 16
_AMX_PAIR = 2


@dataclass(frozen=True)
class BlockAddressing:
    """Element offsets of one of K or V inside one layer tensor's storage.

    ``offset(b, h, t, d)`` is given in the module docstring. ``base`` is
    relative to the layer tensor's ``storage_offset()``.
    """

    base: int
    stride_block: int
    stride_head: int
    token_group: int  # TQ
    stride_tok_hi: int
    stride_tok_lo: int
    dim_group: int  # DQ
    stride_dim_hi: int
    stride_dim_lo: int

    def view(
        self,
        tensor: torch.Tensor,
        num_blocks: int,
        num_kv_heads: int,
        block_size: int,
        head_size: int,
    ) -> torch.Tensor:
        """A 6-D view ``[nb, hkv, bs/TQ, TQ, D/DQ, DQ]`` sharing ``tensor``'s storage.

        Indexing it as ``view[blocks, :, t // TQ, t % TQ]`` yields
        ``[n, hkv, D/DQ, DQ]``, which reshapes to ``[n, hkv, D]`` in plain
        dim order; assigning through the same index writes into the cache.
        """
        return torch.as_strided(
            tensor,
            (
                num_blocks,
                num_kv_heads,
                block_size // self.token_group,
                self.token_group,
                head_size // self.dim_group,
                self.dim_group,
            ),
            (
                self.stride_block,
                self.stride_head,
                self.stride_tok_hi,
                self.stride_tok_lo,
                self.stride_dim_hi,
                self.stride_dim_lo,
            ),
            tensor.storage_offset() + self.base,
        )


@dataclass(frozen=True)
class LayerAddressing:
    """K and V addressing of one layer tensor plus its logical geometry."""

    key: BlockAddressing
    value: BlockAddressing
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_size: int


def default_cpu_attn_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The ISA vLLM's ``CPU_ATTN`` picks on this machine for a non-fp8 cache.

    Mirrors ``vllm.v1.attention.backends.cpu_attn._get_attn_isa`` for x86 (a
    test keeps the two in step). The engine stores the choice as
    ``layer.isa``; prefer passing that to ``PagedKVCache.wrap`` when available.
    """
    if head_size % 32 != 0 and head_size % 16 == 0:
        return "vec16"
    machine = platform.machine().lower()
    # Non-x86 builds use their own ISA kernels; naming them makes
    # layer_addressing refuse them instead of silently assuming "vec".
    for prefix, isa in (
        ("aarch64", "neon"),
        ("arm", "neon"),
        ("s390", "vxe"),
        ("ppc", "vsx"),
        ("riscv", "rvv"),
    ):
        if machine.startswith(prefix):
            return isa
    if dtype == torch.bfloat16 and block_size % 32 == 0 and torch.cpu._is_amx_tile_supported():
        return "amx"
    return "vec" if block_size % 32 == 0 else "vec16"


def _strided(
    base: int, stride_block: int, stride_head: int, stride_tok: int, stride_dim: int
) -> BlockAddressing:
    # TQ = DQ = 1: the "lo" strides multiply t % 1 == 0 and never matter.
    return BlockAddressing(base, stride_block, stride_head, 1, stride_tok, 0, 1, stride_dim, 0)


def _cpu_addressing(tensor: torch.Tensor, isa: str) -> LayerAddressing:
    num_blocks, num_kv_heads, block_size, two_d = tensor.shape
    head_size = two_d // 2
    if tensor.stride(3) != 1 or tensor.stride(2) != two_d:
        # The C++ kernels address each (block, head) half as one dense run.
        raise ValueError(
            "CPU layout needs each (block, kv_head) [bs, 2*D] slab to be "
            f"contiguous; got strides {tensor.stride()}"
        )
    stride_block, stride_head = tensor.stride(0), tensor.stride(1)
    half = block_size * head_size  # elements of the K half; V starts right after
    if isa in ("vec", "vec16"):
        key = _strided(0, stride_block, stride_head, 1, block_size)
        value = _strided(half, stride_block, stride_head, head_size, 1)
    elif isa == "amx":
        if tensor.element_size() != 2:
            raise ValueError(
                "AMX KV layout packs 16-bit pairs; dtype "
                f"{tensor.dtype} is not supported by vLLM's AMX path"
            )
        if block_size % 32 != 0 or head_size % 32 != 0:
            raise ValueError(
                "vLLM uses the AMX layout only for block_size and "
                f"head_size multiples of 32; got {block_size}, {head_size}"
            )
        #   K half, per 16-token group g (t = 16 g + i, d = 2 p + j):
        #     +--------- p = 0 ---------+--------- p = 1 ---------+ ...
        #     | i=0 j0 j1 | i=1 j0 j1 ..| i=0 j0 j1 | i=1 j0 j1 ..|
        #     +-------------------------+-------------------------+
        #   32 elements per p; 16 * D elements per group.
        key = BlockAddressing(
            0,
            stride_block,
            stride_head,
            _AMX_TOKEN_GROUP,
            _AMX_TOKEN_GROUP * head_size,
            _AMX_PAIR,
            _AMX_PAIR,
            _AMX_TOKEN_GROUP * _AMX_PAIR,
            1,
        )
        #   V half, per 16-dim group c (d = 16 c + i, t = 2 r + j):
        #     +--------- r = 0 ---------+--------- r = 1 ---------+ ...
        #     | i=0 j0 j1 | i=1 j0 j1 ..| i=0 j0 j1 | i=1 j0 j1 ..|
        #     +-------------------------+-------------------------+
        #   32 elements per token pair r; 16 * bs elements per group.
        value = BlockAddressing(
            half,
            stride_block,
            stride_head,
            _AMX_PAIR,
            _AMX_DIM_GROUP * _AMX_PAIR,
            1,
            _AMX_DIM_GROUP,
            _AMX_DIM_GROUP * block_size,
            _AMX_PAIR,
        )
    else:
        raise NotImplementedError(
            f"CPU_ATTN in-block layout for ISA {isa!r} is not verified; "
            f"supported: {SUPPORTED_CPU_ISAS}"
        )
    return LayerAddressing(key, value, num_blocks, num_kv_heads, block_size, head_size)


def _flash_addressing(tensor: torch.Tensor) -> LayerAddressing:
    num_blocks, num_kv_heads, block_size, two_d = tensor.shape
    head_size = two_d // 2
    s_b, s_h, s_t, s_c = tensor.stride()
    key = _strided(0, s_b, s_h, s_t, s_c)
    value = _strided(head_size * s_c, s_b, s_h, s_t, s_c)
    return LayerAddressing(key, value, num_blocks, num_kv_heads, block_size, head_size)


def _flash_legacy_addressing(tensor: torch.Tensor) -> LayerAddressing:
    two, num_blocks, block_size, num_kv_heads, head_size = tensor.shape
    if two != 2:
        raise ValueError(
            f"FLASH_LEGACY tensor must be [2, nb, bs, hkv, D]; got {tuple(tensor.shape)}"
        )
    s_kv, s_b, s_t, s_h, s_d = tensor.stride()
    key = _strided(0, s_b, s_h, s_t, s_d)
    value = _strided(s_kv, s_b, s_h, s_t, s_d)
    return LayerAddressing(key, value, num_blocks, num_kv_heads, block_size, head_size)


def layer_addressing(
    tensor: torch.Tensor, layout: KVLayout, cpu_isa: str | None = None
) -> LayerAddressing:
    """Describe where K and V of every slot live in ``tensor`` (no copy).

    Args:
        tensor: one layer's KV tensor in ``layout``'s logical shape.
        layout: which backend wrote it.
        cpu_isa: for ``KVLayout.CPU`` the ISA vLLM used (``layer.isa``);
            ``None`` picks ``default_cpu_attn_isa``.
    """
    if layout in (KVLayout.CPU, KVLayout.FLASH):
        if tensor.dim() != 4 or tensor.shape[3] % 2 != 0:
            raise ValueError(
                f"{layout.name} tensor must be [nb, hkv, bs, 2*D]; got {tuple(tensor.shape)}"
            )
        if layout is KVLayout.FLASH:
            return _flash_addressing(tensor)
        if cpu_isa is None:
            cpu_isa = default_cpu_attn_isa(tensor.dtype, tensor.shape[2], tensor.shape[3] // 2)
        return _cpu_addressing(tensor, cpu_isa)
    if layout is KVLayout.FLASH_LEGACY:
        if tensor.dim() != 5:
            raise ValueError(
                f"FLASH_LEGACY tensor must be [2, nb, bs, hkv, D]; got {tuple(tensor.shape)}"
            )
        return _flash_legacy_addressing(tensor)
    raise ValueError(f"unknown KV layout {layout!r}")
