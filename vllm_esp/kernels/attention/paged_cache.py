"""One layer's paged KV cache in vLLM's own layout, plus per-slot global positions.

ESP lets an instance hold any subset of a request's tokens in any order
(LoongServe stores RoPE'd K, so order is irrelevant to attention; only the
causal mask needs each token's global position). vLLM's cache has no place for
positions, so ``PagedKVCache`` keeps a side tensor ``positions[slot]`` next to
the engine's own KV tensor, which it wraps without copying::

    block_table_row = [7, 2, 9]         block_size = 4
    sequence index j:   0  1  2  3 |  4  5  6  7 |  8  9
    slot = blk*bs + o: 28 29 30 31 |  8  9 10 11 | 36 37
    positions[slot]:    0  3  6  9 | 12 15 18 21 | 24 27   (e.g. a stripe, N=3)

Slot arithmetic is vLLM's: ``slot = block_id * block_size + offset`` and a
negative slot (``PAD_SLOT_ID`` = -1) is skipped on write.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_esp.kernels.attention.layout import (
    KVLayout,
    LayerAddressing,
    default_cpu_attn_isa,
    layer_addressing,
)
from vllm_esp.kernels.attention.mirror import BlockVersions, HeadMajorMirror

__all__ = ["KVBlocks", "PagedKVCache"]

# Positions of slots never written; never read when kv_lens are right.
_UNSET_POSITION = -1


class KVBlocks(NamedTuple):
    """Whole blocks copied out of a ``PagedKVCache`` (for block migration).

    ``kv`` keeps the layout's raw per-block contents (``[n, hkv, bs, 2*D]`` for
    CPU/FLASH, ``[2, n, bs, hkv, D]`` for FLASH_LEGACY), so a copy between two
    caches of the same layout and CPU ISA is bit-exact. ``positions`` is
    ``[n, block_size]`` int64.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    layout: KVLayout
    cpu_isa: str | None


class PagedKVCache:
    """One layer's paged KV in vLLM's layout (the engine's tensor, no copy) plus positions.

    Attributes:
        kv_cache: the wrapped layer tensor (see ``KVLayout``).
        layout: which backend layout ``kv_cache`` is in.
        cpu_isa: for ``KVLayout.CPU``, the ISA whose in-block order is used.
        positions: int64 ``[num_blocks * block_size]``, global token position
            of every slot (``-1`` until written).
        versions: the blocks' write versions (shared by the layers), or None.
        mirror: head-major copies of sequences' KV kept across steps for the
            CPU partial kernel (``mirror.py``); None unless ``versions`` is
            given on CPU.
        addressing: where K and V of each slot live (shared with the Triton
            kernels).
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        positions: torch.Tensor | None = None,
        *,
        cpu_isa: str | None = None,
        versions: BlockVersions | None = None,
        mirror_fraction: float = 1.0,
    ) -> None:
        """Wrap ``kv_cache``; prefer the ``wrap`` / ``allocate`` constructors."""
        if kv_cache.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(
                f"unsupported KV dtype {kv_cache.dtype} (fp8 caches are not supported)"
            )
        self.kv_cache = kv_cache
        self.layout = layout
        if layout is KVLayout.CPU and cpu_isa is None and kv_cache.dim() == 4:
            cpu_isa = default_cpu_attn_isa(
                kv_cache.dtype, kv_cache.shape[2], kv_cache.shape[3] // 2
            )
        self.cpu_isa = cpu_isa if layout is KVLayout.CPU else None
        self.addressing: LayerAddressing = layer_addressing(kv_cache, layout, self.cpu_isa)
        num_slots = self.num_blocks * self.block_size
        if positions is None:
            positions = torch.full(
                (num_slots,), _UNSET_POSITION, dtype=torch.int64, device=kv_cache.device
            )
        if positions.shape != (num_slots,) or positions.dtype != torch.int64:
            raise ValueError(
                f"positions must be int64 [{num_slots}]; got "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        if positions.device != kv_cache.device:
            raise ValueError("positions must live on the KV cache's device")
        self.positions = positions
        self.versions = versions
        self.mirror = (
            HeadMajorMirror(versions, max_tokens=int(num_slots * mirror_fraction))
            if versions is not None and kv_cache.device.type == "cpu" and mirror_fraction > 0
            else None
        )
        # 6-D views [nb, hkv, bs/TQ, TQ, D/DQ, DQ] over the engine's storage;
        # indexing them reads, assigning through them writes in place.
        geometry = (self.num_blocks, self.num_kv_heads, self.block_size, self.head_size)
        self._key_view = self.addressing.key.view(kv_cache, *geometry)
        self._value_view = self.addressing.value.view(kv_cache, *geometry)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layout: KVLayout,
        *,
        cpu_isa: str | None = None,
    ) -> PagedKVCache:
        """A zero-filled cache shaped like the one vLLM's backend allocates."""
        if layout is KVLayout.FLASH_LEGACY:
            shape: tuple[int, ...] = (2, num_blocks, block_size, num_kv_heads, head_size)
        else:
            shape = (num_blocks, num_kv_heads, block_size, 2 * head_size)
        return cls(torch.zeros(shape, dtype=dtype, device=device), layout, cpu_isa=cpu_isa)

    @classmethod
    def wrap(
        cls,
        tensor: torch.Tensor,
        layout: KVLayout,
        positions: torch.Tensor | None = None,
        *,
        cpu_isa: str | None = None,
        versions: BlockVersions | None = None,
        mirror_fraction: float = 1.0,
    ) -> PagedKVCache:
        """Wrap an engine layer tensor in place.

        Args:
            tensor: the per-layer KV tensor vLLM passes to the attention impl.
            layout: the backend layout it is in.
            positions: optional existing per-slot positions (shared, not copied).
            cpu_isa: for CPU, the ISA the engine chose (``layer.isa``); ``None``
                recomputes vLLM's choice for this machine.
            versions: optional shared block write versions (turns the
                head-major mirror on, on CPU).
            mirror_fraction: the mirror's bound, as a fraction of the
                cache's slots (0: no mirror).
        """
        return cls(
            tensor,
            layout,
            positions,
            cpu_isa=cpu_isa,
            versions=versions,
            mirror_fraction=mirror_fraction,
        )

    # ------------------------------------------------------------------ geometry
    @property
    def num_blocks(self) -> int:
        """Number of blocks in the layer tensor."""
        return self.addressing.num_blocks

    @property
    def block_size(self) -> int:
        """Token slots per block."""
        return self.addressing.block_size

    @property
    def num_kv_heads(self) -> int:
        """KV heads stored per slot."""
        return self.addressing.num_kv_heads

    @property
    def head_size(self) -> int:
        """Elements per head."""
        return self.addressing.head_size

    @property
    def dtype(self) -> torch.dtype:
        """Element type of K and V."""
        return self.kv_cache.dtype

    @property
    def device(self) -> torch.device:
        """Device holding the cache."""
        return self.kv_cache.device

    # ------------------------------------------------------------------ slots
    def slot_mapping(self, block_table_row: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Slots (int64 ``[num_tokens]``) of a sequence's first ``num_tokens`` entries."""
        idx = torch.arange(num_tokens, device=self.device)
        blocks = block_table_row.to(device=self.device, dtype=torch.int64)[idx // self.block_size]
        return blocks * self.block_size + idx % self.block_size

    def write(
        self,
        slot_mapping: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Store tokens exactly where vLLM's backend would.

        Args:
            slot_mapping: int ``[n]``; ``-1`` (vLLM's PAD_SLOT_ID) skips the token.
            key, value: ``[n, num_kv_heads, head_size]`` (cast to the cache dtype).
            positions: int ``[n]`` global token positions.
        """
        slots = slot_mapping.to(device=self.device, dtype=torch.int64)
        num_tokens = slots.shape[0]
        self._check_tokens(key, num_tokens)
        self._check_tokens(value, num_tokens)
        positions = positions.to(device=self.device, dtype=torch.int64)
        if positions.shape != (num_tokens,):
            raise ValueError(f"positions must be [{num_tokens}]; got {tuple(positions.shape)}")
        keep = slots >= 0
        if not bool(keep.all()):
            slots, positions = slots[keep], positions[keep]
            key, value = key[keep.to(key.device)], value[keep.to(value.device)]
        if slots.numel() == 0:
            return
        if int(slots.max()) >= self.num_blocks * self.block_size:
            raise IndexError("slot out of range for this cache")
        key_addr, value_addr = self.addressing.key, self.addressing.value
        self._key_view[self._index(slots, key_addr.token_group)] = self._split_dims(
            key.to(device=self.device, dtype=self.dtype), key_addr.dim_group
        )
        self._value_view[self._index(slots, value_addr.token_group)] = self._split_dims(
            value.to(device=self.device, dtype=self.dtype), value_addr.dim_group
        )
        self.positions[slots] = positions
        self.mark_written_slots(slots)

    def mark_written(self, block_ids: torch.Tensor) -> None:
        """Record that ``block_ids`` were written (by this cache or by a
        writer that bypasses it): mirrored copies of them are stale."""
        if self.versions is not None:
            self.versions.mark(block_ids)

    def mark_written_slots(self, slots: torch.Tensor) -> None:
        if self.versions is not None:
            self.versions.mark(slots.to(dtype=torch.int64) // self.block_size)

    def gather_slots(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy out ``(k [n,hkv,D], v [n,hkv,D], positions [n])`` for the given slots."""
        slots = slots.to(device=self.device, dtype=torch.int64)
        num_tokens = slots.shape[0]
        shape = (num_tokens, self.num_kv_heads, self.head_size)
        key_group = self.addressing.key.token_group
        value_group = self.addressing.value.token_group
        key = self._key_view[self._index(slots, key_group)].reshape(shape)
        value = self._value_view[self._index(slots, value_group)].reshape(shape)
        return key, value, self.positions[slots]

    def gather(
        self, block_table_row: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, positions)`` of a sequence's first ``num_tokens`` slots, in table order."""
        return self.gather_slots(self.slot_mapping(block_table_row, num_tokens))

    # ------------------------------------------------------------------ whole blocks
    def read_blocks(self, block_ids: torch.Tensor) -> KVBlocks:
        """Copy whole blocks (raw layout contents and positions) for migration."""
        ids = block_ids.to(device=self.device, dtype=torch.int64)
        if self.layout is KVLayout.FLASH_LEGACY:
            kv = self.kv_cache[:, ids]
        else:
            kv = self.kv_cache[ids]
        positions = self.positions.view(self.num_blocks, self.block_size)[ids]
        return KVBlocks(kv, positions, self.layout, self.cpu_isa)

    def write_blocks(self, block_ids: torch.Tensor, data: KVBlocks) -> None:
        """Overwrite whole blocks with ``read_blocks`` output from a same-layout cache."""
        if data.layout is not self.layout or data.cpu_isa != self.cpu_isa:
            # The raw bytes are only meaningful in the layout that wrote them.
            raise ValueError(
                f"cannot write {data.layout.name}/{data.cpu_isa} blocks into a "
                f"{self.layout.name}/{self.cpu_isa} cache; gather and write "
                "tokens instead"
            )
        ids = block_ids.to(device=self.device, dtype=torch.int64)
        kv = data.kv.to(device=self.device, dtype=self.dtype)
        if self.layout is KVLayout.FLASH_LEGACY:
            self.kv_cache[:, ids] = kv
        else:
            self.kv_cache[ids] = kv
        self.positions.view(self.num_blocks, self.block_size)[ids] = data.positions.to(
            device=self.device, dtype=torch.int64
        )
        self.mark_written(ids)

    # ------------------------------------------------------------------ helpers
    def _index(
        self, slots: torch.Tensor, token_group: int
    ) -> tuple[torch.Tensor, slice, torch.Tensor, torch.Tensor]:
        # Index into a [nb, hkv, bs/TQ, TQ, D/DQ, DQ] view. K and V need their
        # own index: their token groups differ (AMX K groups 16 tokens, AMX V
        # pairs 2). The advanced indices sit around a slice, so the result is
        # [n, hkv, D/DQ, DQ] (indexed dims first, then the sliced/trailing ones).
        offsets = slots % self.block_size
        return (
            slots // self.block_size,
            slice(None),
            offsets // token_group,
            offsets % token_group,
        )

    def _check_tokens(self, tensor: torch.Tensor, num_tokens: int) -> None:
        expected = (num_tokens, self.num_kv_heads, self.head_size)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"expected K/V of shape {expected}; got {tuple(tensor.shape)}")

    @staticmethod
    def _split_dims(tensor: torch.Tensor, dim_group: int) -> torch.Tensor:
        num_tokens, num_heads, head_size = tensor.shape
        return tensor.reshape(num_tokens, num_heads, head_size // dim_group, dim_group)

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layout={self.layout.name}, cpu_isa={self.cpu_isa}, "
            f"num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"num_kv_heads={self.num_kv_heads}, head_size={self.head_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )
