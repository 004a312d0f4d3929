"""Skip-join multi-level feedback queue (FastServe, NSDI '26), torch-free.

Levels and quanta::

    level:     0        1         2          ...   K-1
    quantum:   Q        Q*r       Q*r^2      ...   (no demotion below K-1)

* **Skip-join.** A new request joins the highest level whose quantum covers
  its estimated prefill time (prefix-cache aware), so a long prompt does not
  cascade through levels whose quantum is shorter than its first iteration.
  With ``demote_by_value`` the placement is for the prefill only: once
  prefilled, the request rejoins level 0 in its arrival place
  (``_rejoin_after_prefill``).
* **Demotion.** Service is charged per step in standalone seconds (see
  ``vllm_esp/core/costmodel.py``). When a request's service in its level
  reaches the level's quantum it moves one level down (at most one level
  per step) and its counter restarts; with ``demote_by_value`` only once
  the lengths of finished requests say a fresh request is the better bet
  (``worth_demoting``).
* **Promotion.** A request not served for ``starvation_threshold_s`` moves
  to level 0, in its arrival place, and stays there until it finishes.
  The clock starts at *arrival*, not at 0: FastServe's artifact
  initialises ``last_step_time = 0`` and so promotes every queued newcomer,
  which silently turns skip-join off. Here a request that simply has not
  started yet is never promoted before it has waited the full threshold.
* **Order inside a level**: arrival time, oldest first (ties by arrival
  sequence). A running request is never overtaken by a newer arrival of the
  same level, which keeps preemption churn low; a promoted request, never
  demoted again, waits only for older requests of level 0.

Data structures are chosen for the per-step hot path: each level is a list
kept sorted by ``(arrival_time, seq)``, so ``iter_ranked`` starts in O(1)
and the scheduler stops after a batch's worth; the starvation check reads
only the entries that came due (``starvation.py``). A charge updates
counters and compares the service with one number (``demote_at_s``); ``end_step``
looks only at the requests that made due. A declined demotion by value is
not judged again until the request's output reaches the next length at
which it could be worth it, or the lengths are refitted
(``_refit_rechecks``): the answer depends on nothing else.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.policy import PolicyStats, RankingPolicy, RequestInfo
from vllm_esp.core.mlfq.starvation import StarvationClock
from vllm_esp.core.mlfq.value import OutputLengthModel

if TYPE_CHECKING:
    from vllm_esp.core.mlfq.config import MLFQConfig

_SortKey = tuple[float, int, str]
#: ``demote_by_value`` demotes a request whose Gittins index is below this
#: fraction of a fresh request's. Under the memoryless prior every index is
#: equal up to the grid's linear interpolation of the survival curve; the
#: margin keeps that rounding from demoting anyone before lengths are seen.
_DEMOTE_BELOW = 0.95
#: A level entry's request id (its key's last field).
_request_id_of = itemgetter(2)


@dataclass(slots=True)
class _MLFQState:
    level: int
    key: _SortKey
    #: Standalone seconds of service attained in the current level.
    attained_s: float = 0.0
    #: Attained service at which the request is due for a demotion check:
    #: its level's quantum, or infinity in the bottom level and once
    #: promoted (never demoted). The charge compares against this alone.
    demote_at_s: float = math.inf
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    #: Promoted for starvation and not served since.
    starved: bool = False
    #: Promoted for starvation at some point: it stays in level 0, in its
    #: arrival place, until it finishes (never demoted again).
    promoted: bool = False
    #: Last served (or arrived): the starvation clock's (``StarvationClock``).
    served_at: float = 0.0
    #: ``demote_by_value``'s rejoin after the prefill is still to come.
    awaits_rejoin: bool = False
    #: Output length from which a declined demotion is judged again (its
    #: index is constant until the next grid point or a refit).
    recheck_output_tokens: float = 0


class MLFQPolicy(RankingPolicy):
    """Skip-join MLFQ over standalone-time service."""

    name = "mlfq"
    output_lengths: OutputLengthModel

    @classmethod
    def from_settings(cls, settings: MLFQConfig, cost_model: StepCostModel) -> MLFQPolicy:
        """Quanta from the settings; ``base_quantum_ms=None`` means the
        standalone time of ``auto_quantum_decode_steps`` decode steps at 512
        tokens of context on this machine (from the cost model)."""
        if settings.base_quantum_ms is not None:
            base_quantum_s = settings.base_quantum_ms / 1000.0
        else:
            base_quantum_s = settings.auto_quantum_decode_steps * cost_model.decode_time(512)
        return cls(
            num_levels=settings.num_levels,
            base_quantum_s=base_quantum_s,
            quantum_ratio=settings.quantum_ratio,
            cost_model=cost_model,
            skip_join=settings.skip_join,
            starvation_threshold_s=settings.starvation_threshold_s,
            demote_by_value=settings.demote_by_value,
        )

    def __init__(
        self,
        *,
        num_levels: int,
        base_quantum_s: float,
        quantum_ratio: float,
        cost_model: StepCostModel,
        skip_join: bool = True,
        starvation_threshold_s: float = 0.0,
        demote_by_value: bool = False,
        refit_every: int = 16,
    ) -> None:
        if num_levels < 1:
            raise ValueError("num_levels must be >= 1")
        if not base_quantum_s > 0:
            raise ValueError("base_quantum_s must be > 0")
        if not quantum_ratio > 1:
            raise ValueError("quantum_ratio must be > 1")
        self.num_levels = num_levels
        self.quanta_s: tuple[float, ...] = tuple(
            base_quantum_s * quantum_ratio**k for k in range(num_levels)
        )
        # Per level, the service at which a request is due for demotion
        # (none from the bottom level).
        self._demote_at_s = (*self.quanta_s[:-1], math.inf)
        self.cost_model = cost_model
        self.skip_join = skip_join
        self.starvation_threshold_s = starvation_threshold_s

        self._levels: list[list[_SortKey]] = [[] for _ in range(num_levels)]
        self._states: dict[str, _MLFQState] = {}
        self._clock = StarvationClock(starvation_threshold_s)
        # Requests the current step's charges made due for a demotion
        # check or the rejoin (the others need nothing at end_step).
        self._due: list[str] = []
        self._seq = 0
        self.num_demotions = 0
        self.num_promotions = 0
        # Demotion by value: the output lengths of finished requests, and
        # from them the tokens a request is still expected to need.
        self.demote_by_value = demote_by_value
        self.output_lengths = OutputLengthModel(refit_every=refit_every)
        self.num_demotions_declined = 0
        # Requests whose demotion was declined, and per grid point of the
        # output lengths the first length from which demotion is worth it
        # (``_refit_rechecks``; rebuilt when the lengths are refitted).
        self._declined: set[str] = set()
        self._demote_from: list[float] = []
        self._num_fits_seen = -1
        self.num_rejoins = 0

    # ------------------------------------------------------------ placement
    def join_level(self, num_prompt_tokens: int, num_cached_tokens: int = 0) -> int:
        """The skip-join level: highest level whose quantum covers the
        estimated prefill time."""
        if not self.skip_join:
            return 0
        t_prefill = self.cost_model.prefill_time(num_prompt_tokens, num_cached_tokens)
        # quanta are increasing: first level whose quantum >= t_prefill
        level = bisect.bisect_left(self.quanta_s, t_prefill)
        return min(level, self.num_levels - 1)

    def add_request(self, info: RequestInfo, now: float) -> None:
        if info.request_id in self._states:
            raise ValueError(f"request {info.request_id!r} is already tracked")
        level = self.join_level(info.num_prompt_tokens, info.num_cached_tokens)
        key = (info.arrival_time, self._seq, info.request_id)
        self._seq += 1
        state = _MLFQState(
            level=level,
            key=key,
            demote_at_s=self._demote_at_s[level],
            num_prompt_tokens=info.num_prompt_tokens,
            awaits_rejoin=self.demote_by_value,
        )
        self._states[info.request_id] = state
        bisect.insort(self._levels[level], key)
        # The starvation clock starts at arrival (never at 0).
        self._clock.add(info.request_id, state, min(info.arrival_time, now))

    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        self._remove_key(state.level, state.key)
        self._clock.remove(request_id)
        self._declined.discard(request_id)
        if num_output_tokens is not None:
            self.output_lengths.observe(num_output_tokens)

    def worth_demoting(self, request_id: str) -> bool:
        """Demotion puts a request behind newcomers; with ``demote_by_value``
        that is done only once its Gittins index (its chance of finishing
        per unit of further service, from the output lengths of finished
        requests) is clearly below a fresh request's. On lengths with an
        increasing hazard (ShareGPT's replies) a request that has run is the
        better bet and keeps its level, as under FCFS; past the short mode
        of short/long traffic it is not, and goes down as MLFQ intends.
        Until 32 requests have finished (``MIN_LENGTHS_TO_LEARN``; the
        memoryless prior, where every index is equal) nothing is demoted."""
        if not self.demote_by_value:
            return True
        lengths = self.output_lengths
        index = lengths.gittins_index(self._states[request_id].num_output_tokens)
        return index < _DEMOTE_BELOW * lengths.gittins_index(0)

    def _refit_rechecks(self) -> None:
        """After a refit, the output length from which each declined
        demotion is judged again: ``worth_demoting`` is a function of the
        grid point of a request's output length and of the tables alone,
        so until either changes a declined request need not be judged."""
        lengths = self.output_lengths
        self._num_fits_seen = lengths.num_fits
        self._demote_from = lengths.lengths_with_index_below(
            _DEMOTE_BELOW * lengths.gittins_index(0)
        )
        demote_from, grid_index = self._demote_from, lengths.grid_index
        for request_id in self._declined:
            state = self._states[request_id]
            state.recheck_output_tokens = demote_from[grid_index(state.num_output_tokens)]

    def _rejoin_after_prefill(self, request_id: str, state: _MLFQState) -> None:
        """Skip-join placed the request by its prefill; with the prefill
        done, what is left is decoding, whose index is a fresh request's
        until it has produced tokens (``worth_demoting`` judges it from
        there). So it rejoins level 0 in its arrival place, as FCFS would
        rank it: left below, a long prompt's decode is paused by every
        newcomer and its response time, the tail of ShareGPT's, triples
        (SIMULATED, ``benchmarks/sim_jct.py``)."""
        state.awaits_rejoin = False
        if state.level > 0:
            self._move(state, 0)
            self.num_rejoins += 1

    def _remove_key(self, level: int, key: _SortKey) -> None:
        queue = self._levels[level]
        index = bisect.bisect_left(queue, key)
        assert index < len(queue) and queue[index] == key, "MLFQ level out of sync"
        del queue[index]

    def _move(self, state: _MLFQState, new_level: int) -> None:
        """To ``new_level``, in its arrival place there; counter restarts."""
        self._remove_key(state.level, state.key)
        state.level = new_level
        state.attained_s = 0.0
        state.demote_at_s = math.inf if state.promoted else self._demote_at_s[new_level]
        state.recheck_output_tokens = 0
        self._declined.discard(state.key[2])
        bisect.insort(self._levels[new_level], state.key)

    # ------------------------------------------------------------- service
    def on_scheduled(
        self,
        request_id: str,
        num_new_tokens: int,
        num_computed_tokens: int,
        now: float,
    ) -> None:
        self.on_scheduled_step(((request_id, num_new_tokens, num_computed_tokens),), now)

    def on_scheduled_step(self, charges: Iterable[tuple[str, int, int]], now: float) -> None:
        # One loop with hoisted lookups: it runs once per scheduled request
        # per step, so it only updates counters and notes the few requests
        # that end_step must look at.
        self.output_lengths.maybe_refit()
        if self.output_lengths.num_fits != self._num_fits_seen:
            self._refit_rechecks()
        states = self._states
        # StepCostModel.chunk_time, inline: a call per request per step
        # was a tenth of this scheduler's overhead over stock vLLM's.
        cost = self.cost_model
        alpha_s, beta_s, gamma_s = cost.alpha_s, cost.beta_s, cost.gamma_s
        # chunk_time(1, c) = alpha + beta + gamma * (c + 1)
        decode_s = alpha_s + beta_s + gamma_s
        due = self._due.append
        for request_id, num_new_tokens, num_computed_tokens in charges:
            state = states.get(request_id)
            if state is None or num_new_tokens <= 0:
                continue
            if num_new_tokens == 1:  # a decode, most charges: fewer float ops
                attained_s = state.attained_s + decode_s + gamma_s * num_computed_tokens
                num_output = num_computed_tokens + 2 - state.num_prompt_tokens
            else:
                attained_s = state.attained_s + (
                    alpha_s
                    + beta_s * num_new_tokens
                    + gamma_s * num_new_tokens * (num_computed_tokens + (num_new_tokens + 1) / 2)
                )
                num_output = num_computed_tokens + num_new_tokens - state.num_prompt_tokens + 1
            state.attained_s = attained_s
            if num_output > 0:
                state.num_output_tokens = num_output
            if state.awaits_rejoin:
                # Demotion waits for the rejoin: a request with no output
                # yet is never worth demoting by value.
                if num_output > 0:
                    due(request_id)
            elif (
                attained_s >= state.demote_at_s
                and state.num_output_tokens >= state.recheck_output_tokens
            ):
                due(request_id)
            state.starved = False
            state.served_at = now  # its starvation clock restarts

    def end_step(self, now: float) -> None:
        # Demotion: at most one level per step, counter restarts. (The
        # lengths were refitted, if due, before this step's charges.)
        for request_id in self._due:
            state = self._states.get(request_id)
            if state is None:
                continue
            if state.awaits_rejoin and state.num_output_tokens > 0:
                self._rejoin_after_prefill(request_id, state)
            elif state.attained_s >= state.demote_at_s:
                if self.worth_demoting(request_id):
                    self._move(state, state.level + 1)
                    self.num_demotions += 1
                else:
                    self.num_demotions_declined += 1
                    state.recheck_output_tokens = self._demote_from[
                        self.output_lengths.grid_index(state.num_output_tokens)
                    ]
                    self._declined.add(request_id)
        self._due.clear()

        # Promotion. The clock restarts either way, so a starved level-0
        # request is not reported every step (it has the top priority).
        for request_id in self._clock.pop_starved(now):
            state = self._states[request_id]
            if not state.promoted:
                # Level 0 in its arrival place, for good: from now on only
                # older requests of level 0 go first, each to completion or
                # demotion, so its wait is bounded by their work. Churn would
                # not bound it: served a quantum and demoted again, promoted
                # requests share the machine round-robin, the worst order on
                # ShareGPT's replies (a 100-request burst: 1.10x FCFS's mean
                # JCT against 1.07x, SIMULATED).
                state.promoted = True
                if state.level != 0:
                    self._move(state, 0)
                state.demote_at_s = math.inf
                self.num_promotions += 1
            state.starved = True

    # ------------------------------------------------------------- ranking
    def iter_ranked(self) -> Iterator[str]:
        # C-level iteration: the planner walks this once per ranked request
        # per step.
        return chain.from_iterable(map(_request_id_of, queue) for queue in self._levels)

    def iter_ranked_reversed(self) -> Iterator[str]:
        return chain.from_iterable(
            map(_request_id_of, reversed(queue)) for queue in reversed(self._levels)
        )

    def rank_key(self, request_id: str) -> tuple:
        state = self._states[request_id]
        return (state.level, state.key)

    def level_of(self, request_id: str) -> int:
        return self._states[request_id].level

    def is_starved(self, request_id: str) -> bool:
        return self._states[request_id].starved

    def attained_s(self, request_id: str) -> float:
        return self._states[request_id].attained_s

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def stats(self) -> PolicyStats:
        return PolicyStats(
            num_requests_per_level=[len(q) for q in self._levels],
            num_demotions=self.num_demotions,
            num_promotions=self.num_promotions,
        )

    def check_invariants(self) -> None:
        seen: set[str] = set()
        for level, queue in enumerate(self._levels):
            assert queue == sorted(queue), f"level {level} is not sorted"
            for key in queue:
                request_id = key[2]
                assert request_id not in seen, f"{request_id} in two levels"
                seen.add(request_id)
                assert self._states[request_id].level == level
        assert seen == set(self._states), "levels and states disagree"
        assert self._clock.tracked_ids() == set(self._states), "starvation clock out of sync"
        self._clock.check_invariants()
        assert self._declined <= set(self._states), "declined demotion of an unknown request"
        if self._num_fits_seen == self.output_lengths.num_fits:
            # A declined request is not judged again before its recheck
            # length: until then demoting it must still not be worth it.
            for request_id in self._declined:
                state = self._states[request_id]
                if state.num_output_tokens < state.recheck_output_tokens:
                    assert not self.worth_demoting(request_id), f"{request_id} due for demotion"
