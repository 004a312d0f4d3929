"""Baseline cluster policies (torch-free): what LoongServe is compared with.

Each is a :class:`~vllm_esp.core.esp.cluster.ClusterPolicy`, run unchanged by
the cluster simulator, and chosen by name from ``vllm_esp.core.esp.registry.CLUSTER_POLICIES``:

* ``static_sp``: LoongServe without ESP (``--use_fixed_sp``). One group of
  all instances; striped prefill keeps the KV spread over all of them;
  single-master decode on the least used instance; prefill and decode
  alternate (a prefill batch whenever a waiting request is admissible, else
  up to ``max_decode_steps`` decode steps, LoongServe's ``max_wait_tokens``).
* ``tensor_parallel``: the same schedule on all instances as one
  tensor-parallel group (vLLM/LightLLM at TP = cluster size).
* ``replicas_chunked``: SplitFuse chunked prefill (LightLLM-SF, DeepSpeed-MII)
  on independent DoP-1 replicas behind a round-robin proxy; each iteration
  runs all of a replica's decodes plus prefill chunks filling
  ``chunk_tokens``.
* ``pd_disaggregation``: DistServe-like. The first ``num_prefill`` instances
  prefill, the others decode; a prefilled request's KV migrates to a decode
  instance, which decodes it alone.

Admission uses LightLLM's future-peak memory check with the known output
lengths: decoding requests advance one token per step together, so their
peak is ``max_j(rem_j * (j + 1) + sum_{i <= j} kv_i)`` over remaining
outputs sorted descending; requests still to prefill count their whole peak
(``prompt + remaining outputs - 1``). The check never lets a pool overflow,
so preemption (by recompute) is a fallback that should not trigger.

A decode batch of ``k`` steps reserves ``min(k, remaining)`` tokens per
request at launch, while a request ending inside the batch frees its KV only
at its end; so a multi-step batch can need more than the future peak. Static
SP's master choice counts the reservation (falling back to one step); the
replica and P/D policies shorten their decode batches to what the pool holds
(:func:`fitting_decode_steps`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from vllm_esp.core.esp.cluster import (
    Batch,
    ClusterPlan,
    ClusterPolicy,
    ClusterView,
    DecodeItem,
    InstanceView,
    Migration,
    PrefillItem,
    RunningRequest,
    WaitingRequest,
)

__all__ = [
    "CHUNK_TOKENS",
    "PDDisaggregationPolicy",
    "ReplicasChunkedPolicy",
    "StaticSPPolicy",
    "TensorParallelPolicy",
    "decode_peak_tokens",
    "fitting_decode_steps",
    "water_fill",
]

#: LightLLM-SF's chunk size per dataset, its "ideal P:D ratio" (LoongServe §7).
CHUNK_TOKENS: dict[str, int] = {
    "sharegpt": 256,
    "leval": 2048,
    "lveval": 16384,
    "mixed": 2048,
    "zipf": 512,
}


# ---------------------------------------------------------------------- memory
def decode_peak_tokens(pairs: Iterable[tuple[int, int]]) -> int:
    """Peak KV of decoding requests given as ``(kv_tokens, remaining_outputs)``,
    all stepping together from now (a request frees its KV when it ends)."""
    peak = total = 0
    for j, (kv, rem) in enumerate(sorted(pairs, key=lambda p: -p[1])):
        total += kv
        peak = max(peak, total + rem * (j + 1))
    return peak


def fitting_decode_steps(remaining: Iterable[int], free_tokens: int, max_steps: int) -> int:
    """The most decode steps, from 1 to ``max_steps``, whose launch reservation
    of ``min(steps, rem)`` tokens per request (``remaining`` outputs) fits
    ``free_tokens``. The future peak alone does not bound it: a request that
    ends inside the batch still holds its KV while the others' tokens are
    reserved. 1 when even one step does not fit (the caller preempts first)."""
    rems = sorted(remaining, reverse=True)
    num_left = len(rems)  # requests still decoding at the next step
    steps = reserved = 0
    while steps < max_steps:
        while num_left and rems[num_left - 1] <= steps:
            num_left -= 1
        if not num_left:
            return max_steps  # every request ends first: further steps reserve nothing
        if reserved + num_left > free_tokens:
            break
        reserved += num_left
        steps += 1
    return max(steps, 1)


def _queued_peak(req: WaitingRequest | RunningRequest) -> int:
    """Peak KV of a request yet to finish its prefill."""
    return req.num_prompt_tokens + req.max_output_tokens - req.num_output_tokens - 1


def _decode_pairs(reqs: Iterable[RunningRequest]) -> list[tuple[int, int]]:
    return [(r.num_computed_tokens, r.num_remaining_output_tokens) for r in reqs]


def water_fill(
    num_tokens: int, instances: Sequence[int], used: Sequence[int], capacity: int
) -> tuple[tuple[int, int], ...] | None:
    """Split ``num_tokens`` over ``instances``, raising the least used ones to
    a common level (an even stripe when they are balanced); None if the
    group lacks room. Returns ``(instance, tokens)`` pairs, instances ascending."""
    order = sorted(instances, key=lambda i: (used[i], i))
    levels = [used[i] for i in order]
    prefix = 0
    for k in range(1, len(order) + 1):
        prefix += levels[k - 1]
        ceiling = levels[k] if k < len(order) else capacity
        if k * min(ceiling, capacity) - prefix >= num_tokens:
            break
    else:
        return None
    level, extra = divmod(num_tokens + prefix, k)
    shares = {inst: level + (1 if j < extra else 0) - levels[j] for j, inst in enumerate(order[:k])}
    return tuple(sorted((i, t) for i, t in shares.items() if t > 0))


def _preempt_newest(decoding: list[RunningRequest], free: int, preempt: list[str]) -> int:
    """Drop the newest decodes until one step of the rest fits ``free``."""
    while len(decoding) > free:
        victim = decoding.pop()
        preempt.append(victim.req_id)
        free += victim.num_computed_tokens
    return free


# ---------------------------------------------------------------------- static SP / TP
class StaticSPPolicy(ClusterPolicy):
    """LoongServe w/o ESP (``--use_fixed_sp``); see the module docstring."""

    name = "static_sp"
    tensor_parallel = False

    def __init__(
        self,
        *,
        max_prefill_tokens: int = 500_000,
        max_decode_steps: int = 10,
        max_running_requests: int = 1024,
    ) -> None:
        if min(max_prefill_tokens, max_decode_steps, max_running_requests) < 1:
            raise ValueError("StaticSPPolicy settings must be >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.max_decode_steps = max_decode_steps
        self.max_running_requests = max_running_requests

    def schedule(self, view: ClusterView) -> ClusterPlan:
        if len(view.idle_instances) < view.num_instances:
            return ClusterPlan()  # the one group is still running
        decoding = [r for r in view.running if r.is_decoding]
        capacity = sum(inst.capacity_tokens for inst in view.instances)
        peak = decode_peak_tokens(_decode_pairs(decoding))
        admitted: list[WaitingRequest] = []
        num_tokens = 0
        for w in view.waiting:
            if len(decoding) + len(admitted) >= self.max_running_requests:
                break
            if admitted and num_tokens + w.num_prompt_tokens > self.max_prefill_tokens:
                break
            if peak + _queued_peak(w) > capacity:
                break  # FCFS: nobody overtakes the head
            admitted.append(w)
            peak += _queued_peak(w)
            num_tokens += w.num_prompt_tokens
        if admitted:
            return ClusterPlan(batches=(self._prefill(view, admitted),))
        if decoding:
            return self._decode(view, decoding)
        return ClusterPlan()

    def _prefill(self, view: ClusterView, admitted: list[WaitingRequest]) -> Batch:
        group = tuple(range(view.num_instances))
        used = [inst.used_tokens for inst in view.instances]
        capacity = min(inst.capacity_tokens for inst in view.instances)
        items = []
        for w in admitted:
            retain = water_fill(w.num_prompt_tokens, group, used, capacity)
            assert retain is not None, "the admission check leaves room for the prompt"
            for i, tokens in retain:
                used[i] += tokens
            items.append(PrefillItem(w.req_id, w.num_prompt_tokens, retain))
        return Batch(group, prefills=tuple(items), tensor_parallel=self.tensor_parallel)

    def _decode(self, view: ClusterView, decoding: list[RunningRequest]) -> ClusterPlan:
        used = [inst.used_tokens for inst in view.instances]
        capacity = min(inst.capacity_tokens for inst in view.instances)
        steps = self.max_decode_steps
        masters = _least_used_masters(decoding, used, capacity, steps)
        if masters is None:
            steps = 1
            masters = _least_used_masters(decoding, used, capacity, 1)
        preempt: list[str] = []
        while masters is None:  # cannot happen after the admission check
            victim = decoding.pop()
            preempt.append(victim.req_id)
            for i, tokens in victim.kv:
                used[i] -= tokens
            masters = _least_used_masters(decoding, used, capacity, 1)
        if not decoding:
            return ClusterPlan(preempt=tuple(preempt))
        decodes = tuple(DecodeItem(r.req_id, m) for r, m in zip(decoding, masters))
        group = tuple(range(view.num_instances))
        batch = Batch(group, decodes=decodes, num_steps=steps, tensor_parallel=self.tensor_parallel)
        return ClusterPlan(batches=(batch,), preempt=tuple(preempt))


def _least_used_masters(
    reqs: Sequence[RunningRequest], used: Sequence[int], capacity: int, steps: int
) -> list[int] | None:
    """Each request's master: the least used instance counting the tokens
    the requests before it add; None if some master would overflow."""
    heap = [(u, i) for i, u in enumerate(used)]
    heapq.heapify(heap)
    masters = []
    for r in reqs:
        level, inst = heap[0]
        level += min(steps, r.num_remaining_output_tokens)
        if level > capacity:
            return None
        heapq.heapreplace(heap, (level, inst))
        masters.append(inst)
    return masters


class TensorParallelPolicy(StaticSPPolicy):
    """All instances as one tensor-parallel group, alternating like ``static_sp``.

    Tensor parallelism shards every token's KV over the group; the token
    accounting stripes whole tokens instead, which holds the same total.
    """

    name = "tensor_parallel"
    tensor_parallel = True


# ---------------------------------------------------------------------- chunked replicas
class ReplicasChunkedPolicy(ClusterPolicy):
    """SplitFuse on DoP-1 replicas; see the module docstring.

    A request is bound to a replica, round robin, when the policy first sees
    it, as a round-robin proxy would; one whose peak KV exceeds a replica is
    refused (never admitted; the simulator reports it unfinished). Each
    replica serves its own queue FCFS. Decodes count one token each against
    ``chunk_tokens`` (a SplitFuse forward has a fixed token budget); a
    decode-only iteration may run ``max_decode_steps`` steps.
    """

    name = "replicas_chunked"

    def __init__(
        self,
        *,
        chunk_tokens: int = CHUNK_TOKENS["mixed"],
        max_decode_steps: int = 1,
        max_running_requests: int = 1024,
    ) -> None:
        if min(chunk_tokens, max_decode_steps, max_running_requests) < 1:
            raise ValueError("ReplicasChunkedPolicy settings must be >= 1")
        self.chunk_tokens = chunk_tokens
        self.max_decode_steps = max_decode_steps
        self.max_running_requests = max_running_requests
        self._replica: dict[str, int] = {}
        self._next = 0

    def schedule(self, view: ClusterView) -> ClusterPlan:
        idle = set(view.idle_instances)
        if not idle:
            return ClusterPlan()
        queues: dict[int, list[WaitingRequest]] = {}
        for w in view.waiting:
            replica = self._replica.get(w.req_id)
            if replica is None:
                replica = self._bind(w, view.instances)
            if replica in idle:
                queues.setdefault(replica, []).append(w)
        residents: dict[int, list[RunningRequest]] = {}
        for r in view.running:
            replica = r.kv[0][0]
            if replica in idle:
                residents.setdefault(replica, []).append(r)
        batches = []
        preempt: list[str] = []
        for i in sorted(residents.keys() | queues.keys()):
            inst = view.instances[i]
            batch = self._iteration(inst, residents.get(i, []), queues.get(i, []), preempt)
            if batch is not None:
                batches.append(batch)
        return ClusterPlan(batches=tuple(batches), preempt=tuple(preempt))

    def _bind(self, w: WaitingRequest, instances: Sequence[InstanceView]) -> int:
        if _queued_peak(w) > instances[self._next].capacity_tokens:
            replica = -1  # refused: it fits no replica
        else:
            replica = self._next
            self._next = (self._next + 1) % len(instances)
        self._replica[w.req_id] = replica
        return replica

    def _iteration(
        self,
        inst: InstanceView,
        residents: list[RunningRequest],
        queue: list[WaitingRequest],
        preempt: list[str],
    ) -> Batch | None:
        i = inst.instance
        decoding = [r for r in residents if r.is_decoding]
        partial = [r for r in residents if not r.is_decoding]
        free = _preempt_newest(decoding, inst.free_tokens, preempt)
        budget = self.chunk_tokens - len(decoding)
        peak = decode_peak_tokens(_decode_pairs(decoding)) + sum(map(_queued_peak, partial))
        items = []
        for r in partial:
            num = min(r.num_prompt_tokens - r.num_computed_tokens, budget)
            if num <= 0:
                break
            items.append(PrefillItem(r.req_id, num, ((i, num),)))
            budget -= num
        num_resident = len(decoding) + len(partial)
        for w in queue:
            if budget <= 0 or num_resident >= self.max_running_requests:
                break
            if peak + _queued_peak(w) > inst.capacity_tokens:
                break
            num = min(w.num_prompt_tokens, budget)
            items.append(PrefillItem(w.req_id, num, ((i, num),)))
            budget -= num
            peak += _queued_peak(w)
            num_resident += 1
        decodes = tuple(DecodeItem(r.req_id, i) for r in decoding)
        if not items and not decodes:
            return None
        if items:
            steps = 1
        else:
            rems = (r.num_remaining_output_tokens for r in decoding)
            steps = fitting_decode_steps(rems, free, self.max_decode_steps)
        return Batch((i,), prefills=tuple(items), decodes=decodes, num_steps=steps)


# ---------------------------------------------------------------------- P/D disaggregation
class PDDisaggregationPolicy(ClusterPolicy):
    """DistServe-like prefill/decode disaggregation; see the module docstring.

    The prefill instances form groups of ``prefill_dop`` (default: one group
    of all ``num_prefill``, as DistServe's prefill instance is one parallel
    group, and it keeps long prompts servable); each idle group prefills
    waiting requests FCFS up to ``max_prefill_tokens``, striped. The KV then
    waits on the group until a decode instance is idle (a migration needs
    both ends idle), and the group does not prefill again until its KV has
    left, so pending KV cannot pile up behind busy decode instances. A
    request goes to the idle decode instance whose future peak stays lowest;
    decode instances run their requests alone (DoP 1).
    """

    name = "pd_disaggregation"

    def __init__(
        self,
        num_prefill: int,
        *,
        prefill_dop: int | None = None,
        max_prefill_tokens: int = 500_000,
        max_decode_steps: int = 1,
        max_running_requests: int = 1024,
    ) -> None:
        dop = num_prefill if prefill_dop is None else prefill_dop
        if num_prefill < 1 or dop < 1 or num_prefill % dop:
            raise ValueError("num_prefill must be >= 1 and a multiple of prefill_dop")
        if min(max_prefill_tokens, max_decode_steps, max_running_requests) < 1:
            raise ValueError("PDDisaggregationPolicy settings must be >= 1")
        self.num_prefill = num_prefill
        self.prefill_dop = dop
        self.max_prefill_tokens = max_prefill_tokens
        self.max_decode_steps = max_decode_steps
        self.max_running_requests = max_running_requests

    def schedule(self, view: ClusterView) -> ClusterPlan:
        if not 0 < self.num_prefill < view.num_instances:
            raise ValueError(f"num_prefill {self.num_prefill} leaves no decode instance")
        idle = set(view.idle_instances)
        free = [inst.free_tokens for inst in view.instances]
        residents: dict[int, list[RunningRequest]] = {
            d: [] for d in range(self.num_prefill, view.num_instances) if d in idle
        }
        pending: list[RunningRequest] = []  # prefilled, KV still on prefill instances
        for r in view.running:
            first = r.kv[0][0]
            if first >= self.num_prefill:
                if first in residents:
                    residents[first].append(r)
            elif not r.busy and r.is_decoding:
                pending.append(r)
        preempt: list[str] = []
        for d, rs in residents.items():
            free[d] = _preempt_newest(rs, free[d], preempt)
        migrations, held = self._migrate(view, pending, residents, free, idle)
        batches = [
            Batch(
                (d,),
                decodes=tuple(DecodeItem(r.req_id, d) for r in rs),
                num_steps=fitting_decode_steps(
                    (r.num_remaining_output_tokens for r in rs), free[d], self.max_decode_steps
                ),
            )
            for d, rs in residents.items()
            if rs
        ]
        batches += self._prefills(view, idle, held, free)
        return ClusterPlan(
            batches=tuple(batches), migrations=tuple(migrations), preempt=tuple(preempt)
        )

    def _migrate(
        self,
        view: ClusterView,
        pending: list[RunningRequest],
        residents: dict[int, list[RunningRequest]],
        free: list[int],
        idle: set[int],
    ) -> tuple[list[Migration], set[int]]:
        """Move pending KV to idle decode instances (the moved requests join
        their decode batch); return the migrations and the prefill instances
        still holding pending KV."""
        pairs = {d: _decode_pairs(rs) for d, rs in residents.items()}
        migrations: list[Migration] = []
        held: set[int] = set()
        for r in pending:
            entry = (r.num_computed_tokens, r.num_remaining_output_tokens)
            best, best_peak = -1, 0
            if idle.issuperset(r.kv_instances):
                for d in residents:
                    if len(residents[d]) >= self.max_running_requests:
                        continue
                    peak = decode_peak_tokens([*pairs[d], entry])
                    if peak <= view.instances[d].capacity_tokens and (best < 0 or peak < best_peak):
                        best, best_peak = d, peak
            if best < 0:
                held.update(r.kv_instances)
                continue
            pairs[best].append(entry)
            residents[best].append(r)
            for i, tokens in r.kv:
                migrations.append(Migration(r.req_id, i, best, tokens))
                free[i] += tokens
                free[best] -= tokens
        return migrations, held

    def _prefills(
        self, view: ClusterView, idle: set[int], held: set[int], free: list[int]
    ) -> list[Batch]:
        decode_capacity = view.instances[self.num_prefill].capacity_tokens
        queue = [w for w in view.waiting if self._servable(w, view, decode_capacity)]
        used = [inst.capacity_tokens - f for inst, f in zip(view.instances, free)]
        head = 0
        batches = []
        for start in range(0, self.num_prefill, self.prefill_dop):
            group = tuple(range(start, start + self.prefill_dop))
            if head == len(queue):
                break
            if not idle.issuperset(group) or held.intersection(group):
                continue
            capacity = min(view.instances[i].capacity_tokens for i in group)
            items: list[PrefillItem] = []
            num_tokens = 0
            while head < len(queue) and len(items) < self.max_running_requests:
                w = queue[head]
                if items and num_tokens + w.num_prompt_tokens > self.max_prefill_tokens:
                    break
                retain = water_fill(w.num_prompt_tokens, group, used, capacity)
                if retain is None:
                    break
                for i, tokens in retain:
                    used[i] += tokens
                items.append(PrefillItem(w.req_id, w.num_prompt_tokens, retain))
                num_tokens += w.num_prompt_tokens
                head += 1
            if items:
                batches.append(Batch(group, prefills=tuple(items)))
        return batches

    def _servable(self, w: WaitingRequest, view: ClusterView, decode_capacity: int) -> bool:
        """Whether a prefill group and a decode instance can ever hold ``w``."""
        group_capacity = sum(view.instances[i].capacity_tokens for i in range(self.prefill_dop))
        if w.num_prompt_tokens > group_capacity:
            return False
        return w.max_output_tokens - w.num_output_tokens <= 1 or _queued_peak(w) <= decode_capacity
