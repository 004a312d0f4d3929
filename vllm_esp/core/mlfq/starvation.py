"""The starvation clock of the MLFQ and Gittins policies, torch-free.

A request not served for ``threshold_s`` is *starved* (the policies then
promote it). Serving a request is one attribute store on the policy's own
per-request state, ``state.served_at = now``, in the policies' charge
loop, which runs once per scheduled request per step; finding the starved
requests reads a heap of times that may be stale (never later than the
true last service) and refreshes an entry only when it comes due::

    heap entry (t, seq, id), t <= served_at of id
    t <= now - threshold_s:  served_at too  -> starved, clock restarts at now
                             else           -> pushed back at served_at

So every starved request is found (its entry's time is at most its last
service), and a request served all along is pushed back at most once per
``threshold_s``. An entry whose ``seq`` is not the request's current one
belongs to a removed request (or to an earlier request of the same id)
and is dropped when it comes due.
"""

from __future__ import annotations

import heapq
from typing import Protocol


class Served(Protocol):
    """A policy's per-request state: when the request was last served (or
    arrived). The charge loops write it."""

    served_at: float


class StarvationClock:
    """When each tracked request was last served; which ones have starved.
    A ``threshold_s`` of 0 turns promotion off (nothing is ever starved)."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._tracked: dict[str, Served] = {}
        self._seq: dict[str, int] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._next_seq = 0

    def add(self, request_id: str, state: Served, since: float) -> None:
        """Track a request whose clock starts at ``since`` (its arrival);
        ``state.served_at`` is its clock from now on."""
        state.served_at = since
        self._tracked[request_id] = state
        if self.threshold_s <= 0:
            return
        seq = self._next_seq
        self._next_seq += 1
        self._seq[request_id] = seq
        heapq.heappush(self._heap, (since, seq, request_id))

    def remove(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self._seq.pop(request_id, None)

    def pop_starved(self, now: float) -> list[str]:
        """The requests not served since ``now - threshold_s``; each one's
        clock restarts at ``now``, so it is not reported again before it
        has waited another ``threshold_s``."""
        if self.threshold_s <= 0:
            return []
        deadline = now - self.threshold_s
        heap, tracked, current_seq = self._heap, self._tracked, self._seq
        starved: list[str] = []
        while heap and heap[0][0] <= deadline:
            _, seq, request_id = heapq.heappop(heap)
            if current_seq.get(request_id) != seq:
                continue  # removed since
            state = tracked[request_id]
            last = state.served_at
            if last <= deadline:
                starved.append(request_id)
                state.served_at = last = now
            heapq.heappush(heap, (last, seq, request_id))
        return starved

    def __len__(self) -> int:
        return len(self._tracked)

    def tracked_ids(self) -> set[str]:
        return set(self._tracked)

    def check_invariants(self) -> None:
        if self.threshold_s <= 0:
            return
        assert set(self._seq) == set(self._tracked), "clock ids out of sync"
        live = [
            (t, request_id) for t, seq, request_id in self._heap if self._seq.get(request_id) == seq
        ]
        assert len(live) == len(self._seq), "a tracked request without exactly one heap entry"
        assert {request_id for _, request_id in live} == set(self._seq), "an entry missing"
        for t, request_id in live:
            served_at = self._tracked[request_id].served_at
            assert t <= served_at, f"{request_id}: entry after its service"
