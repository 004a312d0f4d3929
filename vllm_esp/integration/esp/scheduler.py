"""``ESPScheduler``: the MLFQ scheduler plus elastic placement over N instances.

The ranking policy (MLFQ by default) still decides which requests run; an
:class:`~vllm_esp.core.esp.placement.ElasticPolicy` (built by name from
``ESPConfig.placement``) decides where, and this class emits the step's
:class:`~vllm_esp.core.esp.step_plan.ESPStepPlan` for the workers:

1. ``__init__`` swaps the block pool's free queue for
   :class:`~vllm_esp.integration.esp.free_queues.InstanceFreeQueues` (the engine's
   block space is the N instances' pools side by side).
2. vLLM's ``schedule()`` cuts each request's chunk last in
   ``_reserve_prefill_lookahead``; the override lets the elastic policy cut
   it further (the hostage bound: while decodes wait, no prefill chunk's
   estimated time at its DoP exceeds ``ESPConfig.max_decode_stall_ms``).
   It then calls ``kv_cache_manager.allocate_slots`` for every request it
   schedules; the wrapper asks the elastic policy for the request's
   placement and sets it on the free queues for that call, so new blocks
   come from the chosen instances.
3. After ``schedule()``, consolidating migrations are planned (and applied
   to vLLM's block tables), and the plan is attached to the
   ``SchedulerOutput`` as ``esp_plan``; the ESP executor, in the same
   process, hands it to the instances.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request

from vllm_esp.core.esp.cluster import ClusterView, InstanceView, RunningRequest, WaitingRequest
from vllm_esp.core.esp.config import ESPConfig
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.placement import (
    Consolidation,
    ElasticPolicy,
    InstanceLoad,
    RequestPlacementView,
    StepPlacement,
    StoragePlacement,
)
from vllm_esp.core.esp.registry import make_elastic_policy
from vllm_esp.core.esp.step_plan import (
    BlockMove,
    ESPStepPlan,
    RequestStep,
    SamplingSpec,
    blocks_per_instance,
    instance_of,
)
from vllm_esp.integration.esp.free_queues import InstanceFreeQueues
from vllm_esp.integration.metrics import STATS_PREFIX
from vllm_esp.integration.mlfq.scheduler import MLFQScheduler

logger = init_logger(f"vllm.{__name__}")

#: Bytes/s a migration is assumed to move when no ESP cost file measured it
#: (the instances' gloo transport on one host, order of magnitude).
FALLBACK_MIGRATION_BANDWIDTH = 1e9


@dataclass
class ESPCounters:
    """Cumulative ESP counters, exported by :meth:`ESPScheduler.plugin_stats`."""

    #: Decode blocks placed off the request's last-block instance (group grown).
    num_scale_ups: int = 0
    #: Prefill chunks computed on more than one instance.
    num_multi_instance_prefills: int = 0
    #: Blocks moved by consolidation.
    num_migrated_blocks: int = 0
    #: Sum over scheduled requests and steps of the instances holding their KV.
    num_request_instances: int = 0
    #: Scheduled requests summed over steps.
    num_request_steps: int = 0


class ESPScheduler(MLFQScheduler):
    """MLFQ ordering + elastic placement; attaches ``esp_plan`` to each output.

    vLLM internals it touches (all in the "vLLM touchpoints" section):

    * ``kv_cache_manager.block_pool.free_block_queue``: replaced by
      :class:`InstanceFreeQueues` (same methods, one queue per instance).
    * ``kv_cache_manager.allocate_slots``: wrapped on the instance to set
      the placement around each call.
    * ``Scheduler._reserve_prefill_lookahead(request, num_computed_tokens,
      num_new_tokens)``: overridden; vLLM's last cut of a chunk before
      ``allocate_slots``, on both the running and the waiting path.
    * ``kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks``:
      read for placement views and plans; migrations rewrite entries.
    * ``block_pool.get_new_blocks`` / ``free_blocks``: migration destinations.
    * ``kv_cache_config``: one KV cache group, ``num_blocks``, page size.
    * ``max_num_scheduled_tokens`` and ``scheduler_config.max_num_batched_tokens``
      (vLLM's token and input budgets of a step): scaled by the instance
      count on this scheduler (a copy of the config), see
      :meth:`_scale_token_budget`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.esp_config = ESPConfig.from_additional_config(self.vllm_config.additional_config)
        self.num_instances = self.esp_config.num_instances
        if len(self.kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                "ESP supports models with one KV cache group (full attention "
                f"only); this model has {len(self.kv_cache_config.kv_cache_groups)}"
            )
        self.num_blocks = self.kv_cache_config.num_blocks
        self.blocks_per_instance = blocks_per_instance(self.num_blocks, self.num_instances)
        group = self.kv_cache_config.kv_cache_groups[0]
        #: Bytes of one block over all layers of one instance (migration cost).
        self.block_bytes = group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        self.esp_cost = self._load_esp_cost()
        self.elastic: ElasticPolicy = make_elastic_policy(
            self.esp_config,
            num_instances=self.num_instances,
            prefill_time=self.cost_model.chunk_time,
            esp_cost=self.esp_cost,
        )
        # vLLM touchpoints (see the class docstring).
        self._scale_token_budget()
        self.free_queues = self._install_free_queues()
        self._manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        self._orig_allocate = self._wrap_allocate_slots()
        self._step_placement: dict[str, StepPlacement] = {}
        #: Tokens placed on each instance in the step being scheduled.
        self._step_tokens = [0] * self.num_instances
        self._loads: list[InstanceLoad] = []
        self.num_esp_steps = 0
        self.last_esp_plan: ESPStepPlan | None = None
        self.counters = ESPCounters()
        bound = self.elastic.max_decode_stall_s
        logger.info(
            "vllm-esp ESP scheduler: %d instances x %d blocks (block size %d), placement=%s, "
            "max decode stall %s",
            self.num_instances,
            self.blocks_per_instance,
            self.block_size,
            self.esp_config.placement,
            "off" if bound is None else f"{bound * 1e3:.2f} ms",
        )

    def _scale_token_budget(self) -> None:
        """``max_num_batched_tokens`` is per instance: a step schedules up to
        N times it, and a prefill chunk on d instances up to d times what is
        left of theirs (:meth:`_reserve_prefill_lookahead`), so each instance
        computes at most the budget it was sized for, and a long prompt on d instances
        runs in d times fewer steps (LoongServe prefills a prompt in one
        iteration on as many instances as it needs)."""
        import copy

        #: Tokens one instance may compute in a step.
        self.tokens_per_instance: int = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens *= self.num_instances
        config: Any = copy.copy(self.vllm_config.scheduler_config)
        object.__setattr__(
            config,
            "max_num_batched_tokens",
            config.max_num_batched_tokens * self.num_instances,
        )
        self.scheduler_config = config

    def _load_esp_cost(self) -> ESPCostModel:
        path = self.esp_config.cost_model_file
        if path is not None:
            return ESPCostModel.load(path)
        return ESPCostModel.from_step_cost(
            self.cost_model,
            bytes_per_token=self.block_bytes / self.block_size,
            bandwidth_bytes_per_s=FALLBACK_MIGRATION_BANDWIDTH,
        )

    # ------------------------------------------------------------------ vLLM touchpoints
    def _install_free_queues(self) -> InstanceFreeQueues:
        pool = self.kv_cache_manager.block_pool
        queues = InstanceFreeQueues(
            pool.blocks, self.num_instances, self.blocks_per_instance, exclude=[pool.null_block]
        )
        pool.free_block_queue = queues
        return queues

    def _wrap_allocate_slots(self) -> Any:
        """Route vLLM's ``allocate_slots`` through :meth:`_allocate_slots`;
        returns the original bound method."""
        original = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_slots
        return original

    @property
    def _req_to_blocks(self) -> Any:
        """vLLM's block tables (a ``defaultdict(list)``: indexing adds an entry)."""
        return self._manager.req_to_blocks

    def _new_blocks_on(self, instance: int, num_blocks: int) -> list[Any] | None:
        """``num_blocks`` fresh blocks, all on ``instance``, or None (none taken)."""
        if self.free_queues.free_per_instance()[instance] < num_blocks:
            return None
        pool = self.kv_cache_manager.block_pool
        self.free_queues.placement = StoragePlacement((instance,))
        try:
            fresh = pool.get_new_blocks(num_blocks)
        finally:
            self.free_queues.placement = None
        if any(self._instance(b.block_id) != instance for b in fresh):
            # The destination filled up meanwhile: give them back.
            pool.free_blocks(fresh)
            return None
        return fresh

    def _release_blocks(self, blocks: list[Any]) -> None:
        """Give blocks a migration replaced back to their instances' queues."""
        self.kv_cache_manager.block_pool.free_blocks(blocks)

    # ------------------------------------------------------------------ views
    def _instance(self, block_id: int) -> int:
        return instance_of(block_id, self.blocks_per_instance)

    def _view(
        self,
        request: Request,
        num_new_tokens: int,
        num_computed_tokens: int | None = None,
        new_computed_blocks: Sequence[Any] = (),
    ) -> RequestPlacementView:
        """``num_computed_tokens``: where the chunk starts, when vLLM has not
        set it on the request yet (a prefix-cache hit being admitted);
        ``new_computed_blocks``: that hit's blocks, which vLLM appends to the
        request's table in this allocation (they count as held)."""
        if num_computed_tokens is None:
            num_computed_tokens = request.num_computed_tokens
        held = [0] * self.num_instances
        last = None
        table = self._req_to_blocks.get(request.request_id, ())
        for block in itertools.chain(table, new_computed_blocks):
            if not block.is_null:
                inst = self._instance(block.block_id)
                held[inst] += 1
                last = inst
        return RequestPlacementView(
            req_id=request.request_id,
            num_prompt_tokens=request.num_prompt_tokens,
            num_computed_tokens=num_computed_tokens,
            num_new_tokens=num_new_tokens,
            blocks_per_instance=tuple(held),
            last_block_instance=last,
            block_size=self.block_size,
        )

    def _refresh_loads(self) -> None:
        decodes = [0] * self.num_instances
        for request in self.running:
            if request.num_computed_tokens >= request.num_prompt_tokens:
                blocks = self._req_to_blocks.get(request.request_id)
                if blocks:
                    decodes[self._instance(blocks[-1].block_id)] += 1
        free = self.free_queues.free_per_instance()
        self._loads = [
            InstanceLoad(i, free[i], self.blocks_per_instance, decodes[i])
            for i in range(self.num_instances)
        ]

    def _cluster_view(self) -> ClusterView:
        """The whole cluster in tokens (every instance idle: the engine steps in lockstep)."""
        bs = self.block_size
        capacity = self.blocks_per_instance * bs
        instances = tuple(
            InstanceView(i, capacity, capacity - free * bs)
            for i, free in enumerate(self.free_queues.free_per_instance())
        )
        waiting = tuple(
            WaitingRequest(
                r.request_id,
                r.arrival_time,
                r.num_tokens,
                _max_output_tokens(r),
                r.num_output_tokens,
            )
            for r in self.waiting
        )
        running = tuple(
            RunningRequest(
                r.request_id,
                r.arrival_time,
                _prefill_target(r),
                _max_output_tokens(r),
                r.num_output_tokens,
                self._kv_tokens(r),
            )
            for r in self.running
        )
        return ClusterView(0.0, instances, waiting, running)

    def _kv_tokens(self, request: Request) -> tuple[tuple[int, int], ...]:
        """``(instance, tokens)`` of a request's computed KV, from its block table."""
        per_instance: dict[int, int] = {}
        left = request.num_computed_tokens
        for block in self._req_to_blocks.get(request.request_id, ()):
            if left <= 0:
                break
            num = min(self.block_size, left)
            left -= num
            if not block.is_null:
                inst = self._instance(block.block_id)
                per_instance[inst] = per_instance.get(inst, 0) + num
        return tuple(sorted(per_instance.items()))

    def _current_loads(self) -> list[InstanceLoad]:
        free = self.free_queues.free_per_instance()
        return [
            InstanceLoad(load.instance, free[load.instance], load.num_blocks, load.num_decodes)
            for load in self._loads
        ]

    # ------------------------------------------------------------------ allocation
    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        """vLLM's last cut of a chunk before ``allocate_slots``: the elastic
        policy cuts a prefill chunk to the hostage bound here."""
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        if num_new_tokens <= 1:
            return num_new_tokens
        loads = self._current_loads()
        view = self._view(request, num_new_tokens, num_computed_tokens)
        num_new_tokens = self.elastic.max_prefill_tokens(view, loads)
        # Each compute instance's share within what is left of its budget
        # this step; a smaller chunk may get fewer instances, so recheck
        # (the DoP only falls as the chunk shrinks). 0: not this step.
        for _ in range(self.num_instances + 1):
            view = self._view(request, num_new_tokens, num_computed_tokens)
            compute = self.elastic.compute_instances(view, loads)
            room = min(self.tokens_per_instance - self._step_tokens[i] for i in compute)
            cap = max(0, room) * len(compute)
            if num_new_tokens <= cap:
                break
            num_new_tokens = cap
        return num_new_tokens

    def _allocate_slots(
        self, request: Request, num_new_tokens: int, *args: Any, **kwargs: Any
    ) -> Any:
        # A waiting request's prefix-cache hit is not on the request yet.
        start = (
            request.num_computed_tokens
            + kwargs.get("num_new_computed_tokens", 0)
            + kwargs.get("num_external_computed_tokens", 0)
        )
        hit = kwargs.get("new_computed_blocks")
        view = self._view(request, num_new_tokens, start, hit.blocks[0] if hit else ())
        placement = self.elastic.place(view, self._current_loads())
        self.free_queues.placement = placement.storage
        try:
            blocks = self._orig_allocate(request, num_new_tokens, *args, **kwargs)
        finally:
            self.free_queues.placement = None
        if blocks is not None:
            self._step_placement[request.request_id] = placement
            share = -(-num_new_tokens // len(placement.compute))  # the largest stripe
            for instance in placement.compute:
                self._step_tokens[instance] += share
            # A scale-up is a decode whose new block landed off its home.
            table = self._req_to_blocks.get(request.request_id)
            if (
                placement.reason == "scale-up"
                and table
                and blocks.get_block_ids()[0]
                and self._instance(table[-1].block_id) != view.last_block_instance
            ):
                self.counters.num_scale_ups += 1
        return blocks

    # ------------------------------------------------------------------ step
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self._step_placement.clear()
        self._step_tokens = [0] * self.num_instances
        self._refresh_loads()
        if self.elastic.plans_steps:
            self.elastic.begin_step(self._cluster_view())
        self.held_back = self.elastic.held_back
        output = super().schedule(throttle_prefills)
        moves = self._plan_migrations(output)
        output.esp_plan = self._build_plan(output, moves)
        return output

    # ------------------------------------------------------------------ migration
    def _plan_migrations(self, output: SchedulerOutput) -> list[BlockMove]:
        """Consolidating moves of this step's decodes, applied to vLLM's tables."""
        if not self.elastic.consolidates or self.num_instances == 1:
            return []
        moves: list[BlockMove] = []
        for req_id, num_new in output.num_scheduled_tokens.items():
            request = self.requests[req_id]
            if request.num_computed_tokens - num_new < request.num_prompt_tokens:
                continue  # prefill: placement already chose where KV goes
            decision = self.elastic.consolidate(self._view(request, num_new), self._current_loads())
            if decision is None:
                continue
            table = self._req_to_blocks[req_id]
            indices = self._movable_blocks(table, decision)
            if not indices:
                continue
            fresh = self._new_blocks_on(decision.dst, len(indices))
            if fresh is not None:
                moves += self._apply_moves(table, indices, fresh)
        return moves

    def _movable_blocks(self, table: list[Any], decision: Consolidation) -> list[int]:
        """Table indices of up to ``num_blocks`` blocks on ``src`` that may move:
        never the last block (this step writes into it) nor a shared one."""
        return [
            i
            for i, b in enumerate(table[:-1])
            if not b.is_null and b.ref_cnt == 1 and self._instance(b.block_id) == decision.src
        ][: decision.num_blocks]

    def _apply_moves(
        self, table: list[Any], indices: list[int], fresh: list[Any]
    ) -> list[BlockMove]:
        """Point ``table[indices]`` at ``fresh`` and free the old blocks."""
        moves: list[BlockMove] = []
        old: list[Any] = []
        for idx, new in zip(indices, fresh, strict=True):
            old.append(table[idx])
            moves.append(BlockMove(table[idx].block_id, new.block_id))
            table[idx] = new
        self._release_blocks(old)
        self.counters.num_migrated_blocks += len(old)
        return moves

    # ------------------------------------------------------------------ plan
    def _build_plan(self, output: SchedulerOutput, moves: list[BlockMove]) -> ESPStepPlan:
        steps = [
            self._request_step(req_id, num_new)
            for req_id, num_new in output.num_scheduled_tokens.items()
        ]
        plan = ESPStepPlan(
            step=self.num_esp_steps,
            num_instances=self.num_instances,
            blocks_per_instance=self.blocks_per_instance,
            block_size=self.block_size,
            requests=tuple(steps),
            moves=tuple(moves),
            finished_req_ids=tuple(sorted(output.finished_req_ids)),
            num_waiting_decodes=sum(load.num_decodes for load in self._loads),
            max_decode_stall_s=self.elastic.max_decode_stall_s,
            ring_context_min_tokens=self.esp_config.ring_context_min_tokens,
        )
        self.last_esp_plan = plan
        self.num_esp_steps += 1
        for size in plan.instances_per_request().values():
            self.counters.num_request_instances += size
            self.counters.num_request_steps += 1
        return plan

    def _request_step(self, req_id: str, num_new: int) -> RequestStep:
        request = self.requests[req_id]
        end = request.num_computed_tokens  # vLLM already advanced it
        start = end - num_new
        block_ids = tuple(b.block_id for b in self._req_to_blocks[req_id])
        placement = self._step_placement.get(req_id)
        if start < request.num_prompt_tokens and placement is not None:
            compute = placement.compute
            if len(compute) > 1:
                self.counters.num_multi_instance_prefills += 1
        else:  # decode (or no allocation this step): compute where the token is stored
            compute = (self._instance(block_ids[start // self.block_size]),)
        sample = _sampling_spec(request) if end >= request.num_tokens else None
        return RequestStep(
            req_id=req_id,
            start=start,
            token_ids=tuple(request.all_token_ids[start:end]),
            block_ids=block_ids,
            compute=compute,
            sample=sample,
            num_output_tokens=request.num_output_tokens,
        )

    def check_invariants(self) -> None:
        """MLFQ's checks plus the hostage bound on the last plan."""
        super().check_invariants()
        if self.last_esp_plan is not None:
            self.last_esp_plan.check_invariants(self.cost_model.chunk_time)

    # ------------------------------------------------------------------ metrics
    def plugin_stats(self) -> dict[str, int]:
        """MLFQ stats plus the ESP series (see ``vllm_esp.integration.metrics``)."""
        stats = super().plugin_stats()
        for inst, num_free in enumerate(self.free_queues.free_per_instance()):
            stats[f"{STATS_PREFIX}esp_instance_free_blocks_{inst}"] = num_free
        c = self.counters
        stats[f"{STATS_PREFIX}esp_scale_ups_total"] = c.num_scale_ups
        stats[f"{STATS_PREFIX}esp_multi_instance_prefills_total"] = c.num_multi_instance_prefills
        stats[f"{STATS_PREFIX}esp_migrated_blocks_total"] = c.num_migrated_blocks
        stats[f"{STATS_PREFIX}esp_migrated_bytes_total"] = c.num_migrated_blocks * self.block_bytes
        stats[f"{STATS_PREFIX}esp_request_instances_total"] = c.num_request_instances
        stats[f"{STATS_PREFIX}esp_request_steps_total"] = c.num_request_steps
        return stats


def _prefill_target(request: Request) -> int:
    """Tokens a resident request prefills: its prompt, or (resumed after a
    recompute preemption and not caught up yet) all its tokens."""
    if request.num_computed_tokens >= request.num_tokens - 1:
        return request.num_prompt_tokens
    return request.num_tokens


def _max_output_tokens(request: Request) -> int:
    params = request.sampling_params
    return int(params.max_tokens) if params is not None and params.max_tokens else 1


def _sampling_spec(request: Request) -> SamplingSpec:
    params = request.sampling_params
    if params is None:
        return SamplingSpec()
    return SamplingSpec(
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k or 0) if (params.top_k or 0) > 0 else 0,
        min_p=float(params.min_p),
        seed=params.seed,
    )
