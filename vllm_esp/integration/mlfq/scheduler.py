"""vLLM V1 scheduler with skip-join MLFQ ranking and preemption by rank.

``MLFQScheduler`` subclasses vLLM's ``Scheduler`` and keeps its ~900-line
``schedule()`` body: each step it asks the policy (``vllm_esp.core.mlfq``) for
an order, lets the planner (``vllm_esp.core.mlfq.admission``) pick the step's
members, and then runs vLLM's own ``schedule()`` over exactly those
members, in rank order::

    schedule()
      1. plan       policy.iter_ranked() -> planner -> AdmissionPlan
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

With host KV swap (scheduler ``mlfq-swap``: vLLM builds our
``HostSwapConnector`` as ``self.connector``), a preempted request keeps its
KV on the host instead of recomputing it, and the plan gains two actions
(see ``vllm_esp/core/mlfq/admission.py``): *offload* (paused residents to host,
to keep a free-block reserve) and *prefetch* (swapped requests loaded back
through vLLM's async-load path before they run). A prefetched request
waits in ``kv_holding_waiting`` holding its blocks, like a paused
resident; evicting it just frees those blocks (its host copy is kept).

On GPU, vLLM enables async scheduling by default, which a plain
``Scheduler`` subclass would silently run without its overlap;
``MLFQScheduler(...)`` therefore constructs ``MLFQAsyncScheduler`` (the
same logic over ``AsyncScheduler``) whenever async scheduling is on.
"""

from __future__ import annotations

import dataclasses
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

from vllm_esp.core.mlfq import RequestInfo, make_policy
from vllm_esp.core.mlfq.admission import AdmissionPlan, Candidate, plan_admission
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.swap.book import SwapState
from vllm_esp.core.swap.config import SwapConfig
from vllm_esp.integration.cost_model import load_cost_model

# STATS_PREFIX: the keys this scheduler adds to
# SchedulerStats.num_kv_fetch_reqs_by_stage (see vllm_esp.integration.metrics).
from vllm_esp.integration.metrics import STATS_PREFIX
from vllm_esp.integration.mlfq.queue import IndexedRequestQueue
from vllm_esp.integration.swap.connector import HostSwapConnector

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
        self.last_plan: AdmissionPlan | None = None
        # Recompute accounting: the most tokens each request ever had
        # computed (updated when scheduled, so it holds under async
        # scheduling too); scheduling a position below it again is
        # recompute. Rejected speculative tokens would count as well.
        self._computed_high_water: dict[str, int] = {}
        self.num_recomputed_tokens = 0
        # Host KV swap: on when vLLM built our connector (scheduler mlfq-swap).
        self.swap: HostSwapConnector | None = (
            self.connector if isinstance(self.connector, HostSwapConnector) else None
        )
        self.num_offloads = 0
        self.swap_reserve_blocks = 0
        self.swap_prefetch_depth = 0
        if self.swap is not None:
            swap_config = SwapConfig.from_additional_config(self.vllm_config.additional_config)
            self.swap_reserve_blocks = swap_config.resolved_reserve(self.max_num_running_reqs)
            self.swap_prefetch_depth = swap_config.prefetch_depth
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
        self._computed_high_water.pop(request.request_id, None)
        return super()._free_request(request, delay_free_blocks=delay_free_blocks)

    def _preempt_request(
        self, request: Request, timestamp: float, drop_stale_output: bool = False
    ) -> None:
        # Read the victim's blocks before vLLM frees them: the worker copies
        # them to host in handle_preemptions, before they can be reused.
        # drop_stale_output=True is reset_prefix_cache(), whose point is to
        # discard KV (e.g. new weights): recompute then.
        if self.swap is not None and not drop_stale_output and request.num_computed_tokens > 0:
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
            self.swap.on_preempt(request, block_ids, request.num_computed_tokens)
        super()._preempt_request(request, timestamp, drop_stale_output=drop_stale_output)

    def _evict(self, request: Request, now: float) -> None:
        """Free a resident's device blocks (to host if swap is on)."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._preempt_request(request, now)
        else:
            self._unprefetch(request)

    def _unprefetch(self, request: Request) -> None:
        """Give back the device blocks of a loaded prefetch; its host copy
        is still valid, so it waits as a swapped request again (no copy)."""
        assert self.swap is not None and self.swap.state(request.request_id) is SwapState.PREFETCHED
        self.kv_holding_waiting.remove_request(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        self._inflight_prefills.discard(request)
        self.waiting.prepend_request(request)
        self.swap.unprefetch(request.request_id)

    def _promote_loaded_prefetches(self) -> None:
        """Finish vLLM's async-load bookkeeping for landed prefetches now,
        so the planner sees them as residents (vLLM would do it only when
        it next walks ``kv_holding_waiting``, which the plan narrows)."""
        assert self.swap is not None
        for request in list(self.kv_holding_waiting):
            if (
                request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
                and request.request_id in self.finished_recving_kv_req_ids
                and self.swap.state(request.request_id) is SwapState.PREFETCHED
            ):
                self._handle_blocked_waiting_request(request)  # -> PREEMPTED, KV cached
                self.deferred_waiting.discard(request)

    def _is_prefetched(self, request: Request) -> bool:
        return (
            self.swap is not None
            and request.status == RequestStatus.PREEMPTED
            and self.swap.state(request.request_id) is SwapState.PREFETCHED
        )

    def _swap_managed(self, request: Request) -> bool:
        return self.swap is not None and self.swap.state(request.request_id) is not None

    # -------------------------------------------------------------- planning
    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_exclusive_blocks(self, request: Request) -> int:
        """Blocks that evicting ``request`` would actually free: with prefix
        caching, a block shared with another request (ref_cnt > 1) stays
        allocated. Only computed for eviction candidates (lazily)."""
        blocks = self.kv_cache_manager.get_blocks(request.request_id).blocks
        return sum(1 for b in blocks[0] if b.ref_cnt == 1) if blocks else 0

    def _victim(self, request: Request) -> Candidate:
        cand = self._candidate(request)
        if request.status != RequestStatus.RUNNING or not self.cache_config.enable_prefix_caching:
            return cand
        return dataclasses.replace(cand, num_held_blocks=self._num_exclusive_blocks(request))

    def _candidate(self, request: Request) -> Candidate:
        prefetched = self._is_prefetched(request)
        resident = request.status == RequestStatus.RUNNING or prefetched
        num_computed = request.num_computed_tokens
        num_admission = 0
        num_prefetch = 0
        num_offload_host = 0
        if resident:
            num_new = (
                request.num_tokens_with_spec
                + request.num_output_placeholders
                - num_computed
            )
            num_held = self._num_blocks(num_computed)
            if prefetched:
                num_held = len(self.kv_cache_manager.get_block_ids(request.request_id)[0])
            elif self.swap is not None:
                # Offloading copies the computed blocks out; a request that
                # cannot read them back is never offloaded.
                num_offload_host = (
                    self._num_blocks(num_computed)
                    if not request.skip_reading_prefix_cache
                    else self.swap.num_host_blocks + 1
                )
        else:
            # A swapped request resumes after its swapped tokens: blocks for
            # the whole sequence, compute for the tail (usually one token).
            swapped = self.swap.swapped_tokens(request.request_id) if self.swap else 0
            num_computed = max(num_computed, min(swapped, request.num_tokens - 1))
            num_new = request.num_tokens - num_computed
            num_held = 0
            if swapped and not request.skip_reading_prefix_cache:
                num_prefetch = self._num_blocks(num_computed)
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
            num_prefetch_blocks=num_prefetch,
            num_offload_host_blocks=num_offload_host,
        )

    def _iter_candidates(self) -> Iterator[Candidate]:
        for request_id in self.rank_policy.iter_ranked():
            request = self.requests.get(request_id)
            if request is None or request.status not in _SCHEDULABLE:
                continue
            if request.num_stale_output_tokens and not request.drop_stale_output:
                # vLLM skips it until its in-flight output is back (async
                # scheduling). Test the condition itself, not membership of
                # deferred_waiting: vLLM clears that only on admission, so a
                # request skipped once would never be planned again.
                continue
            yield self._candidate(request)

    def _plan(self) -> AdmissionPlan:
        # Every running request is ranked (add_request ranks all of them);
        # the per-step cost here is O(residents), so no filtering copy.
        residents = self.running
        if self.swap is not None:
            residents = residents + [
                r for r in self.kv_holding_waiting
                if self._is_prefetched(r) and r.request_id in self.rank_policy
            ]

        def residents_low_to_high() -> list[Candidate]:
            # Only built when memory must be reclaimed or the reserve
            # restored: sorting every resident each step is what made the
            # planner slow with thousands of requests in the system.
            policy = self.rank_policy
            ordered = sorted((r for r in residents if r.request_id in policy),
                             key=lambda r: policy.rank_key(r.request_id), reverse=True)
            return [self._victim(r) for r in ordered]

        num_slots = min(self.max_num_running_reqs, self.max_num_active_reqs)
        # vLLM admits kv_holding_waiting first; our prefetches there only
        # run when planned, so only the others take a slot for sure.
        num_slots -= sum(1 for r in self.kv_holding_waiting if not self._swap_managed(r))
        num_slots -= self.num_waiting_for_streaming_input
        num_free = (
            self.kv_cache_manager.block_pool.get_num_free_blocks()
            - self.mlfq_config.num_reserved_blocks
        )
        swap_kwargs = {}
        if self.swap is not None:
            book = self.swap.book
            in_flight = book.num_in_state(SwapState.PREFETCHING) + book.num_in_state(SwapState.PREFETCHED)
            swap_kwargs = dict(
                num_reserve_blocks=self.swap_reserve_blocks,
                num_host_free_blocks=book.pool.num_free,
                num_prefetch=max(self.swap_prefetch_depth - in_flight, 0),
                prefetch_window=self.max_num_running_reqs,  # the next batch
            )
        return plan_admission(
            self._iter_candidates(),
            residents_low_to_high,
            resident_ids=[r.request_id for r in residents],
            num_free_blocks=num_free,
            num_slots=num_slots,
            token_budget=self.max_num_scheduled_tokens,
            chunked_prefill=self.scheduler_config.enable_chunked_prefill,
            **swap_kwargs,
        )

    # -------------------------------------------------------------- schedule
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._pause_state != PauseState.UNPAUSED:
            return super().schedule(throttle_prefills)
        now = self._clock()
        if self.swap is not None:
            self._promote_loaded_prefetches()
        plan = self._plan()
        self.last_plan = plan

        for request_id in plan.preempt:
            self._evict(self.requests[request_id], now)
            self.num_rank_preemptions += 1
        for request_id in plan.offload:
            self._evict(self.requests[request_id], now)
            self.num_offloads += 1

        requests = self.requests
        paused = [requests[r] for r in plan.pause if requests[r].status == RequestStatus.RUNNING]
        self.num_paused_steps += len(paused)
        step_running = []
        step_waiting = FCFSRequestQueue()
        step_holding = FCFSRequestQueue()
        for request_id in plan.run:
            request = self.requests[request_id]
            if request.status == RequestStatus.RUNNING:
                step_running.append(request)
            elif self._is_prefetched(request):
                step_holding.append(request)
            else:
                step_waiting.append(request)
        # Requests the policy does not rank (e.g. blocked on a KV load) keep
        # vLLM's own handling: they ride along behind the ranked ones.
        riders = self._unranked_waiting()
        riders_holding = [r for r in self.kv_holding_waiting if not self._swap_managed(r)]
        prefetch = list(plan.prefetch)
        if riders or riders_holding:
            # A prefetch raises vLLM's admission limit for this call (it
            # enters WAITING_FOR_REMOTE_KVS, not RUNNING, but vLLM checks
            # the limit first); a rider could then take an unplanned slot.
            prefetch = []
        for request_id in prefetch:
            step_waiting.append(self.requests[request_id])
        for request in riders:
            step_waiting.append(request)
        for request in riders_holding:
            step_holding.append(request)

        full_waiting = self.waiting
        full_holding = self.kv_holding_waiting
        max_active = self.max_num_active_reqs
        if prefetch:
            self.swap.mark_prefetch(set(prefetch))
            self.max_num_active_reqs = max_active + len(prefetch)
        self.running = step_running
        self.waiting = step_waiting
        self.kv_holding_waiting = step_holding
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.max_num_active_reqs = max_active
            if self.swap is not None:
                self.swap.clear_prefetch_marks()
            left_waiting = list(self.waiting)
            left_holding = list(self.kv_holding_waiting)
            self.waiting = full_waiting
            self.kv_holding_waiting = full_holding
            # Requests vLLM admitted are running now: drop them from the
            # full queues (remove_requests ignores ids a queue does not hold).
            full_waiting.remove_requests(self.running)
            full_holding.remove_requests(self.running)
            # Prefetches vLLM started now hold blocks (WAITING_FOR_REMOTE_KVS):
            # they moved from the waiting to the kv-holding queue.
            for request in left_holding:
                if request not in full_holding and not request.is_finished():
                    full_waiting.remove_requests((request,))
                    full_holding.add_request(request)
            # vLLM may still preempt under memory pressure; those land in
            # the step queue and must survive the swap back.
            for request in left_waiting:
                if request not in full_waiting and not request.is_finished():
                    full_waiting.prepend_request(request)
            self.running = self.running + paused

        high_water = self._computed_high_water
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            start = request.num_computed_tokens - num_tokens  # vLLM advanced it already
            done_before = high_water.get(request_id, 0)
            if start < done_before:
                self.num_recomputed_tokens += min(done_before, start + num_tokens) - start
            high_water[request_id] = max(done_before, request.num_computed_tokens)
            self.rank_policy.on_scheduled(request_id, num_tokens, start, now)
        self.rank_policy.end_step(self._clock())
        return output

    def _unranked_waiting(self) -> list[Request]:
        """Waiting requests the policy does not rank (rare: e.g. a
        streaming session's next chunk). O(1) when there are none: every
        ranked request sits in exactly one of the three queues."""
        num_queued = (len(self.running) + len(self.waiting) + len(self.kv_holding_waiting)
                      + self.num_waiting_for_streaming_input)
        if num_queued <= len(self.rank_policy):
            return []
        return [r for r in self.waiting if r.request_id not in self.rank_policy]

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
        out[f"{STATS_PREFIX}paused_reqs"] = len(self.last_plan.pause) if self.last_plan else 0
        out[f"{STATS_PREFIX}recomputed_tokens_total"] = self.num_recomputed_tokens
        if self.swap is not None:
            out[f"{STATS_PREFIX}swap_proactive_offloads_total"] = self.num_offloads
            for key, value in self.swap.swap_stats().items():
                out[f"{STATS_PREFIX}{key}"] = value
        return out

    def make_stats(self, *args: Any, **kwargs: Any):
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
        assert not holding & (running | waiting), f"holding KV and queued twice: {holding & (running | waiting)}"
        assert len(self.running) == len(running), "duplicate in running"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request.request_id
        if self.swap is not None:
            self._check_swap_invariants(waiting, holding)

    def _check_swap_invariants(self, waiting: set[str], holding: set[str]) -> None:
        """Every host copy belongs to a request in the matching state."""
        self.swap.book.check_invariants()
        for entry in self.swap.book.entries():
            request = self.requests.get(entry.request_id)
            rid = entry.request_id
            if entry.state is SwapState.SWAPPED:
                assert request is not None and request.status == RequestStatus.PREEMPTED, rid
                assert request.num_computed_tokens == 0 and rid in waiting, rid
            elif entry.state is SwapState.PREFETCHING:
                assert request is not None, rid
                assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS or (
                    entry.finished and request.is_finished()
                ), (rid, request.status)
            else:
                assert request is not None and rid in holding, rid
                assert request.status in (
                    RequestStatus.WAITING_FOR_REMOTE_KVS, RequestStatus.PREEMPTED
                ), (rid, request.status)


class MLFQAsyncScheduler(MLFQScheduler, AsyncScheduler):
    """``MLFQScheduler`` over vLLM's ``AsyncScheduler`` (GPU overlap kept)."""
