"""LoongServe's scheduler in the engine: :class:`LoongPolicy` behind ``ElasticPolicy``.

The engine steps every instance in lockstep, and vLLM's scheduler (with the
ranking policy) decides which requests run in a step. Once per step, before
vLLM allocates anything, the ESP scheduler hands this adapter the cluster
view (:meth:`begin_step`); the adapter runs the same :class:`LoongPolicy`
object the cluster simulator runs and keeps its plan. Each allocation then
asks :meth:`place`, which answers from the plan:

* a prefill item: computed on its batch's instances (the DP's DoP), its
  new KV kept on the plan's ``retain`` instances (scale-down), after the
  instance of any block it holds already (a prefix-cache hit: the plan,
  made before vLLM allocates, cannot see it);
* a decode item: computed and stored on its master (multi-master decode;
  a master off the request's KV instances is a scale-up);
* a planned migration: returned by :meth:`consolidate`, in whole blocks,
  at most ``migrate_blocks_per_step`` of them.

Step 1 admits in the engine as in the simulator: while any request is
resident, the waiting requests the plan does not prefill are held back
(:attr:`held_back`; the ranking policy orders the rest), so a long prompt
the compute gate defers waits instead of running beside the decodes. With
nothing resident nothing is held, so a prompt step 1 never admits cannot
stall the engine. A request vLLM schedules that the plan left out (a
resident the plan did not decode, a recompute) is placed by the threshold
rules.

The engine's hostage bound holds here too (``max_decode_stall_ms``): while
decodes wait, a planned prefill chunk is cut so that its estimated time,
shared by the DoP the plan gave it, stays within the bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_esp.core.esp.cluster import ClusterPlan, ClusterView
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.policy import LoongPolicy, LoongSettings
from vllm_esp.core.esp.placement import (
    Consolidation,
    ElasticPolicy,
    InstanceLoad,
    PrefillTime,
    RequestPlacementView,
    StepPlacement,
    StoragePlacement,
    ThresholdElasticPolicy,
    bounded_prefill_chunk,
    decodes_waiting,
)

if TYPE_CHECKING:
    from vllm_esp.core.esp.config import ESPConfig

__all__ = ["LoongElasticPolicy"]


class LoongElasticPolicy(ElasticPolicy):
    """The engine's view of :class:`LoongPolicy`; see the module docstring."""

    name = "loong"

    def __init__(self, policy: LoongPolicy, fallback: ThresholdElasticPolicy) -> None:
        self.policy = policy
        self.fallback = fallback
        self.max_decode_stall_s = fallback.max_decode_stall_s
        self.plan = ClusterPlan()
        self._moves: dict[str, tuple[int, int, int]] = {}
        #: Allocations answered from the plan / by the fallback (tests, metrics).
        self.num_planned = 0
        self.num_fallback = 0

    @classmethod
    def from_settings(
        cls,
        settings: ESPConfig,
        *,
        num_instances: int,
        prefill_time: PrefillTime,
        esp_cost: ESPCostModel,
    ) -> LoongElasticPolicy:
        fallback = ThresholdElasticPolicy.from_settings(
            settings, num_instances=num_instances, prefill_time=prefill_time, esp_cost=esp_cost
        )
        return cls(LoongPolicy(num_instances, esp_cost, LoongSettings()), fallback)

    # ------------------------------------------------------------------ step
    def begin_step(self, view: ClusterView) -> None:
        self.plan = self.policy.schedule(view)
        if view.running:
            planned = {item.req_id for b in self.plan.batches for item in b.prefills}
            self.held_back = frozenset(w.req_id for w in view.waiting if w.req_id not in planned)
        else:
            self.held_back = frozenset()
        # The engine moves one shard per request and step: the plan's largest.
        self._moves = {}
        for m in sorted(self.plan.migrations, key=lambda m: m.num_tokens):
            self._moves[m.req_id] = (m.src, m.dst, m.num_tokens)

    def max_prefill_tokens(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> int:
        planned = self.policy.placement_for(request.req_id)
        if planned is None:
            return self.fallback.max_prefill_tokens(request, loads)
        if self.max_decode_stall_s is None or not decodes_waiting(loads):
            return request.num_new_tokens
        # place() computes a prompt chunk on the plan's batch, anything else
        # (recomputed outputs) on one instance.
        max_dop = len(planned[0]) if request.is_prefill else 1
        return bounded_prefill_chunk(
            self.fallback.prefill_time,
            request.num_new_tokens,
            request.num_computed_tokens,
            max_dop=max_dop,
            max_stall_s=self.max_decode_stall_s,
        )

    def compute_instances(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> tuple[int, ...]:
        planned = self.policy.placement_for(request.req_id)
        if planned is None:
            return self.fallback.compute_instances(request, loads)
        compute, storage = planned
        return compute if request.is_prefill else (storage[0],)

    def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
        planned = self.policy.placement_for(request.req_id)
        if planned is None:
            self.num_fallback += 1
            return self.fallback.place(request, loads)
        self.num_planned += 1
        compute, storage = planned
        if request.is_prefill:
            home = request.last_block_instance
            if home is not None and storage[0] != home:
                # It holds blocks the plan could not see (a prefix-cache hit,
                # found when vLLM allocates): the rest of the prompt goes
                # there first, so its KV does not span instances for life.
                storage = (home, *(i for i in storage if i != home))
            return StepPlacement(compute, StoragePlacement(storage), "prefill")
        master = storage[0]
        reason = "decode" if master == request.last_block_instance else "scale-up"
        return StepPlacement((master,), StoragePlacement((master,)), reason)

    @property
    def consolidates(self) -> bool:
        # ``migrate_blocks_per_step`` caps the engine's moves per request and
        # step, whoever plans them (0: off).
        return self.fallback.migrate_blocks_per_step > 0

    def consolidate(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> Consolidation | None:
        move = self._moves.get(request.req_id)
        if move is None:
            return None
        src, dst, num_tokens = move
        num_blocks = min(num_tokens // request.block_size, self.fallback.migrate_blocks_per_step)
        return Consolidation(src, dst, num_blocks) if num_blocks > 0 else None
