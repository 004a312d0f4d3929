"""An O(1) waiting queue for schedulers that rank requests themselves.

vLLM's ``FCFSRequestQueue`` is a deque: removing an aborted request is
O(n), and its order is meaningless to a scheduler that re-ranks every step.
``IndexedRequestQueue`` keeps vLLM's ``RequestQueue`` contract (so every
vLLM code path that touches ``scheduler.waiting`` keeps working) on an
insertion-ordered dict. Outside ``schedule()`` its order is only a
tie-breaker; inside, the MLFQ scheduler swaps in a short, ranked queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request


class IndexedRequestQueue(RequestQueue):
    """Dict-backed ``RequestQueue``; ``prepend`` puts requests first."""

    def __init__(self, requests: Iterable[Request] = ()) -> None:
        self._requests: dict[str, Request] = {r.request_id: r for r in requests}

    def add_request(self, request: Request) -> None:
        self._requests[request.request_id] = request

    def pop_request(self) -> Request:
        request_id = next(iter(self._requests))
        return self._requests.pop(request_id)

    def peek_request(self) -> Request:
        if not self._requests:
            raise IndexError("peek from an empty queue")
        return next(iter(self._requests.values()))

    def prepend_request(self, request: Request) -> None:
        self.prepend_requests((request,))

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        head = {r.request_id: r for r in requests}
        for request_id, request in self._requests.items():
            head.setdefault(request_id, request)
        self._requests = head

    def remove_request(self, request: Request) -> None:
        del self._requests[request.request_id]

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._requests.pop(request.request_id, None)

    def __contains__(self, request: object) -> bool:
        return isinstance(request, Request) and request.request_id in self._requests

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._requests.values()))
