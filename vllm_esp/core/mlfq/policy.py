"""The contract between a ranking policy and the schedulers that use it.

A policy only *ranks* requests. It never touches vLLM objects, tensors or
block tables: the vLLM scheduler wrapper (``vllm_esp.integration.mlfq``), the unit
tests and the simulator feed it plain numbers and read back an order. That
is what lets one implementation serve all three.

Life cycle of a request, as the policy sees it::

    add_request(info) ──► on_scheduled(...)* ──► remove_request(id)
                           ▲            │
                           └─ end_step(now) (demotion / promotion)

A scheduler may charge a step's whole batch through ``on_scheduled_step``
instead of one ``on_scheduled`` call per request.

``iter_ranked()`` yields request ids best first; schedulers walk it only as
far as they have batch slots, so it must be lazy and cheap to start.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_esp.core.costmodel import StepCostModel
    from vllm_esp.core.mlfq.config import MLFQConfig
    from vllm_esp.core.mlfq.value import OutputLengthModel


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about a request when it arrives.

    ``num_cached_tokens`` is the prefix-cache hit known at arrival (0 when
    unknown); ``max_tokens`` is the output cap, which only the SRPT oracle
    may read as the true output length (benchmarks set ``ignore_eos``);
    ``predicted_output_tokens`` is an output-length predictor's guess from
    the prompt (None without one), which ``gittins`` conditions on.
    """

    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    max_tokens: int | None = None
    predicted_output_tokens: int | None = None


@dataclass
class PolicyStats:
    """Counters a policy exports (plain ints; the scheduler adds its own)."""

    num_requests_per_level: list[int] = field(default_factory=list)
    num_demotions: int = 0
    num_promotions: int = 0


class RankingPolicy(abc.ABC):
    """Orders the unfinished requests of one scheduler, best first."""

    #: Registry name, e.g. ``"mlfq"``.
    name: str = ""
    #: The finished requests' output lengths, for a policy that learns
    #: them as ``OutputLengthModel`` from ``remove_request``: its scheduler
    #: reads this one rather than learn the same lengths twice.
    output_lengths: OutputLengthModel | None = None

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: MLFQConfig, cost_model: StepCostModel) -> RankingPolicy:
        """Build the policy from the scheduler's settings; each policy reads
        the settings it needs (the registry calls this, never ``__init__``)."""

    @abc.abstractmethod
    def add_request(self, info: RequestInfo, now: float) -> None:
        """Start tracking a request that just arrived."""

    @abc.abstractmethod
    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        """Forget a finished or aborted request. Unknown ids are ignored.

        ``num_output_tokens`` is the output length of a request that
        finished (None when it was aborted); policies that learn the length
        distribution observe it, the others ignore it."""

    @abc.abstractmethod
    def on_scheduled(
        self,
        request_id: str,
        num_new_tokens: int,
        num_computed_tokens: int,
        now: float,
    ) -> None:
        """Charge a request for ``num_new_tokens`` computed this step on top
        of a context of ``num_computed_tokens`` tokens."""

    def on_scheduled_step(self, charges: Iterable[tuple[str, int, int]], now: float) -> None:
        """``on_scheduled`` for every ``(request_id, num_new_tokens,
        num_computed_tokens)`` of one step; a scheduler charges its whole
        batch in one call. Override it where one loop is cheaper than a
        call per request."""
        for request_id, num_new_tokens, num_computed_tokens in charges:
            self.on_scheduled(request_id, num_new_tokens, num_computed_tokens, now)

    def end_step(self, now: float) -> None:
        """Called once per engine step after all ``on_scheduled`` calls.

        Policies apply level changes here so that one step's order is
        decided on one consistent snapshot."""

    @abc.abstractmethod
    def iter_ranked(self) -> Iterator[str]:
        """Yield tracked request ids, highest priority first."""

    def iter_ranked_reversed(self) -> Iterator[str]:
        """``iter_ranked`` lowest priority first: the planner's eviction
        order, read from the bottom only as far as a step needs victims.
        Override it where the order can be walked backwards in place."""
        return reversed(list(self.iter_ranked()))

    @abc.abstractmethod
    def __contains__(self, request_id: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def rank_key(self, request_id: str) -> tuple:
        """A sort key consistent with ``iter_ranked`` (smaller = better)."""

    def level_of(self, request_id: str) -> int:
        """The queue level of a request (0 for single-queue policies)."""
        return 0

    def is_starved(self, request_id: str) -> bool:
        """Promoted for starvation and not served since: past a bound on
        residents the planner makes room for it by rank, whatever the value
        rule says, so it cannot wait behind the bound forever."""
        return False

    def stats(self) -> PolicyStats:
        return PolicyStats(num_requests_per_level=[len(self)])

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if internal bookkeeping is inconsistent."""
