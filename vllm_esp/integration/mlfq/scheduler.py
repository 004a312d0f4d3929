"""vLLM V1 scheduler with skip-join MLFQ ranking and preemption by rank.

``MLFQScheduler`` subclasses vLLM's ``Scheduler`` and keeps its ~900-line
``schedule()`` body: each step it asks the policy (``vllm_esp.core.mlfq``) for
an order, lets the planner (``vllm_esp.core.mlfq.admission``) pick the step's
members, and then runs vLLM's own ``schedule()`` over exactly those
members, in rank order::

    schedule()
      1. plan       _plan(): policy.iter_ranked() -> planner -> AdmissionPlan
      2. evict      _evict_planned(): free the KV of plan.preempt (lowest
                    ranks, for higher-ranked requests) and plan.offload
      3. narrow     _narrow_queues_to_plan():
                    self.running <- residents in plan.run (rank order)
                    self.waiting <- newcomers in plan.run (rank order)
      4. vLLM       _schedule_narrowed(): super().schedule()  (token budget,
                    blocks, ...)
      5. restore    _restore_queues(): paused residents back into
                    self.running, the full waiting queue back into self.waiting
      6. charge     _charge_policy(): policy.on_scheduled(...) per scheduled
                    request, policy.end_step(now)  (demotion / promotion)

Paused residents stay in ``self.running`` between steps, with their KV
blocks, so vLLM's accounting (``get_request_counts``, aborts, prefix-cache
resets) sees them; the model runner drops them from its persistent batch
while they are not scheduled and re-adds them from its cached state.

Step 1 (requests as the planner's plain-data ``Candidate``s) is
``PlanningMixin`` (``planning.py``); what host KV swap (scheduler
``mlfq-swap``) adds - swap-out on preemption, *offload* and *prefetch* in
the plan, loaded prefetches as residents - is ``HostSwapMixin``
(``swap_support.py``).

On GPU, vLLM enables async scheduling by default, which a plain
``Scheduler`` subclass would silently run without its overlap;
``MLFQScheduler(...)`` therefore constructs ``MLFQAsyncScheduler`` (the
same logic over ``AsyncScheduler``) whenever async scheduling is on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import FCFSRequestQueue, RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.request import Request, RequestStatus

from vllm_esp.core.mlfq import RequestInfo, make_policy
from vllm_esp.core.mlfq.admission import AdmissionPlan
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.mlfq.value import OutputLengthModel
from vllm_esp.integration.cost_model import load_cost_model

# STATS_PREFIX: the keys this scheduler adds to
# SchedulerStats.num_kv_fetch_reqs_by_stage (see vllm_esp.integration.metrics).
from vllm_esp.integration.metrics import STATS_PREFIX
from vllm_esp.integration.mlfq.planning import PlanningMixin
from vllm_esp.integration.mlfq.queue import IndexedRequestQueue
from vllm_esp.integration.predictor import load_output_predictor

logger = init_logger(f"vllm.{__name__}")  # under vLLM's handlers


class MLFQScheduler(Scheduler, PlanningMixin):
    """vLLM ``Scheduler`` ranked by a ``vllm_esp`` policy (default: MLFQ).

    Every override of a vLLM method is here; the mixins come after vLLM's
    ``Scheduler`` and only add helpers, so ``MLFQAsyncScheduler`` resolves
    our overrides first and AsyncScheduler's next."""

    # vLLM's queues and admission limit, swapped for each step's own.
    running: list[Request]
    waiting: RequestQueue
    kv_holding_waiting: RequestQueue
    max_num_active_reqs: int

    def __new__(cls, *args: Any, **kwargs: Any) -> MLFQScheduler:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if (
            cls is MLFQScheduler
            and vllm_config is not None
            and vllm_config.scheduler_config.async_scheduling
        ):
            cls = MLFQAsyncScheduler
        return super().__new__(cls)

    def __init__(
        self,
        *args: Any,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mlfq_config = MLFQConfig.from_additional_config(self.vllm_config.additional_config)
        self.cost_model = load_cost_model(self.mlfq_config, self.vllm_config)
        self.rank_policy = make_policy(self.mlfq_config, self.cost_model)
        # The served tokenizer's output-length predictor (None when off); a
        # configured one that is missing fails here, at start-up.
        self.output_predictor = load_output_predictor(
            self.mlfq_config, self.vllm_config.model_config.tokenizer
        )
        # Finished requests' output lengths: what preemption by value
        # expects a request still to need (vllm_esp.core.mlfq.value). A
        # policy that learns them already (mlfq) shares its own.
        shared_lengths = self.rank_policy.output_lengths
        self._observes_lengths = shared_lengths is None
        self.output_lengths = shared_lengths if shared_lengths is not None else OutputLengthModel()
        self._clock = clock
        # The ranked policy owns the order; vLLM's queue only holds members.
        self.waiting = IndexedRequestQueue(self.waiting)
        self.num_rank_preemptions = 0
        self.num_paused_steps = 0
        self.num_paused_last_step = 0
        self.last_plan: AdmissionPlan | None = None
        #: Waiting requests this step may not start (the ESP scheduler's
        #: elastic policy sets it; the plan skips them).
        self.held_back: frozenset[str] = frozenset()
        # Recompute accounting: for each request preempted since it last
        # got back to where it was, the tokens it had computed when its KV
        # was freed (vLLM counts scheduled tokens as computed, so this holds
        # under async scheduling too). Scheduling a position below it again
        # is recompute; only these requests are checked each step.
        self._computed_high_water: dict[str, int] = {}
        self.num_recomputed_tokens = 0
        self._init_swap()
        logger.info(
            "vllm-esp %s scheduler: policy=%s levels=%d quanta(ms)=%s cost model=%s",
            type(self).__name__,
            self.mlfq_config.policy,
            self.mlfq_config.num_levels,
            [round(q * 1e3, 2) for q in getattr(self.rank_policy, "quanta_s", ())][:4],
            self.cost_model.source,
        )

    # ---------------------------------------------------------------- intake
    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests
        super().add_request(request)
        if not is_new or request.request_id not in self.requests:
            return
        if request.is_finished():
            return
        # Prefix-cache aware skip-join: only the uncached tail costs time.
        _, num_cached, _ = self.kv_cache_manager.get_computed_blocks(request)
        predicted = None
        if self.output_predictor is not None and request.prompt_token_ids is not None:
            predicted = self.output_predictor.predict_tokens(request.prompt_token_ids)
        now = self._clock()
        self.rank_policy.add_request(
            RequestInfo(
                request_id=request.request_id,
                arrival_time=now,
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=num_cached,
                max_tokens=request.max_tokens,
                predicted_output_tokens=predicted,
            ),
            now,
        )

    def _free_request(
        self, request: Request, delay_free_blocks: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        # The one exit of every finished or aborted request. A finished
        # request's output length teaches policies that learn lengths; an
        # aborted one says nothing about them.
        finished = request.status != RequestStatus.FINISHED_ABORTED
        self.rank_policy.remove_request(
            request.request_id, request.num_output_tokens if finished else None
        )
        if finished and self._observes_lengths:
            self.output_lengths.observe(request.num_output_tokens)
        self._computed_high_water.pop(request.request_id, None)
        return super()._free_request(request, delay_free_blocks=delay_free_blocks)

    def _preempt_request(
        self, request: Request, timestamp: float, drop_stale_output: bool = False
    ) -> None:
        # drop_stale_output=True is reset_prefix_cache(), whose point is to
        # discard KV (e.g. new weights): recompute then.
        if not drop_stale_output:
            self._swap_out(request)
        high_water = self._computed_high_water
        request_id = request.request_id
        high_water[request_id] = max(high_water.get(request_id, 0), request.num_computed_tokens)
        super()._preempt_request(request, timestamp, drop_stale_output=drop_stale_output)

    def _evict(self, request: Request, now: float) -> None:
        """Free a resident's device blocks (to host if swap is on)."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._preempt_request(request, now)
        else:
            self._unprefetch(request)

    # -------------------------------------------------------------- schedule
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._pause_state != PauseState.UNPAUSED:
            return super().schedule(throttle_prefills)
        now = self._clock()
        if self.swap is not None:
            self._promote_loaded_prefetches()
        self.output_lengths.maybe_refit()
        plan = self._plan()
        self.last_plan = plan
        self._evict_planned(plan, now)
        step = self._narrow_queues_to_plan(plan)
        # The residents the plan leaves out (evicted ones left self.running
        # already) are paused: counted here, never listed.
        num_paused = len(self.running) - len(step.running)
        self.num_paused_last_step = num_paused
        self.num_paused_steps += num_paused
        output = self._schedule_narrowed(step, throttle_prefills)
        self._charge_policy(output, now)
        return output

    def _evict_planned(self, plan: AdmissionPlan, now: float) -> None:
        for request_id in plan.preempt:
            self._evict(self.requests[request_id], now)
            self.num_rank_preemptions += 1
        for request_id in plan.offload:
            self._evict(self.requests[request_id], now)
            self.num_offloads += 1

    def _narrow_queues_to_plan(self, plan: AdmissionPlan) -> _StepQueues:
        """vLLM's queues for this step: the plan's members, in rank order."""
        step = _StepQueues()
        running = RequestStatus.RUNNING
        members = list(map(self.requests.__getitem__, plan.run))
        step.running = [r for r in members if r.status is running]
        if len(step.running) < len(members):
            for request in members:
                if request.status is running:
                    continue
                if self._is_prefetched(request):
                    step.kv_holding_waiting.append(request)
                else:
                    step.waiting.append(request)
        # Requests the policy does not rank (e.g. blocked on a KV load) keep
        # vLLM's own handling: they ride along behind the ranked ones.
        riders = self._unranked_waiting()
        riders_holding = [r for r in self.kv_holding_waiting if not self._swap_managed(r)]
        if not riders and not riders_holding:
            # A prefetch raises vLLM's admission limit for this call (it
            # enters WAITING_FOR_REMOTE_KVS, not RUNNING, but vLLM checks
            # the limit first); a rider could then take an unplanned slot.
            step.prefetch = list(plan.prefetch)
        step.waiting.extend(self.requests[r] for r in step.prefetch)
        step.waiting.extend(riders)
        step.kv_holding_waiting.extend(riders_holding)
        return step

    def _unranked_waiting(self) -> list[Request]:
        """Waiting requests the policy does not rank (rare: e.g. a
        streaming session's next chunk). O(1) when there are none: every
        ranked request sits in exactly one of the three queues."""
        num_queued = (
            len(self.running)
            + len(self.waiting)
            + len(self.kv_holding_waiting)
            + self.num_waiting_for_streaming_input
        )
        if num_queued <= len(self.rank_policy):
            return []
        return [r for r in self.waiting if r.request_id not in self.rank_policy]

    def _schedule_narrowed(self, step: _StepQueues, throttle_prefills: bool) -> SchedulerOutput:
        """vLLM's own ``schedule()`` over the step's queues only."""
        full_running = self.running
        num_step_residents = len(step.running)
        full_waiting = self.waiting
        full_holding = self.kv_holding_waiting
        max_active = self.max_num_active_reqs
        if step.prefetch:
            self._mark_prefetches(step.prefetch)
            self.max_num_active_reqs = max_active + len(step.prefetch)
        # Only these can leave the waiting queues this step.
        newcomers = [*step.waiting, *step.kv_holding_waiting]
        self.running = step.running
        self.waiting = step.waiting
        self.kv_holding_waiting = step.kv_holding_waiting
        try:
            return super().schedule(throttle_prefills)
        finally:
            self.max_num_active_reqs = max_active
            self._clear_prefetch_marks()
            self._restore_queues(
                full_running, num_step_residents, full_waiting, full_holding, newcomers
            )

    def _restore_queues(
        self,
        full_running: list[Request],
        num_step_residents: int,
        full_waiting: RequestQueue,
        full_holding: RequestQueue,
        newcomers: list[Request],
    ) -> None:
        """Put the full queues back, updated with what vLLM did this step."""
        step_running = self.running
        left_waiting = list(self.waiting)
        left_holding = list(self.kv_holding_waiting)
        self.waiting = full_waiting
        self.kv_holding_waiting = full_holding
        # Newcomers vLLM admitted are running now: drop them from the full
        # queues (remove_requests ignores ids a queue does not hold).
        running = RequestStatus.RUNNING
        admitted = [r for r in newcomers if r.status is running]
        full_waiting.remove_requests(admitted)
        full_holding.remove_requests(admitted)
        # Prefetches vLLM started now hold blocks (WAITING_FOR_REMOTE_KVS):
        # they moved from the waiting to the kv-holding queue.
        for request in left_holding:
            if request not in full_holding and not request.is_finished():
                full_waiting.remove_requests((request,))
                full_holding.add_request(request)
        # vLLM may still preempt under memory pressure; those land in the
        # step queue and must survive the swap back.
        for request in left_waiting:
            if request not in full_waiting and not request.is_finished():
                full_waiting.prepend_request(request)
        # vLLM appends what it admits to its running list and takes out
        # what it preempts (then it admits nothing):
        #
        #   step_running = [step residents it kept] + [admitted]
        #
        # The full list already holds every resident, paused or not, so it
        # only gains the admitted ones, unless a resident was preempted: a
        # count, not a pass over thousands of paused residents.
        if len(step_running) == num_step_residents + len(admitted):
            self.running = full_running + admitted
        else:
            self.running = [r for r in full_running if r.status is running] + admitted

    def _charge_policy(self, output: SchedulerOutput, now: float) -> None:
        """Charge the policy for what ran (demotion/promotion), and count
        recompute: scheduling a position below where a preempted request
        had got to again."""
        num_scheduled = output.num_scheduled_tokens
        if self._computed_high_water:
            self._count_recompute(num_scheduled)
        # (request_id, num_new_tokens, num_computed_tokens before them), as
        # vLLM's output lists them for the model runner: the cached
        # requests' in three C-level iterators (no Python frame per
        # request), the few new ones in a loop.
        cached = output.scheduled_cached_reqs
        cached_ids = cached.req_ids
        charges: Iterable[tuple[str, int, int]] = zip(
            cached_ids, map(num_scheduled.__getitem__, cached_ids), cached.num_computed_tokens
        )
        if output.scheduled_new_reqs:
            new = [
                (r.req_id, num_scheduled[r.req_id], r.num_computed_tokens)
                for r in output.scheduled_new_reqs
            ]
            charges = itertools.chain(charges, new)
        self.rank_policy.on_scheduled_step(charges, now)
        self.rank_policy.end_step(self._clock())

    def _count_recompute(self, num_scheduled: dict[str, int]) -> None:
        high_water = self._computed_high_water
        for request_id in high_water.keys() & num_scheduled.keys():
            num_computed = self.requests[request_id].num_computed_tokens
            start = num_computed - num_scheduled[request_id]
            done_before = high_water[request_id]
            if start < done_before:
                self.num_recomputed_tokens += min(done_before, num_computed) - start
            if num_computed >= done_before:
                del high_water[request_id]

    # ----------------------------------------------------------------- stats
    def plugin_stats(self) -> dict[str, int]:
        """Counters and gauges exported through vLLM's stats path."""
        stats = self.rank_policy.stats()
        out = {
            f"{STATS_PREFIX}queue_level_{level}": n
            for level, n in enumerate(stats.num_requests_per_level)
        }
        out[f"{STATS_PREFIX}demotions_total"] = stats.num_demotions
        out[f"{STATS_PREFIX}promotions_total"] = stats.num_promotions
        out[f"{STATS_PREFIX}rank_preemptions_total"] = self.num_rank_preemptions
        out[f"{STATS_PREFIX}paused_reqs"] = self.num_paused_last_step
        out[f"{STATS_PREFIX}recomputed_tokens_total"] = self.num_recomputed_tokens
        out.update(self._swap_stats())
        return out

    def make_stats(self, *args: Any, **kwargs: Any) -> SchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            stats.num_kv_fetch_reqs_by_stage.update(self.plugin_stats())
        return stats

    def check_invariants(self) -> None:
        """Cross-check the policy, vLLM's queues and the block pool."""
        self.rank_policy.check_invariants()
        unfinished = {r for r, req in self.requests.items() if not req.is_finished()}
        tracked = {r for r in unfinished if r in self.rank_policy}
        assert tracked == unfinished, f"untracked requests: {unfinished - tracked}"
        running = {r.request_id for r in self.running}
        waiting = {r.request_id for r in self.waiting}
        holding = {r.request_id for r in self.kv_holding_waiting}
        assert not running & waiting, f"both running and waiting: {running & waiting}"
        queued_twice = holding & (running | waiting)
        assert not queued_twice, f"holding KV and queued twice: {queued_twice}"
        assert len(self.running) == len(running), "duplicate in running"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request.request_id
        if self.swap is not None:
            self._check_swap_invariants(waiting, holding)


@dataclass
class _StepQueues:
    """The queues vLLM's ``schedule()`` sees for one step, and the plan's
    prefetches it admits (request ids; empty when riders ride along)."""

    running: list[Request] = field(default_factory=list)
    waiting: FCFSRequestQueue = field(default_factory=FCFSRequestQueue)
    kv_holding_waiting: FCFSRequestQueue = field(default_factory=FCFSRequestQueue)
    prefetch: list[str] = field(default_factory=list)


class MLFQAsyncScheduler(MLFQScheduler, AsyncScheduler):
    """``MLFQScheduler`` over vLLM's ``AsyncScheduler`` (GPU overlap kept)."""
