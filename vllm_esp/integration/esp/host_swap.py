"""Host KV swap on ESP instances (``--scheduler esp`` with ``--swap-config``).

The scheduler half is the ordinary swap connector
(``vllm_esp/integration/swap/connector.py``): its book assigns host slots to
global device blocks and emits ``HostSwapMetadata`` each step. The ESP
executor forwards that metadata with the plan, and every instance applies
it to the blocks it owns:

* swap-out of global block ``g`` into host slot ``s``: the instance holding
  ``g`` copies the block (all layers, with positions) into row ``s`` of its
  host pool; every instance records who holds ``s`` (they all see the same
  metadata);
* swap-in / prefetch of slot ``s`` into global block ``g``: the slot's
  holder writes it locally, or sends it to the instance holding ``g`` over
  the ESP group (a swapped request may resume on other instances).

The pool is the swap connector's
:class:`~vllm_esp.kernels.swap_copy.SwapCopyEngine` over this instance's
layer tensors plus the positions tensor of its ``PagedKVCache`` wrappers
(one more block-major unit), allocated once and sized from the same
``SwapConfig`` and slot size as the book. The book is global and first-fit:
any slot may be handed to a block of any instance, so every instance's pool
spans the whole slot range (rows = slots). On CPU, rows an instance never
writes are never faulted in; on CUDA, every instance pins the whole pool.

Loads are synchronous (fenced before the forward on CUDA), so prefetches
are reported done in the same step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_esp.core.esp.step_plan import instance_of, local_block
from vllm_esp.core.swap.book import BlockCopy
from vllm_esp.core.swap.config import SwapConfig
from vllm_esp.kernels.attention import PagedKVCache
from vllm_esp.kernels.esp.group import InstanceGroup, TensorPeer
from vllm_esp.kernels.swap_copy import SwapCopyEngine


def _kv_bytes_per_block(caches: Sequence[PagedKVCache]) -> int:
    """Bytes of one block over all layers, the connector's slot size (vLLM's
    page size times the layers that own a KV tensor)."""
    tensors = {c.kv_cache.data_ptr(): c.kv_cache for c in caches}
    return sum(t.numel() * t.element_size() for t in tensors.values()) // caches[0].num_blocks


class InstanceHostSwap:
    """This instance's host pool and the holder of every host slot."""

    def __init__(
        self,
        caches: Sequence[PagedKVCache],
        group: InstanceGroup | None,
        instance: int,
        blocks_per_instance: int,
        swap_config: SwapConfig,
    ) -> None:
        self.group = group
        self.instance = instance
        self.blocks_per_instance = blocks_per_instance
        self.device = caches[0].device
        #: Marks the blocks the engine writes (it writes around them).
        self.caches = caches
        tensors = {f"kv.{i}": c.kv_cache for i, c in enumerate(caches)}
        # Every cache shares one positions tensor; the engine copies it once.
        tensors |= {f"positions.{i}": c.positions for i, c in enumerate(caches)}
        self.engine = SwapCopyEngine(
            tensors, caches[0].num_blocks, swap_config.num_host_blocks(_kv_bytes_per_block(caches))
        )
        #: slot -> instance holding it (known to every instance).
        self.owner: dict[int, int] = {}
        self.num_blocks_out = 0
        self.num_blocks_in = 0

    # ------------------------------------------------------------------ out
    def swap_out(self, copies: Sequence[BlockCopy]) -> None:
        nb = self.blocks_per_instance
        local: list[BlockCopy] = []
        for copy in copies:
            if copy.host_blocks and max(copy.host_blocks) >= self.engine.num_host_blocks:
                raise RuntimeError(
                    f"host slot {max(copy.host_blocks)} is beyond this instance's pool "
                    f"of {self.engine.num_host_blocks} slots"
                )
            blocks: list[int] = []
            slots: list[int] = []
            for g, s in zip(copy.device_blocks, copy.host_blocks, strict=True):
                self.owner[s] = instance_of(g, nb)
                if instance_of(g, nb) == self.instance:
                    blocks.append(local_block(g, nb))
                    slots.append(s)
            if blocks:
                local.append(BlockCopy(copy.request_id, tuple(blocks), tuple(slots)))
        # A freed block may be a migration's or a load's target this step.
        self.engine.swap_out(local, blocks_reused_now=True)
        self.num_blocks_out += sum(len(c.device_blocks) for c in local)

    # ------------------------------------------------------------------ in
    def swap_in(self, copies: Sequence[BlockCopy]) -> set[str]:
        """Load ``copies`` (swap-ins and prefetches); returns their request ids."""
        nb = self.blocks_per_instance
        local: list[BlockCopy] = []  # slot and block both here
        send: dict[int, list[int]] = {}  # dst -> slots
        recv: dict[int, list[int]] = {}  # owner -> local blocks
        for copy in copies:
            blocks: list[int] = []
            slots: list[int] = []
            for g, s in zip(copy.device_blocks, copy.host_blocks, strict=True):
                owner, dst = self.owner.get(s), instance_of(g, nb)
                if owner is None:
                    raise RuntimeError(f"host slot {s} was never swapped out")
                if owner == self.instance and dst == self.instance:
                    blocks.append(local_block(g, nb))
                    slots.append(s)
                elif owner == self.instance:
                    send.setdefault(dst, []).append(s)
                elif dst == self.instance:
                    recv.setdefault(owner, []).append(local_block(g, nb))
            if blocks:
                local.append(BlockCopy(copy.request_id, tuple(blocks), tuple(slots)))
        self.engine.swap_in(local)
        for copy in local:  # the engine writes around PagedKVCache
            self.caches[0].mark_written(torch.tensor(copy.device_blocks, device=self.device))
        self.num_blocks_in += sum(len(c.device_blocks) for c in local)
        if send or recv:
            self._exchange(send, recv)
        return {copy.request_id for copy in copies}

    def _exchange(self, send: dict[int, list[int]], recv: dict[int, list[int]]) -> None:
        """Send held slots to the instances that load them; write the slots
        received into local blocks. One packed tensor per peer each way."""
        if self.group is None:
            raise RuntimeError("cross-instance swap-in needs the ESP group")
        sends: list[TensorPeer] = [
            (dst, self.engine.read_slots(slots).to(self.device))
            for dst, slots in sorted(send.items())
        ]
        buffers = [
            (owner, blocks, self._empty_packed(len(blocks)))
            for owner, blocks in sorted(recv.items())
        ]
        self.group.exchange(sends, [(owner, packed) for owner, _, packed in buffers]).wait()
        for _, blocks, packed in buffers:
            self.engine.write_blocks(blocks, packed)
            self.caches[0].mark_written(torch.tensor(blocks, device=self.device))
            self.num_blocks_in += len(blocks)

    def _empty_packed(self, num_blocks: int) -> torch.Tensor:
        return torch.empty(
            self.engine.packed_bytes(num_blocks), dtype=torch.uint8, device=self.device
        )
