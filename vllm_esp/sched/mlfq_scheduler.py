"""vLLM V1 scheduler with skip-join MLFQ ranking and preemption by rank.

``MLFQScheduler`` subclasses vLLM's ``Scheduler`` and keeps its ~900-line
``schedule()`` body: each step it asks the policy (``vllm_esp.policy``) for
an order, lets the planner (``vllm_esp.sched.planner``) pick the step's
members, and then runs vLLM's own ``schedule()`` over exactly those
members, in rank order::

    schedule()
      1. plan       policy.iter_ranked() -> planner -> StepPlan
      2. preempt    plan.preempt: free KV of low-ranked residents
      3. narrow     self.running <- residents in plan.run (rank order)
                    self.waiting <- newcomers in plan.run (rank order)
      4. vLLM       super().schedule()          (token budget, blocks, ...)
      5. restore    paused residents back into self.running,
                    the full waiting queue back into self.waiting
      6. charge     policy.on_scheduled(...) per scheduled request,
                    policy.end_step(now)        (demotion / promotion)

Paused residents stay in ``self.running`` between steps, with their KV
blocks, so vLLM's accounting (``get_request_counts``, aborts, prefix-cache
resets) sees them; the model runner drops them from its persistent batch
while they are not scheduled and re-adds them from its cached state.

On GPU, vLLM enables async scheduling by default, which a plain
``Scheduler`` subclass would silently run without its overlap;
``MLFQScheduler(...)`` therefore constructs ``MLFQAsyncScheduler`` (the
same logic over ``AsyncScheduler``) whenever async scheduling is on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_esp.config import MLFQConfig
from vllm_esp.costmodel.loader import load_cost_model
# STATS_PREFIX: the keys this scheduler adds to
# SchedulerStats.num_kv_fetch_reqs_by_stage (see vllm_esp.metrics).
from vllm_esp.metrics.prometheus import STATS_PREFIX
from vllm_esp.policy import RequestInfo, make_policy
from vllm_esp.sched.planner import Candidate, StepPlan, plan_step
from vllm_esp.sched.queue import IndexedRequestQueue

logger = init_logger(f"vllm.{__name__}")  # under vLLM's handlers

_SCHEDULABLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RUNNING)


class MLFQScheduler(Scheduler):
    """vLLM ``Scheduler`` ranked by a ``vllm_esp`` policy (default: MLFQ)."""

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
        self.mlfq_config = MLFQConfig.from_additional_config(
            self.vllm_config.additional_config
        )
        self.cost_model = load_cost_model(self.mlfq_config, self.vllm_config)
        self.rank_policy = make_policy(self.mlfq_config, self.cost_model)
        self._clock = clock
        # The ranked policy owns the order; vLLM's queue only holds members.
        self.waiting = IndexedRequestQueue(self.waiting)
        self.num_rank_preemptions = 0
        self.num_paused_steps = 0
        self.last_plan: StepPlan | None = None
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
        now = self._clock()
        self.rank_policy.add_request(
            RequestInfo(
                request_id=request.request_id,
                arrival_time=now,
                num_prompt_tokens=request.num_prompt_tokens,
                num_cached_tokens=num_cached,
                max_tokens=request.max_tokens,
            ),
            now,
        )

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        # The one exit of every finished or aborted request.
        self.rank_policy.remove_request(request.request_id)
        return super()._free_request(request, delay_free_blocks=delay_free_blocks)

    # -------------------------------------------------------------- planning
    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _candidate(self, request: Request) -> Candidate:
        resident = request.status == RequestStatus.RUNNING
        num_computed = request.num_computed_tokens
        num_admission = 0
        if resident:
            num_new = (
                request.num_tokens_with_spec
                + request.num_output_placeholders
                - num_computed
            )
            num_held = self._num_blocks(num_computed)
        else:
            num_new = request.num_tokens - num_computed
            num_held = 0
            if self.scheduler_reserve_full_isl:
                # vLLM admits a newcomer only if its whole sequence fits
                # (plus the watermark); mirror that gate, else the plan
                # would give a slot to a request vLLM then refuses.
                num_admission = (
                    self._num_blocks(min(request.num_tokens, self.max_model_len))
                    + self.kv_cache_manager.watermark_blocks
                )
        threshold = self.scheduler_config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        lookahead = self.num_lookahead_tokens
        # Conservative for newcomers: a prefix-cache hit only lowers it.
        return Candidate(
            request_id=request.request_id,
            resident=resident,
            num_held_blocks=num_held,
            num_new_tokens=max(num_new, 0),
            num_blocks_for=lambda n: max(
                self._num_blocks(num_computed + n + lookahead) - num_held, 0
            ),
            num_admission_blocks=num_admission,
        )

    def _iter_candidates(self) -> Iterator[Candidate]:
        for request_id in self.rank_policy.iter_ranked():
            request = self.requests.get(request_id)
            if request is None or request.status not in _SCHEDULABLE:
                continue
            if request.status != RequestStatus.RUNNING and request in self.deferred_waiting:
                continue
            yield self._candidate(request)

    def _plan(self) -> StepPlan:
        residents = sorted(
            (r for r in self.running if r.request_id in self.rank_policy),
            key=lambda r: self.rank_policy.rank_key(r.request_id),
            reverse=True,
        )
        num_slots = min(self.max_num_running_reqs, self.max_num_active_reqs)
        num_slots -= len(self.kv_holding_waiting) + self.num_waiting_for_streaming_input
        num_free = (
            self.kv_cache_manager.block_pool.get_num_free_blocks()
            - self.mlfq_config.num_reserved_blocks
        )
        return plan_step(
            self._iter_candidates(),
            [self._candidate(r) for r in residents],
            num_free_blocks=num_free,
            num_slots=num_slots,
            token_budget=self.max_num_scheduled_tokens,
            chunked_prefill=self.scheduler_config.enable_chunked_prefill,
        )

    # -------------------------------------------------------------- schedule
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._pause_state != PauseState.UNPAUSED:
            return super().schedule(throttle_prefills)
        now = self._clock()
        plan = self._plan()
        self.last_plan = plan

        for request_id in plan.preempt:
            victim = self.requests[request_id]
            self.running.remove(victim)
            self._preempt_request(victim, now)
            self.num_rank_preemptions += 1

        run_ids = set(plan.run)
        all_running = self.running
        paused = [r for r in all_running if r.request_id not in run_ids]
        self.num_paused_steps += len(paused)
        step_running = []
        step_waiting = FCFSRequestQueue()
        for request_id in plan.run:
            request = self.requests[request_id]
            if request.status == RequestStatus.RUNNING:
                step_running.append(request)
            else:
                step_waiting.append(request)
        # Requests the policy does not rank (e.g. blocked on a KV load) keep
        # vLLM's own handling: they ride along behind the ranked ones.
        for request in self.waiting:
            if request.request_id not in self.rank_policy:
                step_waiting.append(request)

        full_waiting = self.waiting
        self.running = step_running
        self.waiting = step_waiting
        try:
            output = super().schedule(throttle_prefills)
        finally:
            left_waiting = list(self.waiting)
            self.waiting = full_waiting
            # Newcomers vLLM admitted are running now: drop them from the
            # full queue (remove_requests ignores ids it does not hold).
            full_waiting.remove_requests(
                r for r in step_running_now(plan, self.requests)
            )
            # vLLM may still preempt under memory pressure; those land in
            # the step queue and must survive the swap back.
            for request in left_waiting:
                if request not in full_waiting and not request.is_finished():
                    full_waiting.prepend_request(request)
            self.running = self.running + paused

        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            self.rank_policy.on_scheduled(
                request_id, num_tokens, request.num_computed_tokens - num_tokens, now
            )
        self.rank_policy.end_step(self._clock())
        return output

    # ----------------------------------------------------------------- stats
    def esp_stats(self) -> dict[str, int]:
        """Counters and gauges exported through vLLM's stats path."""
        stats = self.rank_policy.stats()
        out = {
            f"{STATS_PREFIX}queue_level_{level}": n
            for level, n in enumerate(stats.num_requests_per_level)
        }
        out[f"{STATS_PREFIX}demotions_total"] = stats.num_demotions
        out[f"{STATS_PREFIX}promotions_total"] = stats.num_promotions
        out[f"{STATS_PREFIX}rank_preemptions_total"] = self.num_rank_preemptions
        out[f"{STATS_PREFIX}paused_reqs"] = len(self.last_plan.pause) if self.last_plan else 0
        return out

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            stats.num_kv_fetch_reqs_by_stage.update(self.esp_stats())
        return stats

    def check_invariants(self) -> None:
        """Cross-check the policy, vLLM's queues and the block pool."""
        self.rank_policy.check_invariants()
        unfinished = {r for r, req in self.requests.items() if not req.is_finished()}
        tracked = {r for r in unfinished if r in self.rank_policy}
        assert tracked == unfinished, f"untracked requests: {unfinished - tracked}"
        running = {r.request_id for r in self.running}
        waiting = {r.request_id for r in self.waiting}
        assert not running & waiting, f"both running and waiting: {running & waiting}"
        assert len(self.running) == len(running), "duplicate in running"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request.request_id


def step_running_now(plan: StepPlan, requests: dict[str, Request]) -> Iterator[Request]:
    """Members of ``plan.run`` that are running after the step."""
    for request_id in plan.run:
        request = requests.get(request_id)
        if request is not None and request.status == RequestStatus.RUNNING:
            yield request


class MLFQAsyncScheduler(MLFQScheduler, AsyncScheduler):
    """``MLFQScheduler`` over vLLM's ``AsyncScheduler`` (GPU overlap kept)."""
