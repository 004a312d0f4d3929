"""LoongServe's four-step scheduler as a :class:`ClusterPolicy` (torch-free).

At each decision point, over the idle instances:

1. **dispatch** (:mod:`.dispatch`): which waiting requests start, by FCFS
   with bounded out-of-order skipping and the memory and compute gates;
2. **allocation** (:mod:`.allocation`): consolidate decode KV by migration
   when it pays, set decode groups aside for capacity or speed, and hand
   the rest of the idle instances to the prefills;
3. **batching** (:mod:`.batching`): the DP that splits the admitted
   prompts into prefill batches and picks each batch's instances (DoP);
4. **scaling** (:mod:`.scaling`): each prefill keeps its KV on the fewest
   instances (scale-down); the decode groups run multi-master, growing onto
   spare instances when full or compute-bound (scale-up).

A decodable request is a decoding one whose KV lies on idle instances
only; the decode groups are their connected components over those
instances. Decode batches run one step when the decision admits prefills
(the next decision reconsiders the queue), else
``decode_steps_per_decision`` steps (LoongServe's ``max_wait_tokens``).
A partly prefilled resident (the engine chunks long prompts; this policy
never does) is admitted already: its remaining prompt joins the DP ahead
of the newly dispatched ones.

Preemption (recompute) happens only when nothing else can run: no instance
is busy and no batch fits. Then the resident with the latest arrival is
paused (LoongServe's ``Fcfs`` pause strategy), one at a time, until a
batch fits.
"""

from __future__ import annotations

from dataclasses import replace

from vllm_esp.core.esp.cluster import (
    Batch,
    ClusterPlan,
    ClusterPolicy,
    ClusterView,
    Migration,
    PrefillItem,
    RunningRequest,
    WaitingRequest,
)
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.allocation import (
    DecodeGroup,
    Workspace,
    allocate,
    decode_groups,
)
from vllm_esp.core.esp.loong.batching import PrefillGroup, plan_prefill_batches
from vllm_esp.core.esp.loong.dispatch import LoongSettings, WaitingIndex, dispatch
from vllm_esp.core.esp.loong.scaling import pack_retain, plan_decode_group

__all__ = ["LoongPolicy", "LoongSettings"]

#: Frozen, so one shared default is safe.
DEFAULT_SETTINGS = LoongSettings()

#: ``(compute instances, storage instances in order)`` of one planned request.
Placement = tuple[tuple[int, ...], tuple[int, ...]]


class LoongPolicy(ClusterPolicy):
    """LoongServe's scheduler; see the module docstring."""

    name = "loong"

    def __init__(
        self, num_instances: int, cost: ESPCostModel, settings: LoongSettings = DEFAULT_SETTINGS
    ) -> None:
        if num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        self.num_instances = num_instances
        self.cost = cost
        self.settings = settings
        #: Consecutive decisions that admitted out of FCFS order.
        self.num_ooe = 0
        self.last_plan = ClusterPlan()
        self._placements: dict[str, Placement] | None = None
        #: The last waiting queue's index (reused while the queue is the same tuple).
        self._index: WaitingIndex | None = None

    # ------------------------------------------------------------------ plan
    def schedule(self, view: ClusterView) -> ClusterPlan:
        if view.num_instances != self.num_instances:
            raise ValueError(f"view has {view.num_instances} instances, not {self.num_instances}")
        preempt: list[str] = []
        current = view
        while True:
            batches, migrations, num_ooe = self._plan(current)
            if batches or any(inst.busy for inst in current.instances):
                break
            victim = max(
                (r for r in current.running if not r.busy),
                key=lambda r: (r.arrival_s, r.req_id),
                default=None,
            )
            if victim is None:
                break
            preempt.append(victim.req_id)
            current = _without(current, victim)
        self.num_ooe = num_ooe
        self.last_plan = ClusterPlan(tuple(batches), tuple(migrations), tuple(preempt))
        self._placements = None
        return self.last_plan

    def _plan(self, view: ClusterView) -> tuple[list[Batch], list[Migration], int]:
        settings = self.settings
        idle = [inst.instance for inst in view.instances if not inst.busy]
        idle_set = set(idle)
        decodable, partial = _idle_residents(view.running, idle_set)
        ws = Workspace.of(view, decodable)
        self._index = WaitingIndex.for_queue(view.waiting, self._index)
        step1 = dispatch(view, decodable, self.cost, settings, self.num_ooe, self._index)
        admitted = partial + step1.admitted
        batches: list[Batch] = []
        migrations: list[Migration] = []
        if admitted:
            holding = {i for kv in ws.kv.values() for i in kv}
            lengths = [w.num_prompt_tokens for w in admitted]
            alloc = allocate(ws, [i for i in idle if i not in holding], lengths, self.cost)
            migrations = alloc.migrations
            batches += self._prefills(ws, admitted, alloc.pool)
            taken = {i for b in batches for i in b.instances}
            # A set-aside group the DP left alone decodes after all.
            groups = alloc.kept + [g for g in alloc.aside if taken.isdisjoint(g.instances)]
            rest = alloc.pool
            num_steps = 1
        else:
            groups = decode_groups(ws, list(ws.kv))
            taken = set()
            rest = idle
            num_steps = settings.decode_steps_per_decision
        taken.update(i for g in groups for i in g.instances)
        spares = sorted(
            (i for i in rest if i not in taken and ws.free(i) > 0), key=lambda i: (-ws.free(i), i)
        )
        batches += self._decodes(ws, groups, spares, num_steps)
        return batches, migrations, step1.num_ooe

    def _prefills(
        self, ws: Workspace, admitted: tuple[WaitingRequest, ...], pool: list[int]
    ) -> list[Batch]:
        """Step 3 (the DP) and the scale-down retain of each prefill batch."""
        lengths = [w.num_prompt_tokens for w in admitted]
        free = [ws.free(i) for i in pool]
        groups = plan_prefill_batches(lengths, free, self.cost.prefill_time)
        if groups is None:
            if not pool or sum(lengths) > sum(free):
                return []
            everything = tuple(range(len(admitted)))
            groups = (PrefillGroup(everything, tuple(range(len(pool))), 0.0),)
        batches = []
        for group in groups:
            reqs = [admitted[j] for j in group.requests]
            insts = [pool[j] for j in group.instances]
            retains = pack_retain(ws, [r.num_prompt_tokens for r in reqs], insts)
            items = tuple(
                PrefillItem(r.req_id, r.num_prompt_tokens, retain)
                for r, retain in zip(reqs, retains)
            )
            batches.append(Batch(tuple(sorted(insts)), prefills=items))
        return batches

    def _decodes(
        self, ws: Workspace, groups: list[DecodeGroup], spares: list[int], num_steps: int
    ) -> list[Batch]:
        """Step 4 for the decode groups, the largest first (it gets spares first)."""
        batches = []
        for g in sorted(groups, key=lambda g: (-len(g.req_ids), g.instances[0])):
            plan = plan_decode_group(
                ws,
                g.req_ids,
                g.instances,
                spares,
                num_steps=num_steps,
                min_comp_bound=self.settings.min_comp_bound_decode_batch,
            )
            if plan.batch is not None:
                batches.append(plan.batch)
            if plan.added:
                spares = [i for i in spares if i not in plan.added]
        return batches

    # ------------------------------------------------------------------ engine
    def placement_for(self, req_id: str) -> Placement | None:
        """``(compute instances, storage instances in order)`` of ``req_id``
        in the last plan: a prefill's batch and ``retain`` instances, a
        decode's batch and master; None if the plan left it out."""
        if self._placements is None:
            placements: dict[str, Placement] = {}
            for batch in self.last_plan.batches:
                for item in batch.prefills:
                    placements[item.req_id] = (batch.instances, tuple(i for i, _ in item.retain))
                for dec in batch.decodes:
                    placements[dec.req_id] = (batch.instances, (dec.master,))
            self._placements = placements
        return self._placements.get(req_id)


def _idle_residents(
    running: tuple[RunningRequest, ...], idle: set[int]
) -> tuple[list[RunningRequest], tuple[WaitingRequest, ...]]:
    """The residents whose KV lies on idle instances only, not busy: the
    decodable ones (output left), and the partly prefilled ones as their
    remaining prompt. One pass: it runs at every decision over every resident."""
    decodable: list[RunningRequest] = []
    partial: list[WaitingRequest] = []
    for r in running:
        if r.busy:
            continue
        kv = r.kv
        if len(kv) == 1:
            inst, computed = kv[0]
            if inst not in idle:
                continue
        else:
            if not all(i in idle for i, _ in kv):
                continue
            computed = sum(t for _, t in kv)
        if computed >= r.num_prompt_tokens:
            if r.max_output_tokens > r.num_output_tokens:
                decodable.append(r)
        else:
            partial.append(
                WaitingRequest(
                    r.req_id,
                    r.arrival_s,
                    r.num_prompt_tokens - computed,
                    r.max_output_tokens,
                    r.num_output_tokens,
                )
            )
    return decodable, tuple(partial)


def _without(view: ClusterView, victim: RunningRequest) -> ClusterView:
    """``view`` after preempting ``victim`` (its KV freed)."""
    freed = dict(victim.kv)
    instances = tuple(
        replace(inst, used_tokens=inst.used_tokens - freed[inst.instance])
        if inst.instance in freed
        else inst
        for inst in view.instances
    )
    running = tuple(r for r in view.running if r.req_id != victim.req_id)
    return replace(view, instances=instances, running=running)
