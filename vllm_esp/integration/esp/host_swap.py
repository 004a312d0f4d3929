"""Host KV swap on ESP instances (``--scheduler esp`` with ``--swap-config``).

The scheduler half is the ordinary swap connector
(``vllm_esp/integration/swap/connector.py``): its
book assigns host slots to global device blocks and emits
``HostSwapMetadata`` each step. The ESP executor forwards that metadata with
the plan, and every instance applies it to the blocks it owns:

* swap-out of global block ``g`` into host slot ``s``: the instance holding
  ``g`` copies the block (all layers, with positions) into its host memory
  under ``s``; the slot's owner is remembered by every instance (they all
  see the same metadata), and a stale copy of ``s`` elsewhere is dropped;
* swap-in / prefetch of slot ``s`` into global block ``g``: the slot's
  owner writes it locally, or sends it to the instance holding ``g`` over
  the ESP group (a swapped request may resume on other instances).

Copies are per request batch, one gather per layer. Loads are synchronous,
so prefetches are reported done in the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vllm_esp.core.esp.step_plan import instance_of, local_block
from vllm_esp.kernels.attention import KVBlocks, PagedKVCache
from vllm_esp.kernels.esp.group import InstanceGroup


class InstanceHostSwap:
    """This instance's host copies, keyed by the scheduler's host slot."""

    def __init__(
        self,
        caches: Sequence[PagedKVCache],
        group: InstanceGroup | None,
        instance: int,
        blocks_per_instance: int,
        block_size: int,
    ) -> None:
        self.caches = list(caches)
        self.group = group
        self.instance = instance
        self.blocks_per_instance = blocks_per_instance
        self.block_size = block_size
        self.pin = bool(caches) and caches[0].device.type == "cuda"
        #: slot -> (kv [L, *block], positions [bs]) held here.
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: slot -> instance holding it (known to every instance).
        self.owner: dict[int, int] = {}
        self.num_blocks_out = 0
        self.num_blocks_in = 0

    # ------------------------------------------------------------------ out
    def swap_out(self, copies: Sequence[Any]) -> None:
        nb = self.blocks_per_instance
        local: list[tuple[int, int]] = []  # (local block, slot)
        for copy in copies:
            for g, s in zip(copy.device_blocks, copy.host_blocks, strict=True):
                self.owner[s] = instance_of(g, nb)
                if instance_of(g, nb) == self.instance:
                    local.append((local_block(g, nb), s))
                else:
                    self.slots.pop(s, None)
        if not local:
            return
        kv, positions = self._read([b for b, _ in local])
        if self.pin:
            kv, positions = kv.cpu().pin_memory(), positions.cpu().pin_memory()
        elif kv.device.type == "cuda":
            kv, positions = kv.cpu(), positions.cpu()
        for i, (_, s) in enumerate(local):
            self.slots[s] = (kv[:, i], positions[i])
        self.num_blocks_out += len(local)

    # ------------------------------------------------------------------ in
    def swap_in(self, copies: Sequence[Any]) -> set[str]:
        """Load ``copies`` (swap-ins and prefetches); returns their request ids."""
        nb = self.blocks_per_instance
        write_here: list[tuple[int, int]] = []  # (local block, slot) both here
        send: dict[int, list[int]] = {}  # dst -> slots
        recv: dict[int, list[int]] = {}  # owner -> local blocks
        for copy in copies:
            for g, s in zip(copy.device_blocks, copy.host_blocks, strict=True):
                owner, dst = self.owner.get(s), instance_of(g, nb)
                if owner is None:
                    raise RuntimeError(f"host slot {s} was never swapped out")
                if owner == self.instance and dst == self.instance:
                    write_here.append((local_block(g, nb), s))
                elif owner == self.instance:
                    send.setdefault(dst, []).append(s)
                elif dst == self.instance:
                    recv.setdefault(owner, []).append(local_block(g, nb))
        if write_here:
            self._write([b for b, _ in write_here], *self._gather([s for _, s in write_here]))
        if send or recv:
            if self.group is None:
                raise RuntimeError("cross-instance swap-in needs the ESP group")
            sends = []
            for dst, slots in sorted(send.items()):
                kv, positions = self._gather(slots, device=self.caches[0].device)
                sends += [(dst, kv.contiguous()), (dst, positions.contiguous())]
            buffers = []
            for owner, blocks in sorted(recv.items()):
                kv = torch.empty(
                    (len(self.caches), len(blocks), *self._block_shape()),
                    dtype=self.caches[0].dtype,
                    device=self.caches[0].device,
                )
                positions = torch.empty(
                    (len(blocks), self.block_size), dtype=torch.int64, device=self.caches[0].device
                )
                buffers.append((owner, blocks, kv, positions))
            recvs = [(o, t) for o, _, kv, pos in buffers for t in (kv, pos)]
            self.group.exchange(sends, recvs).wait()
            for _, blocks, kv, positions in buffers:
                self._write(blocks, kv, positions)
        return {copy.request_id for copy in copies}

    # ------------------------------------------------------------------ helpers
    def _block_shape(self) -> tuple[int, ...]:
        return tuple(self.caches[0].read_blocks(torch.zeros(1, dtype=torch.int64)).kv.shape[1:])

    def _read(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(blocks, dtype=torch.int64)
        parts = [cache.read_blocks(index) for cache in self.caches]
        return torch.stack([p.kv for p in parts]), parts[0].positions.clone()

    def _gather(
        self, slots: list[int], device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.stack([self.slots[s][0] for s in slots], dim=1)
        positions = torch.stack([self.slots[s][1] for s in slots])
        if device is not None:
            kv, positions = kv.to(device), positions.to(device)
        return kv, positions

    def _write(self, blocks: list[int], kv: torch.Tensor, positions: torch.Tensor) -> None:
        device = self.caches[0].device
        index = torch.tensor(blocks, dtype=torch.int64, device=device)
        kv, positions = kv.to(device, non_blocking=True), positions.to(device, non_blocking=True)
        for layer, cache in enumerate(self.caches):
            cache.write_blocks(index, KVBlocks(kv[layer], positions, cache.layout, cache.cpu_isa))
        self.num_blocks_in += len(blocks)
