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
* The distribution is learned online from finished requests (never from
  ``max_tokens``: that would be clairvoyant in ``ignore_eos`` traces), one
  histogram per prompt-length bucket, or per predicted-length bucket for
  requests that carry an output-length predictor's guess
  (``RequestInfo.predicted_output_tokens``), falling back to all requests
  while a bucket has few samples; a memoryless prior (equal indices:
  arrival order, as stock vLLM) fills in until enough have finished. The
  prediction only picks the histogram: what the bucket's requests really
  produced sets the index, so a biased or uninformative predictor costs
  slower learning, not a wrong order. Tables are rebuilt every
  ``refit_every`` finishes, then every request is re-keyed.
* A request not served for ``starvation_threshold_s`` is promoted above
  every index until it has been served ``promotion_quantum_s`` of
  standalone time (promoted requests in promotion order): a bound on
  waiting that the index alone does not give.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.policy import PolicyStats, RankingPolicy, RequestInfo

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
    for j in range(i + 1, len(survival)):
        spent += sums[j - 1]
        if spent > 0.0:
            best = max(best, (f_i - survival[j]) / spent)
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


def gittins_table(survival: Sequence[float], sums: Sequence[float]) -> list[float]:
    """``G`` at every grid point (no prefill left), O(n^2) in the grid size."""
    return [gittins_index(i, survival, sums) for i in range(len(survival))]


class LengthDistribution:
    """Output lengths on a grid: counts of finished requests plus a prior."""

    def __init__(self, grid: Sequence[int], prior_weight: float, prior_mean: float = 256.0) -> None:
        self.grid = tuple(grid)
        self.prior_weight = prior_weight
        # counts[k]: finished requests whose length falls in (g_{k-1}, g_k].
        self.counts = [0] * len(self.grid)
        self.num_samples = 0
        # Memoryless prior (geometric lengths, mean ``prior_mean``): a
        # constant hazard makes every index equal, so with no data the
        # order is arrival order, stock vLLM's.
        q = 1.0 / max(prior_mean, 1.0)
        self._prior_survival = [(1.0 - q) ** g for g in self.grid]

    def observe(self, length: int) -> None:
        k = bisect.bisect_left(self.grid, max(1, min(length, self.grid[-1])))
        self.counts[k] += 1
        self.num_samples += 1

    def survival(self) -> list[float]:
        """``F`` at the grid points, samples and prior blended by weight."""
        n, w = self.num_samples, self.prior_weight
        longer = n
        out = []
        for k, prior in enumerate(self._prior_survival):
            longer -= self.counts[k]  # samples with length > g_k
            out.append((longer + w * prior) / (n + w) if n + w > 0 else prior)
        return out


@dataclass
class _GittinsState:
    bucket: int
    num_prompt_tokens: int
    #: Prompt tokens still to compute (known at arrival, prefix cache aware).
    num_prefill_tokens_left: int
    num_output_tokens: int = 0
    key: tuple[float, float, int, str] = (0.0, 0.0, 0, "")
    #: Standalone seconds served since promotion (None: not promoted).
    promoted_served_s: float | None = None


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
        promotion_quantum_s: float = 1.0,
        grid: Sequence[int] | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.grid = tuple(grid) if grid is not None else length_grid(max_len)
        self.min_bucket_samples = min_bucket_samples
        self.refit_every = refit_every
        self.starvation_threshold_s = starvation_threshold_s
        self.promotion_quantum_s = promotion_quantum_s
        self._dists = [LengthDistribution(self.grid, prior_weight) for _ in range(_NUM_DISTS)]
        self._survival: list[list[float]] = []
        self._sums: list[list[float]] = []
        self._tables: list[list[float]] = []
        self._states: dict[str, _GittinsState] = {}
        self._order: list[tuple[float, float, int, str]] = []
        self._idle_since: OrderedDict[str, float] = OrderedDict()
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
            self._tables.append(gittins_table(survival, sums))
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
        i = bisect.bisect_right(self.grid, state.num_output_tokens) - 1
        if state.num_prefill_tokens_left <= 0:
            return self._tables[b][i]
        done = state.num_prompt_tokens - state.num_prefill_tokens_left
        prefill_s = self.cost_model.chunk_time(state.num_prefill_tokens_left, done)
        step_s = self.cost_model.decode_time(state.num_prompt_tokens)
        return gittins_index(i, self._survival[b], self._sums[b], prefill_s / step_s)

    # ------------------------------------------------------------ ordering
    def _key(self, request_id: str, state: _GittinsState) -> tuple[float, float, int, str]:
        seq = state.key[2]
        if state.promoted_served_s is not None:
            # Promoted: above every index, in promotion order (key[1] holds
            # the promotion time once promoted).
            return (0.0, state.key[1], seq, request_id)
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
        self._idle_since[info.request_id] = min(info.arrival_time, now)

    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        state = self._states.pop(request_id, None)
        if state is None:
            return
        del self._order[bisect.bisect_left(self._order, state.key)]
        self._idle_since.pop(request_id, None)
        self._charged.discard(request_id)
        if num_output_tokens is not None:
            self._observe(state.bucket, num_output_tokens)

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
        if state.promoted_served_s is not None:
            state.promoted_served_s += self.cost_model.chunk_time(
                num_new_tokens, num_computed_tokens
            )
        self._charged.add(request_id)
        self._idle_since[request_id] = now
        self._idle_since.move_to_end(request_id)

    def end_step(self, now: float) -> None:
        if self._finished_since_fit >= self.refit_every:
            self._refit()
            self._resort_all()
        else:
            for request_id in self._charged:
                state = self._states[request_id]
                if (
                    state.promoted_served_s is not None
                    and state.promoted_served_s >= self.promotion_quantum_s
                ):
                    state.promoted_served_s = None
                self._rekey(request_id, state)
        self._charged.clear()
        self._promote_starved(now)

    def _resort_all(self) -> None:
        for request_id, state in self._states.items():
            if (
                state.promoted_served_s is not None
                and state.promoted_served_s >= self.promotion_quantum_s
            ):
                state.promoted_served_s = None
            state.key = self._key(request_id, state)
        self._order = sorted(s.key for s in self._states.values())

    def _promote_starved(self, now: float) -> None:
        if self.starvation_threshold_s <= 0:
            return
        deadline = now - self.starvation_threshold_s
        while self._idle_since:
            request_id, since = next(iter(self._idle_since.items()))
            if since > deadline:
                break
            state = self._states[request_id]
            if state.promoted_served_s is None:
                state.promoted_served_s = 0.0
                del self._order[bisect.bisect_left(self._order, state.key)]
                state.key = (0.0, now, state.key[2], request_id)
                bisect.insort(self._order, state.key)
                self.num_promotions += 1
            self._idle_since.move_to_end(request_id)
            self._idle_since[request_id] = now

    # ------------------------------------------------------------ ranking
    def iter_ranked(self) -> Iterator[str]:
        return map(itemgetter(3), self._order)

    def iter_ranked_reversed(self) -> Iterator[str]:
        return map(itemgetter(3), reversed(self._order))

    def rank_key(self, request_id: str) -> tuple:
        return self._states[request_id].key

    def is_starved(self, request_id: str) -> bool:
        return self._states[request_id].promoted_served_s is not None

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def stats(self) -> PolicyStats:
        return PolicyStats(num_requests_per_level=[len(self)], num_promotions=self.num_promotions)

    def check_invariants(self) -> None:
        assert self._order == sorted(s.key for s in self._states.values()), "order out of sync"
        assert set(self._idle_since) == set(self._states), "starvation clock out of sync"
