"""Whether preempting a request pays: the exchange argument on plain numbers.

A newcomer ``n`` wants the place (memory or a resident's room) of a
resident victim ``v``. Serving ``n`` first and ``v`` after, instead of the
other way round, changes the pair's total response time by::

    n first:  R_n + (R_n + c_v + R_v)        v first:  R_v + (R_v + R_n)
    n first is better  <=>  R_n + c_v < R_v

``R`` is the expected remaining service (standalone seconds: the prefill
still to do plus the expected remaining output tokens at one decode step
each), ``c_v`` what preempting ``v`` costs it (recomputing its KV, or
moving it to host and back). So a victim is preempted only if it is
expected to need more than the newcomer by at least its preemption cost.
Two requests can never preempt each other in turn on the same estimates
(``R_v > R_n + c_v`` and ``R_n > R_v + c_n`` cannot both hold for
``c >= 0``): the rule cannot livelock on recompute.

The expected remaining output comes from ``OutputLengthModel``: the
lengths of finished requests (a memoryless prior until enough finish) and
their mean residual life. Under the memoryless prior every request expects
the same remaining output, so preemption never pays: the rule is
conservative until the data says otherwise.
"""

from __future__ import annotations

import math

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.gittins import (
    MIN_LENGTHS_TO_LEARN,
    LengthDistribution,
    gittins_table,
    length_grid,
    mean_residual_table,
    refit_due,
    segment_sums,
)

__all__ = ["OutputLengthModel", "expected_remaining_s", "worth_preempting"]


def worth_preempting(victim_remaining_s: float, victim_cost_s: float, remaining_s: float) -> bool:
    """Preempting the victim for a request expected to need ``remaining_s``
    more lowers the pair's total response time (module docstring)."""
    return victim_remaining_s > remaining_s + victim_cost_s


class OutputLengthModel:
    """Output lengths learned from finished requests: the output a request
    that has produced some tokens is still expected to produce, and its
    Gittins index (what ``demote_by_value`` compares).

    Unlike ``GittinsPolicy`` it does not count requests in flight as
    survivors: MLFQ's demotion is a one-way step behind every newcomer,
    and the survivors of the first seconds (the requests still running
    when the short ones finish) make it demote more of ShareGPT's long
    replies (1.05-1.12x FCFS's mean JCT on ShareGPT at 0.8-0.95 of
    capacity against 1.02-1.03x without, SIMULATED on the serve suite's
    engine)."""

    def __init__(
        self,
        max_len: int = 8192,
        prior_weight: float = 8.0,
        refit_every: int = 16,
        min_lengths_to_learn: int = MIN_LENGTHS_TO_LEARN,
    ):
        self._dist = LengthDistribution(
            length_grid(max_len), prior_weight=prior_weight, min_samples=min_lengths_to_learn
        )
        self.refit_every = refit_every
        self._num_since_fit = 0
        self._residual: list[float] = []
        self._gittins: list[float] = []
        #: Refits so far: a caller caching anything read from the tables
        #: knows it is stale when this moves.
        self.num_fits = 0
        self.refit()

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self._dist.grid)

    @property
    def num_samples(self) -> int:
        return self._dist.num_samples

    def observe(self, num_output_tokens: int) -> None:
        """Learn a finished request's output length (used from the next
        ``maybe_refit``, so one step decides on one snapshot)."""
        self._dist.observe(num_output_tokens)
        self._num_since_fit += 1

    def maybe_refit(self) -> None:
        """Rebuild the tables when enough lengths arrived (``refit_due``)."""
        if refit_due(self._num_since_fit, self._dist.num_samples, self.refit_every):
            self.refit()

    def refit(self) -> None:
        survival = self._dist.survival()
        sums = segment_sums(self._dist.grid, survival)
        self._residual = mean_residual_table(survival, sums)
        self._gittins = gittins_table(survival, sums, self._dist.horizon())
        self._num_since_fit = 0
        self.num_fits += 1

    def expected_remaining_tokens(self, num_output_tokens: int = 0) -> float:
        """Mean residual output length after ``num_output_tokens`` tokens."""
        return self._residual[self._dist.grid_index(num_output_tokens)]

    def grid_index(self, num_output_tokens: int) -> int:
        """The grid point every table reads for ``num_output_tokens``."""
        return self._dist.grid_index(num_output_tokens)

    def lengths_with_index_below(self, bar: float) -> list[float]:
        """Per grid point ``k``, the first grid length at or after ``g_k``
        whose Gittins index is below ``bar`` (infinity if none): a request
        that has produced ``n`` tokens, ``grid_index(n) == k``, has an index
        below ``bar`` once it has produced that many, until the next refit.
        """
        grid, table = self._dist.grid, self._gittins
        out = [math.inf] * len(grid)
        first = math.inf
        for k in range(len(grid) - 1, -1, -1):
            if table[k] < bar:
                first = grid[k]
            out[k] = first
        return out

    def gittins_index(self, num_output_tokens: int = 0) -> float:
        """Gittins index after ``num_output_tokens`` tokens (no prefill
        left; ``vllm_esp.core.mlfq.gittins``): larger finishes sooner per
        unit of service."""
        return self._gittins[self._dist.grid_index(num_output_tokens)]


def expected_remaining_s(
    cost_model: StepCostModel,
    lengths: OutputLengthModel,
    *,
    num_tokens: int,
    num_computed_tokens: int,
    num_output_tokens: int,
) -> float:
    """A request's expected remaining service in standalone seconds: the
    tokens it still has to compute before it samples again (its prompt, or
    a recompute after preemption) plus the expected remaining output at
    one decode step each.

    ``num_tokens`` counts prompt and output tokens so far; the last one is
    computed by the next step, which samples the next output token.
    """
    num_prefill_left = num_tokens - num_computed_tokens - 1
    prefill_s = (
        cost_model.chunk_time(num_prefill_left, num_computed_tokens) if num_prefill_left > 0 else 0
    )
    num_decode = lengths.expected_remaining_tokens(num_output_tokens)
    return prefill_s + num_decode * cost_model.decode_time(num_tokens)
