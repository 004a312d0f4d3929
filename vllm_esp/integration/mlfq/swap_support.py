"""Host KV swap inside the MLFQ scheduler (scheduler ``mlfq-swap``).

``HostSwapMixin`` holds what ``MLFQScheduler`` does differently when vLLM
built our ``HostSwapConnector`` as ``self.connector``:

* a preempted request keeps its KV on the host instead of recomputing it
  (``_swap_out``, called from ``MLFQScheduler._preempt_request``, hands the
  victim's blocks to the connector);
* a *prefetched* request (a swapped one loaded back ahead of its turn)
  waits in ``kv_holding_waiting`` holding its blocks, like a paused
  resident; evicting it just frees those blocks (``_unprefetch``: its host
  copy is kept);
* the planner gets the swap limits (``SwapLimits``: reserve, host slots,
  prefetch depth) and, per candidate, where a swapped request resumes and
  what offloading a resident costs on the host.

Without the connector ``self.swap`` is None: the queries and planner
inputs here return the plain-MLFQ values, and the swap actions are never
called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.v1.request import Request, RequestStatus

from vllm_esp.core.swap.book import SwapState
from vllm_esp.core.swap.config import SwapConfig
from vllm_esp.integration.metrics import STATS_PREFIX
from vllm_esp.integration.swap.connector import HostSwapConnector, kv_block_bytes

if TYPE_CHECKING:
    # Mixed into a vLLM Scheduler, whose attributes are untyped here.
    _OnScheduler = Any
else:
    _OnScheduler = object


#: Host <-> device KV copy bandwidth assumed when weighing a preemption
#: (``benchmarks.swap`` measured 22 GB/s on the CPU machine class; on GPU
#: PCIe is of the same order). Only the value rule reads it.
HOST_COPY_BYTES_PER_S = 22e9


@dataclass(frozen=True)
class SwapLimits:
    """The host-swap keyword arguments of ``plan_admission``; all 0 (off)
    without swap."""

    num_reserve_blocks: int = 0
    num_host_free_blocks: int = 0
    num_prefetch: int = 0
    prefetch_window: int = 0


class HostSwapMixin(_OnScheduler):
    """The host-swap parts of ``MLFQScheduler``: helpers only, no vLLM
    method is overridden here (``MLFQScheduler`` lists it after vLLM's
    ``Scheduler``)."""

    swap: HostSwapConnector | None
    num_offloads: int
    swap_reserve_blocks: int
    swap_prefetch_depth: int

    def _init_swap(self) -> None:
        """Swap is on when vLLM built our connector (scheduler mlfq-swap)."""
        self.swap = self.connector if isinstance(self.connector, HostSwapConnector) else None
        self.num_offloads = 0
        self.swap_reserve_blocks = 0
        self.swap_prefetch_depth = 0
        if self.swap is not None:
            swap_config = SwapConfig.from_additional_config(self.vllm_config.additional_config)
            self.swap_reserve_blocks = swap_config.resolved_reserve(self.max_num_running_reqs)
            self.swap_prefetch_depth = swap_config.prefetch_depth

    # -------------------------------------------------------- device <-> host
    def _swap_out(self, request: Request) -> None:
        """Hand a victim's blocks to the connector before vLLM frees them:
        the worker copies them to host in handle_preemptions, before they
        can be reused."""
        if self.swap is not None and request.num_computed_tokens > 0:
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)[0]
            self.swap.on_preempt(request, block_ids, request.num_computed_tokens)

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

    def _mark_prefetches(self, request_ids: list[str]) -> None:
        """Tell the connector which admissions of this call are prefetches."""
        assert self.swap is not None
        self.swap.mark_prefetch(set(request_ids))

    def _clear_prefetch_marks(self) -> None:
        if self.swap is not None:
            self.swap.clear_prefetch_marks()

    # ------------------------------------------------------------- queries
    def _is_prefetched(self, request: Request) -> bool:
        return (
            self.swap is not None
            and request.status == RequestStatus.PREEMPTED
            and self.swap.state(request.request_id) is SwapState.PREFETCHED
        )

    def _swap_managed(self, request: Request) -> bool:
        return self.swap is not None and self.swap.state(request.request_id) is not None

    def _prefetched_residents(self) -> list[Request]:
        """Loaded prefetches the policy ranks: residents like paused ones."""
        return [
            r
            for r in self.kv_holding_waiting
            if self._is_prefetched(r) and r.request_id in self.rank_policy
        ]

    # ------------------------------------------------------ planner inputs
    def _swap_limits(self) -> SwapLimits:
        if self.swap is None:
            return SwapLimits()
        book = self.swap.book
        num_in_flight = book.num_in_state(SwapState.PREFETCHING) + book.num_in_state(
            SwapState.PREFETCHED
        )
        return SwapLimits(
            num_reserve_blocks=self.swap_reserve_blocks,
            num_host_free_blocks=book.pool.num_free,
            num_prefetch=max(self.swap_prefetch_depth - num_in_flight, 0),
            prefetch_window=self.max_num_running_reqs,  # the next batch
        )

    def _num_host_free_blocks(self) -> int:
        return self.swap.book.pool.num_free if self.swap is not None else 0

    def _swap_round_trip_s(self, num_blocks: int) -> float:
        """Seconds to copy ``num_blocks`` blocks to host and back."""
        return 2 * num_blocks * kv_block_bytes(self.kv_cache_config) / HOST_COPY_BYTES_PER_S

    def _num_offload_host_blocks(self, request: Request, num_computed_blocks: int) -> int:
        """Host slots offloading a running request takes: offloading copies
        its computed blocks out; a request that cannot read them back is
        never offloaded (it would need more than the whole pool)."""
        if self.swap is None:
            return 0
        if request.skip_reading_prefix_cache:
            return self.swap.num_host_blocks + 1
        return num_computed_blocks

    def _swapped_resume(self, request: Request) -> tuple[int, int]:
        """``(num_computed_tokens, num_prefetch_blocks)`` of a waiting
        request: a swapped one resumes after its swapped tokens (its last
        token is computed again, for its logits), and a prefetch would load
        the blocks of those tokens (0: nothing to prefetch)."""
        swapped = self.swap.swapped_tokens(request.request_id) if self.swap is not None else 0
        num_computed = max(request.num_computed_tokens, min(swapped, request.num_tokens - 1))
        if not swapped or request.skip_reading_prefix_cache:
            return num_computed, 0
        return num_computed, -(-num_computed // self.block_size)

    # ---------------------------------------------------------- stats, checks
    def _swap_stats(self) -> dict[str, int]:
        """The swap counters for ``plugin_stats`` (none without swap)."""
        if self.swap is None:
            return {}
        out = {f"{STATS_PREFIX}swap_proactive_offloads_total": self.num_offloads}
        for key, value in self.swap.swap_stats().items():
            out[f"{STATS_PREFIX}{key}"] = value
        return out

    def _check_swap_invariants(self, waiting: set[str], holding: set[str]) -> None:
        """Every host copy belongs to a request in the matching state."""
        assert self.swap is not None
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
                    RequestStatus.WAITING_FOR_REMOTE_KVS,
                    RequestStatus.PREEMPTED,
                ), (rid, request.status)
