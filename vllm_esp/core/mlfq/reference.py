"""Single-queue reference policies: FCFS and the SRPT oracle.

``srpt`` knows each request's true output length (``RequestInfo.max_tokens``
with ``ignore_eos``), so it is a lower bound for benchmarks only: a server
cannot know output lengths. Remaining work is in the same standalone
seconds as MLFQ's service, so the two are directly comparable.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.policy import RankingPolicy, RequestInfo

if TYPE_CHECKING:
    from vllm_esp.core.mlfq.config import MLFQConfig


class FCFSPolicy(RankingPolicy):
    """Arrival order, like vLLM's default ``fcfs`` queue."""

    name = "fcfs"

    @classmethod
    def from_settings(cls, settings: MLFQConfig, cost_model: StepCostModel) -> FCFSPolicy:
        return cls()

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, str]] = []
        self._keys: dict[str, tuple[float, int, str]] = {}
        self._seq = 0

    def add_request(self, info: RequestInfo, now: float) -> None:
        key = (info.arrival_time, self._seq, info.request_id)
        self._seq += 1
        self._keys[info.request_id] = key
        bisect.insort(self._queue, key)

    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        key = self._keys.pop(request_id, None)
        if key is not None:
            del self._queue[bisect.bisect_left(self._queue, key)]

    def on_scheduled(
        self, request_id: str, num_new_tokens: int, num_computed_tokens: int, now: float
    ) -> None:
        return None

    def iter_ranked(self) -> Iterator[str]:
        return map(itemgetter(2), self._queue)

    def iter_ranked_reversed(self) -> Iterator[str]:
        return map(itemgetter(2), reversed(self._queue))

    def rank_key(self, request_id: str) -> tuple:
        return self._keys[request_id]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def check_invariants(self) -> None:
        assert self._queue == sorted(self._keys.values())


@dataclass
class _SRPTState:
    arrival_time: float
    seq: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int = 0


class SRPTOraclePolicy(RankingPolicy):
    """Shortest remaining processing time, with the true output length."""

    name = "srpt"

    @classmethod
    def from_settings(cls, settings: MLFQConfig, cost_model: StepCostModel) -> SRPTOraclePolicy:
        return cls(cost_model=cost_model)

    def __init__(self, *, cost_model: StepCostModel) -> None:
        self.cost_model = cost_model
        self._states: dict[str, _SRPTState] = {}
        self._order: list[str] | None = None
        self._seq = 0

    def add_request(self, info: RequestInfo, now: float) -> None:
        if info.max_tokens is None:
            raise ValueError(
                "the SRPT oracle needs the true output length: set max_tokens "
                "(and ignore_eos=True) on every request"
            )
        self._states[info.request_id] = _SRPTState(
            info.arrival_time,
            self._seq,
            info.num_prompt_tokens,
            info.max_tokens,
            info.num_cached_tokens,
        )
        self._seq += 1
        self._order = None

    def remove_request(self, request_id: str, num_output_tokens: int | None = None) -> None:
        if self._states.pop(request_id, None) is not None:
            self._order = None

    def on_scheduled(
        self, request_id: str, num_new_tokens: int, num_computed_tokens: int, now: float
    ) -> None:
        state = self._states.get(request_id)
        if state is not None and num_new_tokens > 0:
            state.num_computed_tokens = num_computed_tokens + num_new_tokens
            self._order = None

    def remaining_s(self, request_id: str) -> float:
        s = self._states[request_id]
        total = s.num_prompt_tokens + s.num_output_tokens
        # Tokens still to compute: rest of the prompt (one chunk) plus one
        # decode step per output token not yet produced.
        num_prompt_left = max(s.num_prompt_tokens - s.num_computed_tokens, 0)
        num_decode_left = max(total - max(s.num_computed_tokens, s.num_prompt_tokens) - 1, 0)
        context = max(s.num_computed_tokens, s.num_prompt_tokens)
        return self.cost_model.chunk_time(num_prompt_left, s.num_computed_tokens) + (
            num_decode_left * self.cost_model.decode_time(context + num_decode_left // 2)
        )

    def rank_key(self, request_id: str) -> tuple:
        return (self.remaining_s(request_id), self._states[request_id].seq)

    def iter_ranked(self) -> Iterator[str]:
        if self._order is None:
            self._order = [
                rid
                for _, _, rid in heapq.nsmallest(
                    len(self._states),
                    ((self.remaining_s(rid), s.seq, rid) for rid, s in self._states.items()),
                )
            ]
        return iter(self._order)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)
