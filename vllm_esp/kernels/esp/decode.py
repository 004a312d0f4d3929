"""Worker-side multi-master decode attention.

Executes one instance's part of a ``DecodeStepPlan`` (protocol diagram in
``vllm_esp/core/esp/decode_plan.py``). Per layer::

    master:       store new k, v; post q -> participants
                  local partial over own shard   (overlaps the q transfer)
    participant:  wait for q; partial over own shard per foreign request
                  (0 local tokens -> o = 0, lse = -inf, never garbage)
                  post (o, lse) -> masters
    master:       wait; merge local + remote partials by log-sum-exp

Partials travel in fp32 (like LoongServe's ``global_mid_o``) so the merge
loses nothing; the merged output is cast back to the query dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_esp.core.esp.decode_plan import (
    DecodeRankSchedule,
    DecodeStepPlan,
    build_decode_schedule,
)
from vllm_esp.kernels.attention import (
    PagedKVCache,
    merge_attention_states,
    paged_attention_with_lse,
)
from vllm_esp.kernels.esp.group import InstanceGroup


def block_table_tensor(tables: Sequence[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """Pad ragged block tables to ``[num_reqs, max_blocks]`` int32 (padding never read)."""
    width = max((len(t) for t in tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(tables), width)


@dataclass(frozen=True)
class ShardBatch:
    """Paged-attention inputs for rows (one query each) over this instance's shards.

    Built once per step and reused by every layer: only the rows whose
    request has local tokens go to the kernel.
    """

    num_rows: int
    nonempty_rows: torch.Tensor
    cu_seqlens_q: torch.Tensor
    block_tables: torch.Tensor
    kv_lens: torch.Tensor

    @classmethod
    def build(
        cls, block_tables: Sequence[tuple[int, ...]], kv_lens: Sequence[int], device: torch.device
    ) -> ShardBatch:
        nonempty = [i for i, n in enumerate(kv_lens) if n > 0]
        return cls(
            num_rows=len(kv_lens),
            nonempty_rows=torch.tensor(nonempty, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.arange(len(nonempty) + 1, dtype=torch.int32, device=device),
            block_tables=block_table_tensor([block_tables[i] for i in nonempty], device),
            kv_lens=torch.tensor([kv_lens[i] for i in nonempty], dtype=torch.int32, device=device),
        )


def partial_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    shards: ShardBatch,
    cache: PagedKVCache,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per request over its local shard: ``(out fp32, lse fp32)``.

    Rows whose request has no local tokens get the empty partial ``(0, -inf)``
    explicitly, which is the identity of the LSE merge. (LoongServe leaves
    these rows uninitialized and still merges them.)
    """
    num_rows, num_heads, head_size = q.shape
    out = torch.zeros((num_rows, num_heads, head_size), dtype=torch.float32, device=q.device)
    lse = torch.full((num_rows, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    if shards.nonempty_rows.numel() == 0:
        return out, lse
    rows = shards.nonempty_rows
    part_out, part_lse = paged_attention_with_lse(
        q.index_select(0, rows),
        shards.cu_seqlens_q,
        q_positions.index_select(0, rows),
        cache,
        shards.block_tables,
        shards.kv_lens,
        scale,
    )
    out.index_copy_(0, rows, part_out.float())
    lse.index_copy_(0, rows, part_lse.float())
    return out, lse


class DecodeExecutor:
    """One instance's executor for one ``DecodeStepPlan``; call ``forward_layer`` per layer.

    Inputs per layer are the rows of the requests this instance masters, in
    ``schedule.mastered`` order: ``q [M, Hq, D]``, ``k_new``/``v_new
    [M, Hkv, D]``. Returns the merged attention output ``[M, Hq, D]``.
    An instance that masters nothing passes empty tensors and still serves
    as a participant.
    """

    def __init__(self, group: InstanceGroup, plan: DecodeStepPlan) -> None:
        self.group = group
        self.schedule: DecodeRankSchedule = build_decode_schedule(plan, group.instance_id)
        sched, device = self.schedule, group.device
        self._new_slots = torch.tensor(sched.new_slots, dtype=torch.int64, device=device)
        self._new_positions = torch.tensor(sched.new_positions, dtype=torch.int64, device=device)
        self._foreign_positions = torch.tensor(
            sched.foreign_positions, dtype=torch.int64, device=device
        )
        self._send_rows = [
            torch.tensor(rows, dtype=torch.int64, device=device) for _, rows in sched.q_sends
        ]
        self._local_shards = ShardBatch.build(sched.local_block_tables, sched.local_kv_lens, device)
        self._foreign_shards = ShardBatch.build(
            sched.foreign_block_tables, sched.foreign_kv_lens, device
        )
        self._num_replies = sum(len(rows) for _, rows in sched.q_sends)
        # Missing partials (-1) point at an extra (0, -inf) row appended to the replies.
        self._merge_rows = [
            torch.tensor(
                [self._num_replies if i < 0 else i for i in row], dtype=torch.int64, device=device
            )
            for row in sched.merge_rows
        ]

    @property
    def num_mastered(self) -> int:
        return len(self.schedule.mastered)

    def forward_layer(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        sched = self.schedule
        if q.shape[0] != self.num_mastered or k_new.shape[0] != self.num_mastered:
            raise ValueError(
                f"expected {self.num_mastered} mastered rows, got "
                f"q {tuple(q.shape)}, k {tuple(k_new.shape)}"
            )
        num_heads, head_size = q.shape[1], q.shape[2]
        if self.num_mastered:
            cache.write(self._new_slots, k_new, v_new, self._new_positions)
        foreign_q = [q.new_empty((n, num_heads, head_size)) for _, n in sched.q_recvs]
        q_exchange = self.group.exchange(
            sends=[
                (peer, q.index_select(0, rows))
                for (peer, _), rows in zip(sched.q_sends, self._send_rows)
            ],
            recvs=[(master, buf) for (master, _), buf in zip(sched.q_recvs, foreign_q)],
        )
        local_out, local_lse = partial_attention(
            q, self._new_positions, self._local_shards, cache, scale
        )
        q_exchange.wait()

        foreign_out, foreign_lse = partial_attention(
            torch.cat(foreign_q) if foreign_q else q.new_empty((0, num_heads, head_size)),
            self._foreign_positions,
            self._foreign_shards,
            cache,
            scale,
        )
        reply_sends = []
        offset = 0
        for master, n in sched.q_recvs:
            reply_sends += [
                (master, foreign_out[offset : offset + n]),
                (master, foreign_lse[offset : offset + n]),
            ]
            offset += n
        reply_out = local_out.new_empty((self._num_replies + 1, num_heads, head_size))
        reply_lse = local_lse.new_empty((self._num_replies + 1, num_heads))
        reply_recvs = []
        offset = 0
        for peer, rows in sched.q_sends:
            reply_recvs += [
                (peer, reply_out[offset : offset + len(rows)]),
                (peer, reply_lse[offset : offset + len(rows)]),
            ]
            offset += len(rows)
        self.group.exchange(reply_sends, reply_recvs).wait()
        if not self.num_mastered:
            return q.new_empty(q.shape)
        reply_out[-1] = 0.0
        reply_lse[-1] = float("-inf")
        outs = [local_out] + [reply_out.index_select(0, rows) for rows in self._merge_rows]
        lses = [local_lse] + [reply_lse.index_select(0, rows) for rows in self._merge_rows]
        merged, _ = merge_attention_states(outs, lses) if len(outs) > 1 else (local_out, None)
        return merged.to(q.dtype)
