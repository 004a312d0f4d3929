"""Step 1 of ``MLFQScheduler.schedule()``: the plan.

``PlanningMixin`` describes vLLM's requests to the planner
(``vllm_esp.core.mlfq.admission``) as plain-data ``Candidate``s, in the
policy's rank order, together with this step's slots, free blocks and swap
limits, and returns the planner's ``AdmissionPlan``::

    policy.iter_ranked() ──> _candidate(request) ──┐
                               (lazily, best first)  ├─> plan_admission ─> AdmissionPlan
    running + prefetched ──> _victim(request) ─────┘
                               (sorted only when memory must be reclaimed)

Most steps cannot run out of blocks (``vllm_esp.core.mlfq.slot_plan``):
without host swap those are planned by ``plan_by_slots`` from three numbers
per request (``_iter_slot_entries``), the same plan for a third of the cost.
"""

from __future__ import annotations

from collections.abc import Iterator

from vllm.v1.request import Request, RequestStatus

from vllm_esp.core.mlfq.admission import AdmissionPlan, Candidate, plan_admission
from vllm_esp.core.mlfq.budget import CANDIDATE_TAIL
from vllm_esp.core.mlfq.slot_plan import SlotEntry, plan_by_slots
from vllm_esp.core.mlfq.value import expected_remaining_s
from vllm_esp.integration.mlfq.swap_support import HostSwapMixin

_SCHEDULABLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RUNNING)


class PlanningMixin(HostSwapMixin):
    """The planner's inputs and the plan of one step: helpers only, no vLLM
    method is overridden here."""

    #: Waiting requests the plan skips this step (set by the scheduler).
    held_back: frozenset[str]

    def _plan(self) -> AdmissionPlan:
        plan = self._plan_by_slots()
        return plan if plan is not None else self._plan_admission()

    def _plan_by_slots(self) -> AdmissionPlan | None:
        """The plan when memory cannot bind and host swap is off, else None."""
        if self.swap is not None:
            return None
        return plan_by_slots(
            self._iter_slot_entries(),
            num_free_blocks=self._num_free_blocks(),
            num_slots=self._num_slots(),
            token_budget=self.max_num_scheduled_tokens,
            chunked_prefill=self.scheduler_config.enable_chunked_prefill,
            block_size=self.block_size,
            num_lookahead_tokens=self.num_lookahead_tokens,
            resident_ids=(r.request_id for r in self.running),
            num_resident_room=self._num_resident_room(len(self.running)),
        )

    def _plan_admission(self) -> AdmissionPlan:
        # Every running request is ranked (add_request ranks all of them);
        # the per-step cost here is O(residents), so no filtering copy.
        residents = self.running
        if self.swap is not None:
            residents = residents + self._prefetched_residents()
        limits = self._swap_limits()
        return plan_admission(
            self._iter_candidates(),
            # Read from the bottom only when memory must be reclaimed or the
            # reserve restored, and only as far as needed: building every
            # resident as a victim each step is what would make the planner
            # slow with thousands of residents.
            lambda: self._victims_low_to_high(residents),
            num_resident_blocks_bound=lambda: self._num_resident_blocks_bound(residents),
            # Iterated only if the plan's pause list is asked for.
            resident_ids=(r.request_id for r in residents),
            num_free_blocks=self._num_free_blocks(),
            num_slots=self._num_slots(),
            token_budget=self.max_num_scheduled_tokens,
            chunked_prefill=self.scheduler_config.enable_chunked_prefill,
            num_reserve_blocks=limits.num_reserve_blocks,
            num_host_free_blocks=limits.num_host_free_blocks,
            num_prefetch=limits.num_prefetch,
            prefetch_window=limits.prefetch_window,
            preempt_by_value=self.mlfq_config.preempt_by_value,
            num_resident_room=self._num_resident_room(len(residents)),
        )

    def _num_resident_room(self, num_residents: int) -> int | None:
        """Newcomers that may still hold KV before the paused bound binds
        (None: no bound)."""
        max_paused = self.mlfq_config.max_paused_requests
        if max_paused is None:
            return None
        return self.max_num_running_reqs + max_paused - num_residents

    def _num_slots(self) -> int:
        num_slots = min(self.max_num_running_reqs, self.max_num_active_reqs)
        # vLLM admits kv_holding_waiting first; our prefetches there only
        # run when planned, so only the others take a slot for sure.
        num_slots -= sum(1 for r in self.kv_holding_waiting if not self._swap_managed(r))
        return num_slots - self.num_waiting_for_streaming_input

    def _num_free_blocks(self) -> int:
        return (
            self.kv_cache_manager.block_pool.get_num_free_blocks()
            - self.mlfq_config.num_reserved_blocks
        )

    def _iter_slot_entries(self) -> Iterator[SlotEntry]:
        """``_iter_candidates`` as ``plan_by_slots`` reads it (no host
        swap): the same requests, skipped alike, with the same tokens."""
        get_request = self.requests.get
        running = RequestStatus.RUNNING
        threshold = self.scheduler_config.long_prefill_token_threshold
        held_back = self.held_back
        for request_id in self.rank_policy.iter_ranked():
            request = get_request(request_id)
            if request is None:
                continue
            status = request.status
            if status is not running and status not in _SCHEDULABLE:
                continue
            if request.num_stale_output_tokens and not request.drop_stale_output:
                continue  # as in _iter_candidates
            num_computed = request.num_computed_tokens
            num_admission = 0
            if status is running:
                resident = True
                num_new = (
                    request.num_tokens_with_spec + request.num_output_placeholders - num_computed
                )
            elif request_id in held_back:
                continue
            else:
                resident = False
                num_new = request.num_tokens - num_computed
                num_admission = self._num_admission_blocks(request)
            if 0 < threshold < num_new:
                num_new = threshold
            yield (request_id, resident, num_new if num_new > 0 else 0, num_computed, num_admission)

    def _iter_candidates(self) -> Iterator[Candidate]:
        # The hot loop of a plan (one pass per ranked request until the
        # step is full): the common case, a running request without host
        # swap, is built inline from hoisted locals; every other case goes
        # through _candidate. Both build the same Candidate.
        get_request = self.requests.get
        new_candidate = tuple.__new__
        running = RequestStatus.RUNNING
        inline_residents = self.swap is None
        block_size = self.block_size
        num_lookahead = self.num_lookahead_tokens
        threshold = self.scheduler_config.long_prefill_token_threshold
        held_back = self.held_back
        for request_id in self.rank_policy.iter_ranked():
            request = get_request(request_id)
            if request is None:
                continue
            status = request.status
            if status is not running and status not in _SCHEDULABLE:
                continue
            if request.num_stale_output_tokens and not request.drop_stale_output:
                # vLLM skips it until its in-flight output is back (async
                # scheduling). Test the condition itself, not membership of
                # deferred_waiting: vLLM clears that only on admission, so a
                # request skipped once would never be planned again.
                continue
            if not (inline_residents and status is running):
                if status is not running and request_id in held_back:
                    continue
                yield self._candidate(request)
                continue
            num_computed = request.num_computed_tokens
            num_new = request.num_tokens_with_spec + request.num_output_placeholders - num_computed
            if 0 < threshold < num_new:
                num_new = threshold
            num_allocated = -(-num_computed // block_size)
            # In field order: request_id, resident, num_new_tokens,
            # block_size, num_computed_tokens, num_allocated_blocks,
            # num_held_blocks, num_lookahead_tokens (CANDIDATE_TAIL says why).
            head = (
                request_id,
                True,
                num_new if num_new > 0 else 0,
                block_size,
                num_computed,
                num_allocated,
                num_allocated,
                num_lookahead,
            )
            # Concatenation, not unpacking: twice as fast here.
            yield new_candidate(Candidate, head + CANDIDATE_TAIL)

    def _victims_low_to_high(self, residents: list[Request]) -> Iterator[Candidate]:
        """The ranked residents as victims, lowest rank first, built lazily
        from the bottom of the policy's order."""
        is_resident = set(residents).__contains__  # Requests hash by identity
        get_request = self.requests.get
        for request_id in self.rank_policy.iter_ranked_reversed():
            request = get_request(request_id)
            if request is not None and is_resident(request):
                yield self._victim(request)

    def _num_resident_blocks_bound(self, residents: list[Request]) -> int:
        """At least the blocks eviction could free from all residents: the
        length of each one's block table (vLLM's live table, as the ESP
        scheduler reads it; the guard test pins it), without the
        exclusivity test per block that a victim's exact count costs."""
        tables = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks
        return sum(len(tables.get(r.request_id, ())) for r in residents)

    # ------------------------------------------------------------ candidates
    def _candidate(self, request: Request) -> Candidate:
        if request.status == RequestStatus.RUNNING:
            return self._resident_candidate(request, prefetched=False)
        if self._is_prefetched(request):
            return self._resident_candidate(request, prefetched=True)
        return self._waiting_candidate(request)

    def _victim(self, request: Request) -> Candidate:
        """``_candidate`` as an eviction victim, with what evicting it costs:
        with prefix caching, evicting it frees only its exclusive blocks
        (its growth is still counted against all of its computed blocks)."""
        cand = self._candidate(request)
        num_held = cand.num_held_blocks
        if request.status == RequestStatus.RUNNING and self.cache_config.enable_prefix_caching:
            num_held = self._num_exclusive_blocks(request)
        return cand._replace(
            num_held_blocks=num_held,
            remaining_s=self._remaining_s(request),
            preempt_cost_s=self._preempt_cost_s(request, cand),
        )

    def _remaining_s(self, request: Request) -> float:
        """Expected remaining service (``vllm_esp.core.mlfq.value``)."""
        return expected_remaining_s(
            self.cost_model,
            self.output_lengths,
            num_tokens=request.num_tokens,
            num_computed_tokens=request.num_computed_tokens,
            num_output_tokens=request.num_output_tokens,
        )

    def _preempt_cost_s(self, request: Request, cand: Candidate) -> float:
        """What evicting a resident costs it: the host round trip of its
        blocks if the host takes them, else recomputing its KV."""
        if self.swap is not None and cand.num_offload_host_blocks <= self._num_host_free_blocks():
            return self._swap_round_trip_s(cand.num_offload_host_blocks)
        return self.cost_model.prefill_time(request.num_computed_tokens)

    def _resident_candidate(self, request: Request, *, prefetched: bool) -> Candidate:
        """A running request, or a loaded prefetch (whose block table holds
        its whole swapped sequence and whose host copy is kept)."""
        num_computed = request.num_computed_tokens
        num_new = request.num_tokens_with_spec + request.num_output_placeholders - num_computed
        num_offload_host = 0
        if prefetched:
            num_allocated = len(self.kv_cache_manager.get_block_ids(request.request_id)[0])
        else:
            num_allocated = self._num_blocks(num_computed)
            num_offload_host = self._num_offload_host_blocks(request, num_allocated)
        return Candidate(
            request_id=request.request_id,
            resident=True,
            num_new_tokens=self._capped_new_tokens(num_new),
            num_computed_tokens=num_computed,
            num_allocated_blocks=num_allocated,
            num_held_blocks=num_allocated,
            block_size=self.block_size,
            num_lookahead_tokens=self.num_lookahead_tokens,
            num_offload_host_blocks=num_offload_host,
        )

    def _waiting_candidate(self, request: Request) -> Candidate:
        """A waiting request: it holds no blocks. A swapped one needs blocks
        for its whole sequence but computes only the tail (usually one
        token). Conservative: a prefix-cache hit only lowers its need."""
        num_computed, num_prefetch = self._swapped_resume(request)
        return Candidate(
            request_id=request.request_id,
            resident=False,
            num_new_tokens=self._capped_new_tokens(request.num_tokens - num_computed),
            num_computed_tokens=num_computed,
            block_size=self.block_size,
            num_lookahead_tokens=self.num_lookahead_tokens,
            num_admission_blocks=self._num_admission_blocks(request),
            num_prefetch_blocks=num_prefetch,
            remaining_s=self._remaining_s(request),
            starved=self.rank_policy.is_starved(request.request_id),
        )

    def _num_admission_blocks(self, request: Request) -> int:
        """vLLM admits a newcomer only if its whole sequence fits (plus the
        watermark); the plan mirrors that gate, else it would give a slot
        to a request vLLM then refuses."""
        if not self.scheduler_reserve_full_isl:
            return 0
        return (
            self._num_blocks(min(request.num_tokens, self.max_model_len))
            + self.kv_cache_manager.watermark_blocks
        )

    def _capped_new_tokens(self, num_new_tokens: int) -> int:
        threshold = self.scheduler_config.long_prefill_token_threshold
        if 0 < threshold < num_new_tokens:
            num_new_tokens = threshold
        return max(num_new_tokens, 0)

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_exclusive_blocks(self, request: Request) -> int:
        """Blocks that evicting ``request`` would actually free: with prefix
        caching, a block shared with another request (ref_cnt > 1) stays
        allocated. Only computed for eviction candidates (lazily)."""
        blocks = self.kv_cache_manager.get_blocks(request.request_id).blocks
        return sum(1 for b in blocks[0] if b.ref_cnt == 1) if blocks else 0
