"""Worker-side striped ring prefill with proactive scale-down.

Executes one rank's share of a ``RingPrefillPlan`` (see
``vllm_esp/core/esp/ring_plan.py`` for the stripe and ring arithmetic). Per layer and hop::

    post isend(held block -> next rank), irecv(next block <- previous rank)
    copy the held block's retained rows into the local paged KV pool
    attention(local queries, held block) -> (out, lse); merge online
    wait; the received block becomes the held one

The transfer of the next block is posted before the attention on the
current one, so on GPU (NCCL runs on its own stream) they overlap; on CPU
gloo moves the bytes on its own threads meanwhile. The block carries its
tokens' global positions; the causal mask and the retention copy both work
on them. Retention rides on the ring's own traffic: no extra bytes move.
"""

from __future__ import annotations

import torch

from vllm_esp.core.esp.ring_plan import (
    RingPrefillPlan,
    RingRankSchedule,
    build_ring_schedule,
)
from vllm_esp.kernels.attention import (
    PagedKVCache,
    attention_with_lse,
    merge_attention_states,
)
from vllm_esp.kernels.esp.group import InstanceGroup


class RingPrefillExecutor:
    """One instance's executor for one ``RingPrefillPlan``; call ``forward_layer`` per layer.

    Inputs per layer are this rank's striped rows (request-major, see
    ``StripeLayout``): ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]`` with
    ``T = len(q_positions)``. The output rows match the inputs.
    """

    def __init__(self, group: InstanceGroup, plan: RingPrefillPlan) -> None:
        if group.instance_id not in plan.group:
            raise ValueError(f"instance {group.instance_id} is not in group {plan.group}")
        self.group = group
        self.plan = plan
        self.schedule: RingRankSchedule = build_ring_schedule(
            plan, plan.group.index(group.instance_id)
        )
        device = group.device

        def ints(values: tuple[int, ...], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.q_positions = ints(self.schedule.q_positions)
        self._cu_seqlens_q = ints(self.schedule.cu_seqlens_q, torch.int32)
        self._cu_seqlens_k = [ints(h.cu_seqlens_k, torch.int32) for h in self.schedule.hops]
        self._keep_rows = [ints(h.keep_rows) for h in self.schedule.hops]
        self._keep_slots = [ints(h.keep_slots) for h in self.schedule.hops]

    @property
    def num_local_tokens(self) -> int:
        return len(self.schedule.q_positions)

    @property
    def last_token_rows(self) -> tuple[tuple[int, int], ...]:
        """``(request index, output row)`` of the first-token logits this rank produces."""
        return self.schedule.last_token_rows

    def forward_layer(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, scale: float
    ) -> torch.Tensor:
        """Attention of the local queries over the whole batch; fills ``cache`` per the plan."""
        sched = self.schedule
        if q.shape[0] != self.num_local_tokens or k.shape[0] != self.num_local_tokens:
            raise ValueError(
                f"expected {self.num_local_tokens} local rows, got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        n, r = sched.num_ranks, sched.logical_rank
        # K and V travel as one [2, T, Hkv, D] buffer: one message per hop.
        held_kv = torch.stack((k, v))
        held_pos = self.q_positions
        out: torch.Tensor | None = None
        lse: torch.Tensor | None = None
        for s, hop in enumerate(sched.hops):
            pending = None
            if s + 1 < n:
                num_next_rows = sched.block_rows[(r - s - 1) % n]
                next_kv = held_kv.new_empty((2, num_next_rows, *held_kv.shape[2:]))
                next_pos = held_pos.new_empty((num_next_rows,))
                pending = self.group.exchange(
                    sends=[(sched.send_to, held_kv), (sched.send_to, held_pos)],
                    recvs=[(sched.recv_from, next_kv), (sched.recv_from, next_pos)],
                )
            if hop.keep_rows:
                rows = self._keep_rows[s]
                cache.write(self._keep_slots[s], held_kv[0, rows], held_kv[1, rows], held_pos[rows])
            if q.shape[0] and held_kv.shape[1]:
                hop_out, hop_lse = attention_with_lse(
                    q,
                    held_kv[0],
                    held_kv[1],
                    self.q_positions,
                    held_pos,
                    scale,
                    cu_seqlens_q=self._cu_seqlens_q,
                    cu_seqlens_k=self._cu_seqlens_k[s],
                )
                # Accumulate in fp32 so 16-bit inputs lose nothing across hops.
                if out is None or lse is None:
                    out, lse = hop_out.float(), hop_lse.float()
                else:
                    out, lse = merge_attention_states([out, hop_out.float()], [lse, hop_lse])
            if pending is not None:
                pending.wait()
                held_kv, held_pos = next_kv, next_pos
        if out is None:  # no local queries: this rank only relayed and retained
            return q.new_zeros(q.shape)
        return out.to(q.dtype)
