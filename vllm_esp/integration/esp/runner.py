"""``ESPStepRunner``: one instance's step, nano-vllm style (plan -> forward -> sample).

vLLM's worker loads the model and allocates the KV cache as usual; this
runner replaces only the step: it applies the plan's block migrations,
builds the instance's rows from the plan (:func:`~vllm_esp.core.esp.step_plan.local_batch`),
runs the vLLM model over them with an :class:`~vllm_esp.integration.esp.step_context.ESPStepContext`
as every layer's attention metadata (striped rings included), and samples the rows whose request
ends here. It keeps no request state: the plan carries tokens and block
tables, so instances cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_esp.core.esp.config import ESPConfig
from vllm_esp.core.esp.step_plan import (
    ESPStepPlan,
    instance_of,
    local_batch,
    local_block,
)
from vllm_esp.integration.esp.step_context import ESPStepContext, KVCacheRegistry
from vllm_esp.kernels.attention import KVLayout
from vllm_esp.kernels.esp.group import InstanceGroup
from vllm_esp.kernels.esp.sampler import sample_one

if TYPE_CHECKING:
    from vllm_esp.integration.esp.host_swap import InstanceHostSwap


class ESPStepRunner:
    """Executes ESP plans on one instance (see module docstring)."""

    def __init__(
        self,
        vllm_config: Any,
        model: torch.nn.Module,
        attn_layers: dict[str, torch.nn.Module],
        group: InstanceGroup | None,
        instance: int,
        device: torch.device,
    ) -> None:
        self.vllm_config = vllm_config
        self.model = model
        self.attn_layers = attn_layers
        self.group = group
        self.instance = instance
        self.device = device
        layout = KVLayout.CPU if device.type == "cpu" else KVLayout.FLASH
        esp_config = ESPConfig.from_additional_config(vllm_config.additional_config)
        self.caches = KVCacheRegistry(layout, esp_config.cpu_kv_mirror_fraction)
        for layer in attn_layers.values():  # wrap every layer now: migrations need all
            kv = layer.kv_cache
            self.caches.get(layer, kv[0] if isinstance(kv, list) else kv)
        self.num_steps = 0
        self.num_tokens_computed = 0
        self.num_blocks_moved_in = 0
        #: Rows attended by the platform's own kernel (wholly local requests).
        self.num_local_kernel_rows = 0
        #: Rows computed in a striped ring, and passing rows kept from peers.
        self.num_ring_rows = 0
        self.num_ring_kept_rows = 0
        self.host_swap: InstanceHostSwap | None = None

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, plan: ESPStepPlan, swap: Any = None) -> tuple[dict[str, int], set[str]]:
        """Run this instance's share of ``plan`` (and of the step's host-swap
        metadata ``swap``, an ``HostSwapMetadata``).

        Returns ``{req_id: sampled token}`` and the ids of requests whose
        prefetch (asynchronous load) completed.
        """
        from vllm.forward_context import set_forward_context

        prefetched: set[str] = set()
        # Every write of this step (loads, moves, the forward's stores)
        # carries one new block version: mirrored copies of what it
        # overwrites go stale.
        self.caches.new_step()
        # Order matters, and is the scheduler's order of planning:
        # 1. swap-outs: blocks swapped out may be reused this step (by a
        #    load or a migration), so they are read first;
        # 2. loads (swap-ins, prefetches): vLLM's schedule() allocated and
        #    planned them on the block tables of that moment;
        # 3. migrations: planned after schedule(), on the tables with those
        #    blocks, so a resumed request's freshly loaded block may be a
        #    move's source (moving it before it is loaded copies stale KV).
        if swap is not None and swap.swap_out:
            self._host_swap(plan).swap_out(swap.swap_out)
        if swap is not None and (swap.swap_in or swap.prefetch):
            host = self._host_swap(plan)
            host.swap_in(swap.swap_in)
            prefetched = host.swap_in(swap.prefetch)
        if plan.moves:
            self._apply_moves(plan)
        if not plan.requests:
            return {}, prefetched
        batch = local_batch(plan, self.instance)
        ctx = ESPStepContext(batch, self.group, self.caches, self.device)
        # An instance with no rows still runs one padding row: its attention
        # layers must join the peers' exchanges (it may hold their KV).
        ids = batch.input_ids or [0]
        positions = batch.positions or [0]
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        with set_forward_context(ctx, self.vllm_config, num_tokens=len(ids), slot_mapping={}):
            hidden = self.model(input_ids=input_ids, positions=pos)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        self.num_steps += 1
        self.num_tokens_computed += batch.num_rows
        self.num_local_kernel_rows += ctx.fast.num_rows
        for share in batch.rings:
            self.num_ring_rows += len(share.rows)
            self.num_ring_kept_rows += sum(len(rows) for rows in share.keep_rows)
        sampled: dict[str, int] = {}
        if batch.sample_rows:
            rows = torch.tensor([r for _, r, _, _ in batch.sample_rows], device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            for (req_id, _, spec, num_out), row_logits in zip(
                batch.sample_rows, logits, strict=True
            ):
                sampled[req_id] = sample_one(row_logits, spec, num_out)
        return sampled, prefetched

    def _host_swap(self, plan: ESPStepPlan) -> InstanceHostSwap:
        if self.host_swap is None:
            from vllm_esp.core.swap.config import SwapConfig
            from vllm_esp.integration.esp.host_swap import InstanceHostSwap

            self.host_swap = InstanceHostSwap(
                self.caches.all(),
                self.group,
                self.instance,
                plan.blocks_per_instance,
                # The connector's settings, as its book sizes the slots.
                SwapConfig.from_additional_config(self.vllm_config.additional_config),
            )
        return self.host_swap

    # ------------------------------------------------------------------ migration
    def _apply_moves(self, plan: ESPStepPlan) -> None:
        """Copy migrated blocks (all layers and positions) before the forward.

        Every source is read before any destination is written: a block a
        move frees may be the destination of a later move in the same step.
        """
        nb, me = plan.blocks_per_instance, self.instance
        caches = self.caches.all()
        local_src: list[int] = []
        local_dst: list[int] = []
        out_ids: dict[int, list[int]] = {}
        in_ids: dict[int, list[int]] = {}
        for move in plan.moves:
            src, dst = instance_of(move.src, nb), instance_of(move.dst, nb)
            if src == me and dst == me:
                local_src.append(local_block(move.src, nb))
                local_dst.append(local_block(move.dst, nb))
            elif src == me:
                out_ids.setdefault(dst, []).append(local_block(move.src, nb))
            elif dst == me:
                in_ids.setdefault(src, []).append(local_block(move.dst, nb))

        def index(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.int64, device=self.device)

        # 1. Read (copies) every source.
        local_data = [c.read_blocks(index(local_src)) for c in caches] if local_src else []
        sends = []
        for peer, ids in sorted(out_ids.items()):
            blocks = [cache.read_blocks(index(ids)) for cache in caches]
            sends.append((peer, torch.stack([b.kv for b in blocks])))
            sends.append((peer, blocks[0].positions.contiguous()))
        recvs, targets = [], []
        for peer, ids in sorted(in_ids.items()):
            template = caches[0].read_blocks(index(ids[:1]))
            kv = torch.empty(
                (len(caches), len(ids), *template.kv.shape[1:]),
                dtype=template.kv.dtype,
                device=self.device,
            )
            positions = torch.empty(
                (len(ids), plan.block_size), dtype=torch.int64, device=self.device
            )
            recvs += [(peer, kv), (peer, positions)]
            targets.append((ids, kv, positions, template))
        if sends or recvs:
            if self.group is None:
                raise RuntimeError("cross-instance migration needs the ESP group")
            self.group.exchange(sends, recvs).wait()
        # 2. Write every destination.
        for cache, data in zip(caches, local_data):
            cache.write_blocks(index(local_dst), data)
        self.num_blocks_moved_in += len(local_dst)
        for ids, kv, positions, template in targets:
            for layer_idx, cache in enumerate(caches):
                cache.write_blocks(
                    index(ids), template._replace(kv=kv[layer_idx], positions=positions)
                )
            self.num_blocks_moved_in += len(ids)
