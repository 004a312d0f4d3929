"""The cluster view and plan: what a cluster-level ESP policy sees and decides.

A :class:`ClusterPolicy` is called at every decision point with a
:class:`ClusterView` (plain data: the instances, the waiting queue, the
requests whose KV is resident) and returns a :class:`ClusterPlan` (plain
data: batches to launch on idle instances, KV migrations, preemptions).
Whoever runs the policy carries the plan out: the cluster simulator
(``vllm_esp.sim``) in simulated time, and the engine adapter of
``ESPScheduler`` for one lockstep vLLM step. Neither changes a decision.

KV is counted in tokens per instance (LoongServe's token-granular pools;
the engine adapter converts its blocks). A request's token lifecycle::

    waiting   num_computed 0 ........ prefill (maybe in chunks) ........ P
    decoding  num_computed P, num_output 1 (the prefill sampled token 1)
    each decode step: num_computed += 1, num_output += 1
    finished  num_output == max_output  (peak KV: P + max_output - 1)

A batch is one ESP group: ``instances`` compute it together (its DoP is
``len(instances)``). A prefill item keeps its new KV on ``retain``
instances of the group (scale-down: the fewest that hold it); a decode
item's ``master`` computes the token and stores its KV, and every group
instance holding KV of the request returns a partial (multi-master
decode, merged by log-sum-exp). A decode needs every instance holding its
KV in its group: KV on a busy instance keeps the request waiting.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "Batch",
    "ClusterPlan",
    "ClusterPolicy",
    "ClusterView",
    "DecodeItem",
    "InstanceView",
    "Migration",
    "PrefillItem",
    "RunningRequest",
    "WaitingRequest",
]


@dataclass(frozen=True)
class InstanceView:
    """One instance at a decision point."""

    instance: int
    capacity_tokens: int
    #: KV tokens held or reserved (by batches in flight) on this instance.
    used_tokens: int
    #: Running a batch launched earlier: not schedulable now.
    busy: bool = False

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens


@dataclass(frozen=True)
class WaitingRequest:
    """A request with no resident KV, in arrival order."""

    req_id: str
    arrival_s: float
    #: Tokens to prefill (a preempted request re-prefills its outputs too).
    num_prompt_tokens: int
    #: Output tokens the request will produce in all (``max_tokens``).
    max_output_tokens: int
    #: Outputs produced before a preemption (0 for a new request).
    num_output_tokens: int = 0


@dataclass(frozen=True)
class RunningRequest:
    """A request whose KV is resident (partly prefilled, or decoding)."""

    req_id: str
    arrival_s: float
    num_prompt_tokens: int
    max_output_tokens: int
    num_output_tokens: int
    #: ``(instance, num_tokens)`` pairs, instances ascending, tokens > 0:
    #: where the KV is (sparse: a request spans few of many instances).
    kv: tuple[tuple[int, int], ...]
    #: In a batch in flight (its next step cannot be planned yet).
    busy: bool = False

    @property
    def num_computed_tokens(self) -> int:
        return sum(n for _, n in self.kv)

    @property
    def is_decoding(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def num_remaining_output_tokens(self) -> int:
        return self.max_output_tokens - self.num_output_tokens

    @property
    def kv_instances(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.kv)


@dataclass(frozen=True)
class ClusterView:
    """Everything a cluster policy sees at one decision point."""

    now_s: float
    instances: tuple[InstanceView, ...]
    waiting: tuple[WaitingRequest, ...] = ()
    running: tuple[RunningRequest, ...] = ()
    #: Mean output length of the requests finished so far (0: none yet).
    mean_finished_output_tokens: float = 0.0

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def idle_instances(self) -> tuple[int, ...]:
        return tuple(inst.instance for inst in self.instances if not inst.busy)


@dataclass(frozen=True)
class PrefillItem:
    """Prefill ``num_tokens`` more prompt tokens of one request."""

    req_id: str
    num_tokens: int
    #: ``(instance, num_tokens)`` pairs keeping the new KV; they sum to
    #: ``num_tokens`` and name instances of the batch.
    retain: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class DecodeItem:
    """One decode step of one request; ``master`` stores the new token's KV."""

    req_id: str
    master: int


@dataclass(frozen=True)
class Batch:
    """One group's work, launched now on idle instances."""

    instances: tuple[int, ...]
    prefills: tuple[PrefillItem, ...] = ()
    decodes: tuple[DecodeItem, ...] = ()
    #: Decode steps to run before the next decision (a request leaves the
    #: batch when its output is complete); 1 when the batch prefills.
    num_steps: int = 1
    #: The group runs as one tensor-parallel instance (a baseline), not ESP.
    tensor_parallel: bool = False

    @property
    def dop(self) -> int:
        return len(self.instances)


@dataclass(frozen=True)
class Migration:
    """Move ``num_tokens`` of a resident request's KV from ``src`` to ``dst``
    before this plan's batches start (both instances busy meanwhile)."""

    req_id: str
    src: int
    dst: int
    num_tokens: int


@dataclass(frozen=True)
class ClusterPlan:
    """A policy's decision at one decision point."""

    batches: tuple[Batch, ...] = ()
    migrations: tuple[Migration, ...] = ()
    #: Resident requests whose KV is dropped; they re-prefill from the queue.
    preempt: tuple[str, ...] = ()

    def check_invariants(self, view: ClusterView) -> None:
        """Raise ``AssertionError`` unless the plan is executable on ``view``.

        Batches use idle, pairwise disjoint instances; each request appears
        once; prefill items fit their prompt and keep KV inside their group;
        decode groups cover all KV of their requests after migration; no
        instance ends above its capacity.
        """
        n = view.num_instances
        waiting = {r.req_id: r for r in view.waiting}
        running = {r.req_id: r for r in view.running}
        used = [inst.used_tokens for inst in view.instances]
        held = {r.req_id: dict(r.kv) for r in view.running}
        idle = set(view.idle_instances)
        for req_id in self.preempt:
            assert req_id in running and not running[req_id].busy, f"cannot preempt {req_id}"
            for i, tokens in held.pop(req_id).items():
                used[i] -= tokens
        for mig in self.migrations:
            assert mig.src != mig.dst and {mig.src, mig.dst} <= idle, f"bad migration {mig}"
            kv = held.get(mig.req_id)
            assert kv is not None and not running[mig.req_id].busy, f"bad migration {mig}"
            assert 0 < mig.num_tokens <= kv.get(mig.src, 0), f"migration {mig} moves too much"
            kv[mig.src] -= mig.num_tokens
            kv[mig.dst] = kv.get(mig.dst, 0) + mig.num_tokens
            used[mig.src] -= mig.num_tokens
            used[mig.dst] += mig.num_tokens
        seen: set[str] = set(self.preempt)
        taken: set[int] = set()
        for batch in self.batches:
            group = set(batch.instances)
            assert batch.instances and len(group) == batch.dop, f"bad group {batch.instances}"
            assert group <= idle and not group & taken, f"group {batch.instances} not idle"
            assert batch.prefills or batch.decodes, "empty batch"
            assert batch.num_steps >= 1 and not (batch.prefills and batch.num_steps > 1), (
                f"a batch with prefills runs one step, not {batch.num_steps}"
            )
            taken |= group
            for item in batch.prefills:
                assert item.req_id not in seen, f"{item.req_id} planned twice"
                seen.add(item.req_id)
                _check_prefill(item, waiting, running, held, group)
                for inst, tokens in item.retain:
                    used[inst] += tokens
            for dec in batch.decodes:
                assert dec.req_id not in seen, f"{dec.req_id} planned twice"
                seen.add(dec.req_id)
                req = running.get(dec.req_id)
                assert req is not None and req.is_decoding and not req.busy, f"{dec} not decodable"
                holders = {i for i, t in held[dec.req_id].items() if t > 0}
                assert dec.master in group and holders <= group, (
                    f"{dec} outside group {batch.instances}"
                )
                used[dec.master] += min(batch.num_steps, req.num_remaining_output_tokens)
        for i in range(n):
            cap = view.instances[i].capacity_tokens
            assert used[i] <= cap, f"instance {i} over capacity: {used[i]} > {cap}"


def _check_prefill(
    item: PrefillItem,
    waiting: dict[str, WaitingRequest],
    running: dict[str, RunningRequest],
    held: dict[str, dict[int, int]],
    group: set[int],
) -> None:
    if item.req_id in waiting:
        left = waiting[item.req_id].num_prompt_tokens
    else:
        req = running.get(item.req_id)
        assert req is not None and not req.busy, f"{item.req_id} cannot prefill"
        left = req.num_prompt_tokens - sum(held[item.req_id].values())
    assert 0 < item.num_tokens <= left, f"{item} prefills {item.num_tokens} of {left} tokens"
    assert sum(t for _, t in item.retain) == item.num_tokens, f"{item} retains the wrong count"
    assert all(t > 0 and i in group for i, t in item.retain), f"{item} retains outside its group"


class ClusterPolicy(ABC):
    """A cluster-level ESP policy (LoongServe's scheduler, or a baseline)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def schedule(self, view: ClusterView) -> ClusterPlan:
        """The plan for this decision point (may be empty: wait)."""
