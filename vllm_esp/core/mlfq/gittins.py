"""The Gittins-index ranking policy (``--scheduler gittins``), torch-free.

MLFQ approximates least-attained-service, which is right when output
lengths have a decreasing hazard rate and wrong when it increases (then
running requests to completion, FCFS-like, is better). The Gittins index
is the optimal non-clairvoyant order for mean response time in the M/G/1
queue for *every* length distribution (Gittins; Aalto, Ayesta, Righter
2009) and near-optimal with many servers (Scully, Grosof, Harchol-Balter
2021); it turns into LAS-like or FCFS-like order by itself.

For a request that has produced ``a`` output tokens, with survival
``F(t) = P(S > t)`` of the output length ``S``::

    G(a) = max over b > a of   (F(a) - F(b)) / (F(a) * P + sum_{t=a}^{b-1} F(t))

the best ratio, over service budgets ``b``, of the probability of finishing
within the budget to the expected service spent trying. ``P`` is the
request's known prefill still to do, in decode-step equivalents (the
standalone time of its uncomputed prompt over the time of one decode
step, both from the cost model), so a long prompt waits behind short ones
as skip-join intends. Serve the largest ``G`` first; ties by arrival.

Cheap at schedule time:

* ``F`` lives on a grid: every length up to ``exact_len``, then geometric
  steps, so the index table has ~60 entries whatever the model length; a
  request's index is one lookup at the grid point at or below its
  attained tokens (only requests with prefill left compute ``G`` with
  their ``P``, once per charge).
* The distribution is learned online from finished requests and, as
  right-censored survivors, from the requests still in flight
  (``LengthDistribution``; never from ``max_tokens``: that would be
  clairvoyant in ``ignore_eos`` traces), one
  histogram per prompt-length bucket, or per predicted-length bucket for
  requests that carry an output-length predictor's guess
  (``RequestInfo.predicted_output_tokens``), falling back to all requests
  while a bucket has few samples; a memoryless prior (equal indices:
  arrival order, as stock vLLM) fills in until enough have finished, and
  past the longest length seen no index is below a fresh request's
  (``gittins_table``'s horizon: the prior's tail would rank the longest
  replies last while the first lengths are learned, 1.08x FCFS's mean
  JCT and 2.0x its p99 on ShareGPT at 0.8 of capacity, against 1.005x and
  1.11x with it, SIMULATED on the serve suite's engine). The
  prediction only picks the histogram: what the bucket's requests really
  produced sets the index, so a biased or uninformative predictor costs
  slower learning, not a wrong order. Tables are rebuilt every
  ``refit_every`` finishes (later, a sixteenth of the data: ``refit_due``),
  then every request is re-keyed.
* A request not served for ``starvation_threshold_s`` is promoted above
  every index until it finishes, promoted requests in arrival order: a
  bound on waiting that the index alone does not give (only older
  promoted requests go first). Promoted requests are not demoted back
  after a quantum: that shares the machine among them round-robin, the
  worst order on ShareGPT's replies.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.policy import PolicyStats, RankingPolicy, RequestInfo
from vllm_esp.core.mlfq.starvation import StarvationClock

if TYPE_CHECKING:
    from vllm_esp.core.mlfq.config import MLFQConfig

#: Prompt-length bucket edges (tokens): requests condition on their bucket.
PROMPT_BUCKETS: tuple[int, ...] = (64, 256, 1024)
#: Predicted-output-length bucket edges (tokens), used instead of the prompt
#: buckets when a request carries a prediction. Few buckets: each must see
#: ``min_bucket_samples`` finishes before it stops borrowing the pooled table.
PREDICTED_BUCKETS: tuple[int, ...] = (128, 256, 512)
#: Histogram indices: 0 pools every request, then the prompt buckets, then
#: the predicted-length buckets.
_FIRST_PROMPT_DIST = 1
_FIRST_PREDICTED_DIST = _FIRST_PROMPT_DIST + len(PROMPT_BUCKETS) + 1
_NUM_DISTS = _FIRST_PREDICTED_DIST + len(PREDICTED_BUCKETS) + 1
#: Indices within this ratio of each other rank equal (then by arrival): an
#: empirical table is noisy, and reordering on noise only pauses running
#: requests for newcomers that are not really better.
INDEX_BAND = 1.15


def length_grid(max_len: int, exact_len: int = 8, ratio: float = 1.25) -> tuple[int, ...]:
    """``0, 1, ..., exact_len``, then geometric steps up to ``max_len``."""
    grid = list(range(min(exact_len, max_len) + 1))
    while grid[-1] < max_len:
        grid.append(min(max_len, max(grid[-1] + 1, math.ceil(grid[-1] * ratio))))
    return tuple(grid)


def segment_sums(grid: Sequence[int], survival: Sequence[float]) -> list[float]:
    """``sum_{t=g_k}^{g_{k+1}-1} F(t)`` for each grid segment, with ``F``
    linear between grid points (exact on unit segments)."""
    sums = []
    for k in range(len(grid) - 1):
        n = grid[k + 1] - grid[k]
        f0, f1 = survival[k], survival[k + 1]
        sums.append(n * f0 - (f0 - f1) * (n - 1) / 2.0)
    return sums


def gittins_index(
    i: int, survival: Sequence[float], sums: Sequence[float], prefill: float = 0.0
) -> float:
    """``G`` at grid point ``i`` (attained service there) with ``prefill``
    decode-step equivalents of known work still to do."""
    f_i = survival[i]
    if f_i <= 0.0:
        return 0.0  # past every length seen: no evidence it ends soon
    best = 0.0
    spent = f_i * prefill
    # A refit computes this at every grid point: O(n^2), plain comparisons.
    for j in range(i + 1, len(survival)):
        spent += sums[j - 1]
        if spent > 0.0:
            index = (f_i - survival[j]) / spent
            if index > best:
                best = index
    return best


def mean_residual_table(survival: Sequence[float], sums: Sequence[float]) -> list[float]:
    """``E[S - g_i | S > g_i]`` at every grid point: the tokens a request
    that has produced ``g_i`` is still expected to need."""
    out = [0.0] * len(survival)
    tail = 0.0
    for i in range(len(survival) - 1, -1, -1):
        if i < len(sums):
            tail += sums[i]
        out[i] = tail / survival[i] if survival[i] > 0 else 0.0
    return out


def gittins_table(
    survival: Sequence[float], sums: Sequence[float], horizon: int | None = None
) -> list[float]:
    """``G`` at every grid point (no prefill left), O(n^2) in the grid size.

    From grid point ``horizon`` on (past every length the data has seen) no
    index is below a fresh request's: there the survival curve is the
    prior's guess, and a request that has outlived every observation is
    not shown to be a worse bet than a newcomer, so it is not paused for
    one (equal bands: arrival order).
    """
    table = [gittins_index(i, survival, sums) for i in range(len(survival))]
    if horizon is not None:
        for i in range(max(horizon, 1), len(table)):
            table[i] = max(table[i], table[0])
    return table


#: The policies learn from at least this many finished lengths; before,
#: the memoryless prior alone ranks (arrival order). The first requests to
#: finish are the short ones, so a fit to a handful of them ranks every
#: request that has run a little longer behind the newcomers: on the serve
#: suite's 100-request ShareGPT burst that cost 1.066x (mlfq) and 1.048x
#: (gittins) FCFS's mean JCT against 1.011x and 1.008x waiting for 32,
#: which changed no other trace of the suite by more than 0.3%; 64 cost
#: the mixed and heavy-tailed traces (mlfq 0.71x -> 0.80x and 0.63x ->
#: 0.87x fcfs's; SIMULATED on the suite's traces and engine).
MIN_LENGTHS_TO_LEARN = 32
#: Once there is data, tables are rebuilt when the lengths learned since the
#: last fit are this fraction of all of them (and ``refit_every`` at least).
REFIT_FRACTION = 1 / 16


def refit_due(num_new: int, num_samples: int, refit_every: int) -> bool:
    """Whether to rebuild tables learned from ``num_samples`` lengths, of
    which ``num_new`` arrived since the last fit: every ``refit_every`` at
    first, then once the new ones are ``REFIT_FRACTION`` of the data. The
    estimate then moves by a few percent per refit at any size, and a
    refit (which re-ranks every request) stays rare with thousands of
    finished requests."""
    return num_new >= refit_every and num_new >= REFIT_FRACTION * num_samples


class LengthDistribution:
    """Output lengths on a grid, Kaplan-Meier style: finished requests are
    observed lengths, requests still in flight are *survivors* (right-
    censored: known to be longer than what they have produced), and a
    memoryless prior fills in as ``prior_weight`` pseudo-requests.

    Survivors matter while lengths are being learned: the first requests
    to finish are the short ones, so a histogram of finished requests
    alone says every length is short. Past the last survivor and the
    longest finished length (``horizon``) only the prior speaks.
    """

    def __init__(
        self,
        grid: Sequence[int],
        prior_weight: float,
        prior_mean: float = 256.0,
        min_samples: int = 0,
    ) -> None:
        self.grid = tuple(grid)
        self.prior_weight = prior_weight
        #: Below this many finished lengths the prior alone speaks.
        self.min_samples = min_samples
        # counts[k]: finished requests whose length falls in (g_{k-1}, g_k].
        self.counts = [0] * len(self.grid)
        # survivors[k]: requests in flight known to be longer than g_k
        # (and not known to be longer than g_{k+1}).
        self.survivors = [0] * len(self.grid)
        self.num_samples = 0
        # Memoryless prior (geometric lengths, mean ``prior_mean``): a
        # constant hazard makes every index equal, so with no data the
        # order is arrival order, stock vLLM's.
        q = 1.0 / max(prior_mean, 1.0)
        self._prior_survival = [(1.0 - q) ** g for g in self.grid]

    def grid_index(self, length: int) -> int:
        """The grid point at or below ``length`` (clamped to the grid)."""
        return max(0, bisect.bisect_right(self.grid, length) - 1)

    def observe(self, length: int) -> None:
        """A finished request's output length."""
        k = bisect.bisect_left(self.grid, max(1, min(length, self.grid[-1])))
        self.counts[k] += 1
        self.num_samples += 1

    def add_survivor(self, index: int) -> None:
        """A request in flight known to be longer than ``grid[index]``."""
        self.survivors[index] += 1

    def remove_survivor(self, index: int) -> None:
        assert self.survivors[index] > 0, "no survivor at that grid point"
        self.survivors[index] -= 1

    def horizon(self) -> int | None:
        """The first grid point past every finished length and every
        survivor's bound (None: no data, or fewer than ``min_samples``)."""
        if self.num_samples < self.min_samples:
            return None
        for k in range(len(self.grid) - 1, -1, -1):
            if self.counts[k] or self.survivors[k]:
                return k
        return None

    def survival(self) -> list[float]:
        """``F`` at the grid points: the product-limit estimate over
        finished requests, survivors and the prior's pseudo-requests.
        Without survivors it is the blend ``(n_longer + w F_prior) / (n + w)``.

        ::

            F(g_k) = prod_{j=1..k} (1 - deaths_j / at_risk_j)
            deaths_j  = counts[j] + w (F_prior(g_{j-1}) - F_prior(g_j))
            at_risk_j = sum_{i>=j} (counts[i] + survivors[i]) + w F_prior(g_{j-1})
        """
        if self.num_samples < self.min_samples:
            return list(self._prior_survival)
        num = len(self.grid)
        w, prior = self.prior_weight, self._prior_survival
        at_risk_data = [0] * (num + 1)  # at_risk_data[j]: sum over i >= j
        for i in range(num - 1, -1, -1):
            at_risk_data[i] = at_risk_data[i + 1] + self.counts[i] + self.survivors[i]
        out = [1.0]
        f = 1.0
        for j in range(1, num):
            at_risk = at_risk_data[j] + w * prior[j - 1]
            if at_risk > 0:
                f *= 1.0 - (self.counts[j] + w * (prior[j - 1] - prior[j])) / at_risk
            else:  # nothing known this far out: the prior's hazard
                f *= prior[j] / prior[j - 1]
            out.append(max(f, 0.0))
        return out


@dataclass
class _GittinsState:
    bucket: int
    num_prompt_tokens: int
    #: Prompt tokens still to compute (known at arrival, prefix cache aware).
    num_prefill_tokens_left: int
    num_output_tokens: int = 0
    #: The grid point the request is a survivor at in its histograms (-1:
    #: none yet).
    survivor_index: int = -1
    key: tuple[float, float, int, str] = (0.0, 0.0, 0, "")
    #: Promoted for starvation: above every index until it finishes.
    promoted: bool = False
    #: Promoted and not served since.
    starved: bool = False
    #: Last served (or arrived): the starvation clock's (``StarvationClock``).
    served_at: float = 0.0


class GittinsPolicy(RankingPolicy):
    """Largest Gittins index first, learned online from finished requests."""

    name = "gittins"

    @classmethod
    def from_settings(cls, settings: MLFQConfig, cost_model: StepCostModel) -> GittinsPolicy:
        return cls(
            cost_model=cost_model,
            starvation_threshold_s=settings.starvation_threshold_s,
        )

    def __init__(
        self,
        *,
        cost_model: StepCostModel,
        max_len: int = 8192,
        prior_weight: float = 8.0,
        min_bucket_samples: int = 32,
        refit_every: int = 16,
        starvation_threshold_s: float = 0.0,
        grid: Sequence[int] | None = None,
        min_lengths_to_learn: int = MIN_LENGTHS_TO_LEARN,
    ) -> None:
        self.cost_model = cost_model
        self.grid = tuple(grid) if grid is not None else length_grid(max_len)
        self.min_bucket_samples = min_bucket_samples
        self.refit_every = refit_every
        self.starvation_threshold_s = starvation_threshold_s
        self._dists = [
            LengthDistribution(self.grid, prior_weight, min_samples=min_lengths_to_learn)
            for _ in range(_NUM_DISTS)
        ]
        self._survival: list[list[float]] = []
        self._sums: list[list[float]] = []
        self._tables: list[list[float]] = []
        self._states: dict[str, _GittinsState] = {}
        self._order: list[tuple[float, float, int, str]] = []
        self._clock = StarvationClock(starvation_threshold_s)
        self._charged: set[str] = set()
        self._seq = 0
        self._finished_since_fit = 0
        self.num_refits = 0
        self.num_promotions = 0
        self._refit()

    # ------------------------------------------------------------ distribution
    def _refit(self) -> None:
        self._survival, self._sums, self._tables = [], [], []
        for b, dist in enumerate(self._dists):
            if b > 0 and dist.num_samples < self.min_bucket_samples:
                # Too few samples: share the pooled tables (index 0, built first).
                self._survival.append(self._survival[0])
                self._sums.append(self._sums[0])
                self._tables.append(self._tables[0])
                continue
            survival = dist.survival()
            sums = segment_sums(self.grid, survival)
            self._survival.append(survival)
            self._sums.append(sums)
            self._tables.append(gittins_table(survival, sums, dist.horizon()))
        self._finished_since_fit = 0
        self.num_refits += 1

    def observe_length(
        self,
        num_prompt_tokens: int,
        num_output_tokens: int,
        predicted_output_tokens: int | None = None,
    ) -> None:
        """Learn from a finished request (its true output length), in the
        bucket it ranked by."""
        self._observe(self._bucket(num_prompt_tokens, predicted_output_tokens), num_output_tokens)

    def _observe(self, bucket: int, num_output_tokens: int) -> None:
        self._dists[0].observe(num_output_tokens)
        self._dists[bucket].observe(num_output_tokens)
        self._finished_since_fit += 1

    @property
    def num_observed_lengths(self) -> int:
        """Finished requests learned from so far."""
        return self._dists[0].num_samples

    @property
    def num_survivors(self) -> int:
        """Requests in flight counted as survivors (longer than produced)."""
        return sum(self._dists[0].survivors)

    @staticmethod
    def _bucket(num_prompt_tokens: int, predicted_output_tokens: int | None = None) -> int:
        """The histogram a request ranks by: its predicted-length bucket
        when it has a prediction, else its prompt-length bucket."""
        if predicted_output_tokens is not None:
            return _FIRST_PREDICTED_DIST + bisect.bisect_right(
                PREDICTED_BUCKETS, predicted_output_tokens
            )
        return _FIRST_PROMPT_DIST + bisect.bisect_right(PROMPT_BUCKETS, num_prompt_tokens)

    def bucket_of(self, request_id: str) -> int:
        """The histogram index a tracked request ranks by (0 pools all)."""
        return self._states[request_id].bucket

    def index_of(self, request_id: str) -> float:
        """The request's current Gittins index (larger = served first)."""
        state = self._states[request_id]
        b = state.bucket
        i = self._dists[0].grid_index(state.num_output_tokens)
        if state.num_prefill_tokens_left <= 0:
            return self._tables[b][i]
        done = state.num_prompt_tokens - state.num_prefill_tokens_left
        prefill_s = self.cost_model.chunk_time(state.num_prefill_tokens_left, done)
        step_s = self.cost_model.decode_time(state.num_prompt_tokens)
        return gittins_index(i, self._survival[b], self._sums[b], prefill_s / step_s)

    # ------------------------------------------------------------ ordering
    def _key(self, request_id: str, state: _GittinsState) -> tuple[float, float, int, str]:
        seq = state.key[2]
        if state.promoted:
            return (0.0, 0.0, seq, request_id)  # above every index, by arrival
        index = self.index_of(request_id)
        band = math.floor(math.log(index) / math.log(INDEX_BAND)) if index > 0 else -(10**9)
        return (1.0, float(-band), seq, request_id)

    def _rekey(self, request_id: str, state: _GittinsState) -> None:
        del self._order[bisect.bisect_left(self._order, state.key)]
        state.key = self._key(request_id, state)
        bisect.insort(self._order, state.key)

    # ------------------------------------------------------------ life cycle
    def add_request(self, info: RequestInfo, now: float) -> None:
        if info.request_id in self._states:
            raise ValueError(f"request {info.request_id!r} is already tracked")
        state = _GittinsState(
            bucket=self._bucket(info.num_prompt_tokens, info.predicted_output_tokens),
            num_prompt_tokens=info.num_prompt_tokens,
            num_prefill_tokens_left=info.num_prompt_tokens - info.num_cached_tokens,
        )
        state.key = (1.0, 0.0, self._seq, info.request_id)
        self._seq += 1
        self._states[info.request_id] = state
        state.key = self._key(info.request_id, state)
        bisect.insort(self._order, state.key)
        self._clock.add(info.request_id, state, min(info.arrival_time, now))

    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        del self._order[bisect.bisect_left(self._order, state.key)]
        self._clock.remove(request_id)
        self._charged.discard(request_id)
        self._move_survivor(state, -1)
        if num_output_tokens is not None:
            self._observe(state.bucket, num_output_tokens)

    def _move_survivor(self, state: _GittinsState, index: int) -> None:
        """Count the request in flight at grid point ``index`` (-1: not at
        all) in its histograms, from the next refit."""
        old = state.survivor_index
        if index == old:
            return
        for dist in (self._dists[0], self._dists[state.bucket]):
            if old >= 0:
                dist.remove_survivor(old)
            if index >= 0:
                dist.add_survivor(index)
        state.survivor_index = index

    def on_scheduled(
        self, request_id: str, num_new_tokens: int, num_computed_tokens: int, now: float
    ) -> None:
        state = self._states.get(request_id)
        if state is None or num_new_tokens <= 0:
            return
        end = num_computed_tokens + num_new_tokens
        state.num_prefill_tokens_left = max(0, state.num_prompt_tokens - end)
        # The step that completes the prompt samples the first output token.
        state.num_output_tokens = max(0, end - state.num_prompt_tokens + 1)
        # Not finished before this step: longer than what it had produced
        # (a bound that only grows, also while a preempted request
        # recomputes). One comparison per charge until it reaches the next
        # grid point.
        nxt = state.survivor_index + 1
        if nxt < len(self.grid) and state.num_output_tokens - 1 >= max(self.grid[nxt], 1):
            self._move_survivor(state, self._dists[0].grid_index(state.num_output_tokens - 1))
        state.starved = False
        if not state.promoted:  # a promoted request's key is fixed
            self._charged.add(request_id)
        state.served_at = now

    def end_step(self, now: float) -> None:
        if refit_due(self._finished_since_fit, self.num_observed_lengths, self.refit_every):
            self._refit()
            self._resort_all()
        else:
            for request_id in self._charged:
                self._rekey(request_id, self._states[request_id])
        self._charged.clear()
        self._promote_starved(now)

    def _resort_all(self) -> None:
        for request_id, state in self._states.items():
            state.key = self._key(request_id, state)
        self._order = sorted(s.key for s in self._states.values())

    def _promote_starved(self, now: float) -> None:
        for request_id in self._clock.pop_starved(now):
            state = self._states[request_id]
            state.starved = True
            if not state.promoted:
                state.promoted = True
                self._rekey(request_id, state)
                self.num_promotions += 1

    # ------------------------------------------------------------ ranking
    def iter_ranked(self) -> Iterator[str]:
        return map(itemgetter(3), self._order)

    def iter_ranked_reversed(self) -> Iterator[str]:
        return map(itemgetter(3), reversed(self._order))

    def rank_key(self, request_id: str) -> tuple:
        return self._states[request_id].key

    def is_starved(self, request_id: str) -> bool:
        return self._states[request_id].starved

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def stats(self) -> PolicyStats:
        return PolicyStats(num_requests_per_level=[len(self)], num_promotions=self.num_promotions)

    def check_invariants(self) -> None:
        assert self._order == sorted(s.key for s in self._states.values()), "order out of sync"
        assert self._clock.tracked_ids() == set(self._states), "starvation clock out of sync"
        self._clock.check_invariants()
        num_tracked = sum(1 for s in self._states.values() if s.survivor_index >= 0)
        assert self.num_survivors == num_tracked, "survivors out of sync"
