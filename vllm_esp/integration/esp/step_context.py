"""Worker side of one ESP step: per-layer KV store/ship and distributed attention.

An :class:`ESPStepContext` is built once per step from the instance's
:class:`~vllm_esp.core.esp.step_plan.LocalBatch` and handed to every attention
layer as its metadata. Per layer (every instance runs the same sequence of
exchanges, so they stay in lock-step)::

    1. store    K/V rows stored here -> local paged cache
       ship     K/V rows stored elsewhere -> their instance (it stores them)
    2. queries  own rows of requests with KV on peer j -> j
       partial  own rows over local KV        -> (o, lse)
                peers' rows over local KV     -> (o, lse) -> back to the peer
    3. ring     prefill chunks with DoP > 1: own queries x the step's K/V
                stripes as they rotate around the compute group; each
                member stores the passing rows it keeps  -> (o, lse)
    4. merge    own + returned + ring partials by log-sum-exp  (exact)

Requests whose KV and compute are all local do only step 1 (store) and the
local partial, i.e. ordinary attention. Ring requests send queries out in
step 2 only for the context of earlier steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_esp.core.esp.step_plan import LocalBatch, PeerQueries, RingShare
from vllm_esp.kernels.attention import (
    BlockVersions,
    KVLayout,
    PagedKVCache,
    attention_with_lse,
    merge_attention_states,
    paged_attention_with_lse,
)
from vllm_esp.kernels.attention.layout import layer_addressing
from vllm_esp.kernels.esp.group import InstanceGroup


@dataclass
class _Queries:
    """Tensor form of a ``PeerQueries`` group list."""

    num_rows: int
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    block_tables: torch.Tensor
    kv_lens: torch.Tensor

    @classmethod
    def build(cls, group: PeerQueries, device: torch.device) -> _Queries:
        width = max((len(t) for t in group.block_tables), default=0)
        tables = [t + [0] * (width - len(t)) for t in group.block_tables]
        return cls(
            num_rows=group.num_rows,
            positions=torch.tensor(group.positions, dtype=torch.int64, device=device),
            cu_seqlens=torch.tensor(group.cu_seqlens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device).reshape(
                len(tables), width
            ),
            kv_lens=torch.tensor(group.kv_lens, dtype=torch.int32, device=device),
        )


def _rows(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _rows_or_slice(values: list[int], device: torch.device) -> torch.Tensor | slice:
    """A slice when ``values`` is a run ``a, a+1, ..`` (a view, not a gather)."""
    if values and values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return _rows(values, device)


@dataclass
class _Ring:
    """Tensor form of a ``RingShare``."""

    share: RingShare
    #: This instance's rows: a slice when they are one run (one ring request).
    rows: torch.Tensor | slice
    positions: list[torch.Tensor]
    cu_rows: list[torch.Tensor]
    keep_rows: list[torch.Tensor]
    keep_slots: list[torch.Tensor]
    context_positions: list[torch.Tensor]
    context_cu_rows: list[torch.Tensor]
    context_slots: torch.Tensor

    @classmethod
    def build(cls, share: RingShare, device: torch.device) -> _Ring:
        def cu(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(
            share=share,
            rows=_rows_or_slice(share.rows, device),
            positions=[_rows(p, device) for p in share.block_positions],
            cu_rows=[cu(c) for c in share.block_cu_rows],
            keep_rows=[_rows(r, device) for r in share.keep_rows],
            keep_slots=[_rows(s, device) for s in share.keep_slots],
            context_positions=[_rows(p, device) for p in share.context_positions],
            context_cu_rows=[cu(c) for c in share.context_cu_rows],
            context_slots=_rows(share.context_slots, device),
        )

    @property
    def rotates_context(self) -> bool:
        return any(self.share.context_positions)

    def attend(
        self,
        ctx: ESPStepContext,
        cache: PagedKVCache,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Own queries over every block of the ring: ``(out, lse)`` partials.

        A block is its origin's stripe of the step's K/V, plus the earlier
        context it stores when the ring rotates it (read from the local
        cache at hop 0). The next block's transfer is posted before the
        attention on the held one, so they overlap; a passing stripe's kept
        rows are written to the local cache while it is held.
        """
        share, me, group = self.share, self.share.rank, ctx.group
        assert group is not None
        q_own = q[self.rows]
        held = torch.stack((k[self.rows], v[self.rows]))
        held_context = None
        if self.rotates_context:
            context_k, context_v, _ = cache.gather_slots(self.context_slots)
            held_context = torch.stack((context_k, context_v))
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for hop in range(share.num_ranks):
            origin = share.origin(hop)
            pending = nxt = nxt_context = None
            if hop + 1 < share.num_ranks:
                following = share.origin(hop + 1)
                nxt = held.new_empty((2, len(share.block_positions[following]), *held.shape[2:]))
                sends, recvs = [(share.send_to, held)], [(share.recv_from, nxt)]
                if held_context is not None:
                    num_context = len(share.context_positions[following])
                    nxt_context = held.new_empty((2, num_context, *held.shape[2:]))
                    sends.append((share.send_to, held_context))
                    recvs.append((share.recv_from, nxt_context))
                pending = group.exchange(sends, recvs)
            keep = self.keep_rows[origin]
            if keep.numel():
                ctx.write(
                    cache,
                    self.keep_slots[origin],
                    held[0, keep],
                    held[1, keep],
                    self.positions[origin][keep],
                )
            if q_own.shape[0]:
                blocks = [(held, self.positions[origin], self.cu_rows[origin])]
                if held_context is not None:
                    blocks.append(
                        (held_context, self.context_positions[origin], self.context_cu_rows[origin])
                    )
                for kv, k_pos, cu_k in blocks:
                    if kv.shape[1]:
                        parts.append(
                            attention_with_lse(
                                q_own,
                                kv[0],
                                kv[1],
                                self.positions[me],
                                k_pos,
                                scale,
                                cu_seqlens_q=self.cu_rows[me],
                                cu_seqlens_k=cu_k,
                            )
                        )
            if pending is not None and nxt is not None:
                pending.wait()
                held = nxt
                held_context = nxt_context if held_context is not None else None
        return parts


class KVCacheRegistry:
    """``PagedKVCache`` wrappers of this instance's layer tensors, one shared
    positions tensor and one set of block write versions (every layer stores
    the same tokens in the same slots). The versions let each layer's cache
    keep head-major copies of sequences across steps (``kernels/attention/
    mirror.py``); every write into the caches must mark its blocks."""

    def __init__(self, layout: KVLayout, mirror_fraction: float = 1.0) -> None:
        self.layout = layout
        self.mirror_fraction = mirror_fraction
        self.positions: torch.Tensor | None = None
        self.versions: BlockVersions | None = None
        self._caches: dict[str, PagedKVCache] = {}

    def get(self, layer: torch.nn.Module, kv_cache: torch.Tensor) -> PagedKVCache:
        name = layer.layer_name
        cache = self._caches.get(name)
        if cache is None or cache.kv_cache.data_ptr() != kv_cache.data_ptr():
            if self.versions is None:
                isa = getattr(layer, "isa", None)
                num_blocks = layer_addressing(kv_cache, self.layout, isa).num_blocks
                self.versions = BlockVersions(num_blocks, kv_cache.device)
            cache = PagedKVCache.wrap(
                kv_cache,
                self.layout,
                self.positions,
                cpu_isa=getattr(layer, "isa", None),
                versions=self.versions,
                mirror_fraction=self.mirror_fraction,
            )
            if self.positions is None:
                self.positions = cache.positions
            self._caches[name] = cache
        return cache

    def new_step(self) -> None:
        """Writes from now on carry a new version (once per step)."""
        if self.versions is not None:
            self.versions.new_step()

    def all(self) -> list[PagedKVCache]:
        return [self._caches[name] for name in sorted(self._caches)]


class ESPStepContext:
    """Attention metadata of one ESP step on one instance (see module docstring)."""

    def __init__(
        self,
        batch: LocalBatch,
        group: InstanceGroup | None,
        caches: KVCacheRegistry,
        device: torch.device,
    ) -> None:
        self.batch = batch
        self.group = group
        self.caches = caches
        self.device = device
        self.num_rows = batch.num_rows
        self.positions = _rows(batch.positions, device)
        self.store_rows = _rows(batch.store_rows, device)
        self.store_slots = _rows(batch.store_slots, device)
        self.ship_out = {j: _rows(r, device) for j, r in sorted(batch.ship_out.items())}
        self.ship_in = {
            j: (_rows(s, device), _rows(p, device)) for j, (s, p) in sorted(batch.ship_in.items())
        }
        self._split_own(batch)
        self.query_out = {j: _rows(r, device) for j, r in sorted(batch.query_out.items())}
        self.query_in = {j: _Queries.build(q, device) for j, q in sorted(batch.query_in.items())}
        self.rings = [_Ring.build(share, device) for share in batch.rings]
        self._store_kernel: Any = None
        self.num_layers_done = 0

    def _split_own(self, batch: LocalBatch) -> None:
        """Own requests whose KV is all here and whose step tokens are all
        computed here, as the last tokens of the sequence, are plain local
        attention: the platform's own kernel can take them (``fast``)."""
        remote_rows = {r for rows in batch.query_out.values() for r in rows}
        own, bounds = batch.own, batch.own.cu_seqlens
        slow, fast = PeerQueries(), PeerQueries()
        slow_rows: list[int] = []
        fast_rows: list[int] = []
        for i, kv_len in enumerate(own.kv_lens):
            rows = batch.own_rows[bounds[i] : bounds[i + 1]]
            positions = own.positions[bounds[i] : bounds[i + 1]]
            is_fast = not remote_rows.intersection(rows) and positions == list(
                range(kv_len - len(rows), kv_len)
            )
            group, group_rows = (fast, fast_rows) if is_fast else (slow, slow_rows)
            group_rows.extend(rows)
            group.num_rows += len(rows)
            group.positions.extend(positions)
            group.cu_seqlens.append(group.num_rows)
            group.block_tables.append(own.block_tables[i])
            group.kv_lens.append(kv_len)
        self._all_own = (batch.own_rows, own)
        self.own_rows = _rows(slow_rows, self.device)
        self.own = _Queries.build(slow, self.device)
        self.fast_rows = _rows(fast_rows, self.device)
        self.fast = _Queries.build(fast, self.device)
        #: Per-step state of the platform kernel (built by the first layer).
        self.fast_state: object | None = None

    def without_fast_path(self) -> None:
        """No platform kernel: every own row goes through the partial path."""
        rows, own = self._all_own
        self.own_rows = _rows(rows, self.device)
        self.own = _Queries.build(own, self.device)
        self.fast_rows = _rows([], self.device)
        self.fast = _Queries.build(PeerQueries(), self.device)

    # ------------------------------------------------------------------ per layer
    def attend(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        scale: float,
        local_kernel: Any = None,
        store_kernel: Any = None,
    ) -> torch.Tensor:
        """Attention output ``[rows, Hq, D]`` of this instance's rows for one layer.

        ``local_kernel(ctx, layer, q_fast, kv_cache) -> out`` runs the fast
        rows (plain local attention) with the platform's own kernel; None
        sends them through the partial-attention path too.
        ``store_kernel(k, v, slots)`` writes K/V rows into this layer's cache
        with the platform's own op (None: ``PagedKVCache.write``).
        """
        n = self.num_rows
        q, k, v = query[:n], key[:n], value[:n]
        if local_kernel is None and self.fast.num_rows:
            self.without_fast_path()
        cache = self.caches.get(layer, kv_cache)
        self._store_kernel = store_kernel
        self._store_and_ship(cache, k, v)
        ring_parts = []
        for ring in self.rings:
            if self.group is None:
                raise RuntimeError("a ring prefill needs the ESP group")
            ring_parts.append((ring, ring.attend(self, cache, q, k, v, scale)))
        out, lse = self._attention(cache, q, scale)
        for ring, parts in ring_parts:
            if not parts:  # no rows here: this instance only relayed and kept
                continue
            if ring.share.has_prior:  # context of earlier steps, attended where stored
                parts.append((out[ring.rows], lse[ring.rows]))
            outs, lses = [o for o, _ in parts], [x for _, x in parts]
            merged = (
                merge_attention_states(outs, lses, finite=True)[0] if len(parts) > 1 else outs[0]
            )
            out[ring.rows] = merged.to(out.dtype)
        out = out.to(q.dtype)
        if self.fast.num_rows:
            out[self.fast_rows] = local_kernel(
                self, layer, q[self.fast_rows].contiguous(), kv_cache
            ).to(out.dtype)
        self.num_layers_done += 1
        return out

    def _store_and_ship(self, cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        pending = None
        if self.group is not None and (self.ship_out or self.ship_in):
            sends = [(j, torch.stack((k[rows], v[rows]))) for j, rows in self.ship_out.items()]
            recv_bufs = {
                j: k.new_empty((2, slots.shape[0], *k.shape[1:]))
                for j, (slots, _) in self.ship_in.items()
            }
            pending = self.group.exchange(sends, list(recv_bufs.items()))
        if self.store_rows.numel():
            self.write(
                cache,
                self.store_slots,
                k[self.store_rows],
                v[self.store_rows],
                self.positions[self.store_rows],
            )
        if pending is not None:
            pending.wait()
            for j, buf in recv_bufs.items():
                slots, positions = self.ship_in[j]
                self.write(cache, slots, buf[0], buf[1], positions)

    def write(
        self,
        cache: PagedKVCache,
        slots: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Store K/V rows and their positions in this layer's cache."""
        if self._store_kernel is None:
            cache.write(slots, k, v, positions)
            return
        self._store_kernel(k, v, slots)
        cache.positions[slots] = positions
        cache.mark_written_slots(slots)

    def _attention(
        self, cache: PagedKVCache, q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries-to-KV partials of every row, merged: ``(out fp32, lse)``
        (fast rows: 0, -inf; their kernel fills them later)."""
        num_heads, head_size = q.shape[1], q.shape[2]
        own_out = own_lse = None
        if self.group is None or not (self.query_out or self.query_in):
            return self._partial(cache, q, scale)
        # Queries out to the peers holding KV of our requests; theirs in.
        q_recv = {
            j: q.new_empty((g.num_rows, num_heads, head_size)) for j, g in self.query_in.items()
        }
        pending = self.group.exchange(
            [(j, q[rows].contiguous()) for j, rows in self.query_out.items()], list(q_recv.items())
        )
        own_out, own_lse = self._partial(cache, q, scale)  # overlaps the transfer
        pending.wait()
        # Partials for the peers' queries over our KV, packed [o | lse] in fp32.
        replies = []
        for j, group in self.query_in.items():
            o, lse = paged_attention_with_lse(
                q_recv[j],
                group.cu_seqlens,
                group.positions,
                cache,
                group.block_tables,
                group.kv_lens,
                scale,
            )
            replies.append((j, torch.cat((o.float(), lse.unsqueeze(-1)), dim=-1)))
        back = {
            j: torch.empty(
                (rows.shape[0], num_heads, head_size + 1), dtype=torch.float32, device=q.device
            )
            for j, rows in self.query_out.items()
        }
        self.group.exchange(replies, list(back.items())).wait()
        outs, lses = [own_out.float()], [own_lse]
        for j, packed in back.items():
            rows = self.query_out[j]
            o = torch.zeros(
                (self.num_rows, num_heads, head_size), dtype=torch.float32, device=q.device
            )
            lse = torch.full(
                (self.num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device
            )
            o[rows] = packed[..., :head_size]
            lse[rows] = packed[..., head_size]
            outs.append(o)
            lses.append(lse)
        return merge_attention_states(outs, lses, finite=True)

    def _partial(
        self, cache: PagedKVCache, q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Own rows over local KV, scattered to all rows (others: 0, -inf)."""
        num_heads, head_size = q.shape[1], q.shape[2]
        out = torch.zeros(
            (self.num_rows, num_heads, head_size), dtype=torch.float32, device=q.device
        )
        lse = torch.full(
            (self.num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device
        )
        if self.own.num_rows:
            own_out, own_lse = paged_attention_with_lse(
                q[self.own_rows],
                self.own.cu_seqlens,
                self.own.positions,
                cache,
                self.own.block_tables,
                self.own.kv_lens,
                scale,
            )
            out[self.own_rows] = own_out.float()
            lse[self.own_rows] = own_lse
        return out, lse
