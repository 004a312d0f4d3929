"""Multi-master decode planning (torch-free).

One decode step of a batch whose requests' KV is spread over instances::

        master m (one per mini-batch)              participant p (holds KV of r, maybe 0 tokens)
    1.  q, k, v of the new token; store k, v
        in its own pool at new_slot
    2.  q[r] ------------------------------------> q[r]
    3.  (o, lse) over its local KV of r            (o, lse) over its local KV of r
                                                   (no tokens: o = 0, lse = -inf)
    4.  merge by log-sum-exp <-------------------- (o, lse)

Each request has exactly one master per step. Its *participants* are the
other instances it is registered on in the directory; an instance that was
registered by scale-up or emptied by migration takes part with an empty
partial. Elastic scale-up is just choosing a master the request is not yet
registered on: ``plan_decode_step`` registers it and the new token lands
there, so no KV moves.

``DecodeStepPlan`` is the per-step plain-data plan every instance receives;
``build_decode_schedule`` is each instance's pure view of it (what to send
to whom, in which order, and how to merge), executed by
``vllm_esp/kernels/esp/decode.py``. Its users are the ESP plan and kernel
tests and ``benchmarks/esp_core.py``; the engine's served path plans
decodes with ``step_plan.py`` (each token computed where its request's last
block is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.directory import DistributedKVDirectory, ESPCapacityError


@dataclass(frozen=True)
class KVShardRef:
    """A request's KV on one instance, as visible to this step's query."""

    instance: int
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class DecodeRequestPlan:
    """One request of a decode step: its master, new token and KV shards."""

    req_id: str
    master: int
    position: int
    """Global position of the new token (its query and its KV)."""
    new_slot: int
    """Slot in the master's pool that receives the new token's KV."""
    shards: tuple[KVShardRef, ...]
    """One per registered instance, sorted by instance; the master's includes the new token."""

    @property
    def participants(self) -> tuple[int, ...]:
        return tuple(s.instance for s in self.shards if s.instance != self.master)

    def shard(self, instance: int) -> KVShardRef:
        for s in self.shards:
            if s.instance == instance:
                return s
        raise KeyError(f"{self.req_id!r} has no shard on instance {instance}")


@dataclass(frozen=True)
class DecodeStepPlan:
    """One multi-master decode step: requests in batch order, each with its master."""

    requests: tuple[DecodeRequestPlan, ...]

    @property
    def group(self) -> tuple[int, ...]:
        """Every instance that takes part in the step, sorted."""
        return tuple(sorted({s.instance for r in self.requests for s in r.shards}))

    @property
    def masters(self) -> tuple[int, ...]:
        return tuple(sorted({r.master for r in self.requests}))

    def mini_batch(self, master: int) -> tuple[int, ...]:
        """Indices (batch order) of the requests ``master`` decodes."""
        return tuple(i for i, r in enumerate(self.requests) if r.master == master)


def assign_masters_fullest_first(
    directory: DistributedKVDirectory,
    req_ids: Sequence[str],
    group: Sequence[int],
    *,
    min_mini_batch_size: int = 1,
) -> dict[str, int]:
    """LoongServe's master choice: contiguous mini-batches on the fullest instances.

    Instances are visited by used tokens, descending. Each takes the next
    ``max(cdiv(remaining, instances left), min_mini_batch_size)`` requests,
    fewer if its free slots run out. Raises ``ESPCapacityError`` when the
    group has no room left for some request's new token; the caller then
    scales up with an idle instance (add it to ``group``) or preempts.
    """
    order = sorted(group, key=lambda i: (-directory.num_used_tokens(i), list(group).index(i)))
    free_blocks = {i: directory.num_free_blocks(i) for i in group}
    masters: dict[str, int] = {}
    next_req = 0
    for k, instance in enumerate(order):
        remaining = len(req_ids) - next_req
        if remaining == 0:
            break
        quota = max(-(-remaining // (len(order) - k)), min_mini_batch_size)
        while next_req < len(req_ids) and quota > 0:
            req_id = req_ids[next_req]
            needs_block = directory.num_local_tokens(req_id, instance) % directory.block_size == 0
            if needs_block and free_blocks[instance] == 0:
                break
            free_blocks[instance] -= needs_block
            masters[req_id] = instance
            next_req += 1
            quota -= 1
    if next_req < len(req_ids):
        raise ESPCapacityError(
            f"no instance of group {tuple(group)} has room for the new token of "
            f"{len(req_ids) - next_req} request(s) starting at {req_ids[next_req]!r}: scale up "
            f"with an idle instance or preempt"
        )
    return masters


def plan_decode_step(
    directory: DistributedKVDirectory, masters: Mapping[str, int]
) -> DecodeStepPlan:
    """Allocate each request's new token on its master and snapshot the shards.

    ``masters`` maps request id to master instance, in batch order. A master
    the request is not registered on is registered first (scale-up).
    All-or-nothing: on ``ESPCapacityError`` the directory is unchanged.
    """
    needed: dict[int, int] = {}
    for req_id, master in masters.items():
        if not 0 <= master < directory.num_instances:
            raise ValueError(f"master {master} of {req_id!r} is not an instance")
        needed[master] = needed.get(master, 0) + directory.num_blocks_to_append(req_id, master, 1)
    short = {i: n for i, n in needed.items() if n > directory.num_free_blocks(i)}
    if short:
        raise ESPCapacityError(
            "decode step does not fit: "
            + ", ".join(
                f"master {i} needs {n} block(s), has {directory.num_free_blocks(i)} free"
                for i, n in sorted(short.items())
            )
        )
    requests = []
    for req_id, master in masters.items():
        position = directory.num_tokens(req_id)
        directory.register(req_id, master)
        (new_slot,) = directory.append_tokens(req_id, master, 1)
        shards = tuple(
            KVShardRef(
                i, directory.shard(req_id, i).block_ids, directory.num_local_tokens(req_id, i)
            )
            for i in directory.instances(req_id)
        )
        requests.append(DecodeRequestPlan(req_id, master, position, new_slot, shards))
    return DecodeStepPlan(tuple(requests))


@dataclass(frozen=True)
class DecodeRankSchedule:
    """One instance's part of a ``DecodeStepPlan``.

    Master role: ``mastered`` requests (batch indices), their new slots and
    positions, and their local shard. ``q_sends[k] = (peer, rows)`` sends the
    queries of ``mastered[rows]`` to ``peer``; the peer's reply comes back
    in the same row order. ``merge_rows[k][a]`` indexes the concatenation
    of all replies (in ``q_sends`` order) for the k-th remote partial of
    mastered request ``a``, or is -1 when ``a`` has fewer participants.

    Participant role: ``q_recvs[k] = (master, num_rows)`` receives queries of
    ``foreign`` requests (batch indices, concatenated in ``q_recvs`` order),
    answered over the local shards ``foreign_block_tables``/``foreign_kv_lens``.
    """

    instance: int
    mastered: tuple[int, ...]
    new_slots: tuple[int, ...]
    new_positions: tuple[int, ...]
    local_block_tables: tuple[tuple[int, ...], ...]
    local_kv_lens: tuple[int, ...]
    q_sends: tuple[tuple[int, tuple[int, ...]], ...]
    merge_rows: tuple[tuple[int, ...], ...]
    q_recvs: tuple[tuple[int, int], ...]
    foreign: tuple[int, ...]
    foreign_positions: tuple[int, ...]
    foreign_block_tables: tuple[tuple[int, ...], ...]
    foreign_kv_lens: tuple[int, ...]


def build_decode_schedule(plan: DecodeStepPlan, instance: int) -> DecodeRankSchedule:
    reqs = plan.requests
    mastered = plan.mini_batch(instance)
    local = [reqs[i].shard(instance) for i in mastered]
    peers = sorted({p for i in mastered for p in reqs[i].participants})
    q_sends = tuple(
        (p, tuple(a for a, i in enumerate(mastered) if p in reqs[i].participants)) for p in peers
    )
    # Replies are concatenated in q_sends order; row `offset + n` of peer p's
    # reply is the partial for mastered[rows[n]] from participant p.
    num_slots = max((len(reqs[i].participants) for i in mastered), default=0)
    merge_rows = [[-1] * len(mastered) for _ in range(num_slots)]
    offset = 0
    for peer, rows in q_sends:
        for n, a in enumerate(rows):
            merge_rows[reqs[mastered[a]].participants.index(peer)][a] = offset + n
        offset += len(rows)
    foreign_by_master: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        if instance in r.participants:
            foreign_by_master.setdefault(r.master, []).append(i)
    q_recvs = tuple((m, len(foreign_by_master[m])) for m in sorted(foreign_by_master))
    foreign = tuple(i for m, _ in q_recvs for i in foreign_by_master[m])
    foreign_shards = [reqs[i].shard(instance) for i in foreign]
    return DecodeRankSchedule(
        instance=instance,
        mastered=mastered,
        new_slots=tuple(reqs[i].new_slot for i in mastered),
        new_positions=tuple(reqs[i].position for i in mastered),
        local_block_tables=tuple(s.block_ids for s in local),
        local_kv_lens=tuple(s.num_tokens for s in local),
        q_sends=q_sends,
        merge_rows=tuple(tuple(row) for row in merge_rows),
        q_recvs=q_recvs,
        foreign=foreign,
        foreign_positions=tuple(reqs[i].position for i in foreign),
        foreign_block_tables=tuple(s.block_ids for s in foreign_shards),
        foreign_kv_lens=tuple(s.num_tokens for s in foreign_shards),
    )
