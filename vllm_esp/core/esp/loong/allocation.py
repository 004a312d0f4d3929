"""Step 2 of LoongServe's scheduler: which idle instances the prefills get.

``RouterManager._schedule_new_req_list_with_decoding``, with decode groups
as the connected components of the decodable requests over their KV
instances (:func:`decode_groups`):

1. **consolidate** (paper Eq. 3-4, :func:`consolidate`): empty the least
   used decode instance into the fullest ones with room while the prefill's
   gain from one more instance, ``T(k) - T(k + 1)``, exceeds the migration
   time of its KV (unconditionally while the prefill does not fit);
2. **set aside for capacity**: while the new tokens exceed the pool's free
   tokens, the decode group with the most free tokens skips this decision
   and lends its instances;
3. **set aside for speed**: a group is set aside when the prefill's
   normalised speed-up ``(T(k) - T(k + |G|)) * sum 1/in_len`` reaches the
   decodes' normalised slowdown ``T(k + |G|) * |B|^2 / sum out_len``;
4. a kept group short of memory for its next tokens takes pool instances
   (most free first) while the prefill still fits, else it is set aside.

The rest of the pool goes to the prefill DP (step 3). Decode requests
"set aside" are simply not scheduled in this decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_esp.core.esp.cluster import ClusterView, Migration, RunningRequest
from vllm_esp.core.esp.cost_model import ESPCostModel

__all__ = [
    "Allocation",
    "DecodeGroup",
    "PrefillDemand",
    "Workspace",
    "allocate",
    "consolidate",
    "decode_groups",
]


@dataclass
class Workspace:
    """One decision's mutable copy of the KV layout (migrations and
    reservations of the plan being built update it)."""

    capacity: list[int]
    used: list[int]
    #: KV per instance of each decodable request (positive entries only).
    kv: dict[str, dict[int, int]]
    reqs: dict[str, RunningRequest]

    @classmethod
    def of(cls, view: ClusterView, decodable: Sequence[RunningRequest]) -> Workspace:
        return cls(
            capacity=[inst.capacity_tokens for inst in view.instances],
            used=[inst.used_tokens for inst in view.instances],
            kv={r.req_id: dict(r.kv) for r in decodable},
            reqs={r.req_id: r for r in decodable},
        )

    def free(self, instance: int) -> int:
        return self.capacity[instance] - self.used[instance]


@dataclass
class DecodeGroup:
    """Decodable requests whose KV instances connect, and those instances."""

    instances: list[int]
    req_ids: list[str]

    def free(self, ws: Workspace) -> int:
        return sum(ws.free(i) for i in self.instances)


def decode_groups(ws: Workspace, req_ids: Sequence[str]) -> list[DecodeGroup]:
    """Connected components of ``req_ids`` over their KV instances (union-find)."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for r in req_ids:
        kv = ws.kv[r]
        it = iter(kv)
        first = next(it)
        parent.setdefault(first, first)
        if len(kv) > 1:
            root = find(first)
            for i in it:
                parent.setdefault(i, i)
                other = find(i)
                if other != root:
                    parent[other] = root
    roots = {i: find(i) for i in sorted(parent)}
    by_root: dict[int, DecodeGroup] = {}
    for i, root in roots.items():
        by_root.setdefault(root, DecodeGroup([], [])).instances.append(i)
    for r in req_ids:
        by_root[roots[next(iter(ws.kv[r]))]].req_ids.append(r)
    return sorted(by_root.values(), key=lambda g: g.instances[0])


@dataclass(frozen=True)
class PrefillDemand:
    """Length sums of the admitted prompts (what ``T(k)`` is evaluated on)."""

    sum_l: int
    sum_l2: int
    sum_inv: float

    @classmethod
    def of(cls, lengths: Sequence[int]) -> PrefillDemand:
        return cls(sum(lengths), sum(n * n for n in lengths), sum(1.0 / max(1, n) for n in lengths))

    def time(self, cost: ESPCostModel, num_instances: int) -> float:
        if num_instances < 1:
            return float("inf")
        return cost.prefill_time(num_instances, self.sum_l, self.sum_l2)


def consolidate(
    ws: Workspace,
    decode_instances: Sequence[int],
    pool: list[int],
    demand: PrefillDemand,
    cost: ESPCostModel,
) -> list[Migration]:
    """Empty decode instances into the fullest ones while it pays (Eq. 3-4).

    Appends each emptied instance to ``pool``. Only instances whose whole KV
    belongs to decodable requests can be emptied; the destinations keep one
    free token per decodable request for its next token.
    """
    holders: dict[int, list[str]] = {}
    for r, kv in ws.kv.items():
        for i in kv:
            holders.setdefault(i, []).append(r)
    live = [i for i in decode_instances if ws.used[i] > 0]
    # An instance that also holds KV of other requests (partly prefilled, or
    # of a decode blocked by a busy instance) cannot be emptied.
    sources = [i for i in live if sum(ws.kv[r][i] for r in holders.get(i, ())) == ws.used[i]]
    need = len(ws.kv)
    # Filling the fullest first keeps this order with equal capacities (a
    # destination only gets tokens once those before it are full).
    order = sorted(live, key=lambda i: (-ws.used[i], i))
    live_free = sum(ws.free(i) for i in live)
    pool_free = sum(ws.free(i) for i in pool)
    migrations: list[Migration] = []
    while sources:
        src = min(sources, key=lambda i: (ws.used[i], i))
        moved = ws.used[src]
        if demand.sum_l <= pool_free:
            gain = demand.time(cost, len(pool)) - demand.time(cost, len(pool) + 1)
            if gain <= cost.migration_time(moved):
                break
        dst_free = live_free - ws.free(src)
        if dst_free - moved < need:
            break
        order.remove(src)
        migrations += _empty_into(ws, src, order, holders)
        live_free = dst_free - moved
        sources.remove(src)
        pool.append(src)
        pool_free += ws.free(src)
    return migrations


def _empty_into(
    ws: Workspace, src: int, dsts: Sequence[int], holders: dict[int, list[str]]
) -> list[Migration]:
    moves: list[Migration] = []
    k = 0
    for r in holders.pop(src, []):
        kv = ws.kv[r]
        left = kv.pop(src)
        while left > 0:
            dst = dsts[k]
            take = min(left, ws.free(dst))
            if take <= 0:
                k += 1
                continue
            moves.append(Migration(r, src, dst, take))
            if dst not in kv:
                holders.setdefault(dst, []).append(r)
            kv[dst] = kv.get(dst, 0) + take
            ws.used[dst] += take
            ws.used[src] -= take
            left -= take
    return moves


@dataclass
class Allocation:
    """Step 2's answer."""

    migrations: list[Migration]
    #: Groups that decode now; a group's ``instances`` include the pool
    #: instances it took for memory (scale-up).
    kept: list[DecodeGroup]
    #: Groups not scheduled now (their instances are in ``pool``).
    aside: list[DecodeGroup]
    #: Instances for the prefill DP.
    pool: list[int] = field(default_factory=list)


def allocate(
    ws: Workspace,
    pool: list[int],
    lengths: Sequence[int],
    cost: ESPCostModel,
) -> Allocation:
    """Steps 2.1-2.4 for the admitted prompt ``lengths`` (see the module docstring).

    ``pool``: idle instances holding no decodable KV; every decodable
    request decodes one step if kept.
    """
    demand = PrefillDemand.of(lengths)
    pool = list(pool)
    groups = decode_groups(ws, list(ws.kv))
    decode_instances = [i for g in groups for i in g.instances]
    migrations = consolidate(ws, decode_instances, pool, demand, cost)
    if migrations:
        groups = decode_groups(ws, list(ws.kv))
    aside: list[DecodeGroup] = []
    # 2.2: capacity, the group with the most free tokens first.
    pool_free = sum(ws.free(i) for i in pool)
    groups.sort(key=lambda g: (g.free(ws), g.instances[0]))
    while groups and demand.sum_l > pool_free:
        g = groups.pop()
        aside.append(g)
        pool += g.instances
        pool_free += g.free(ws)
    groups.sort(key=lambda g: g.instances[0])
    # 2.3: speed.
    kept: list[DecodeGroup] = []
    for g in groups:
        now = demand.time(cost, len(pool))
        nxt = demand.time(cost, len(pool) + len(g.instances))
        speedup = (now - nxt) * demand.sum_inv
        outputs = sum(max(1, ws.reqs[r].num_output_tokens) for r in g.req_ids)
        slowdown = nxt * len(g.req_ids) ** 2 / outputs
        if speedup >= slowdown:
            aside.append(g)
            pool += g.instances
        else:
            kept.append(g)
    # 2.4: memory for the kept groups' next tokens.
    final: list[DecodeGroup] = []
    for g in kept:
        deficit = len(g.req_ids) - g.free(ws)
        while deficit > 0:
            spare = max(pool, key=lambda i: (ws.free(i), -i), default=None)
            if spare is None or ws.free(spare) <= 0:
                break
            if demand.sum_l > sum(ws.free(i) for i in pool) - ws.free(spare):
                break
            pool.remove(spare)
            g.instances.append(spare)
            deficit -= ws.free(spare)
        if deficit > 0:
            aside.append(g)
            pool += g.instances
        else:
            final.append(g)
    return Allocation(migrations, final, aside, pool)
