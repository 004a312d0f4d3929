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
    """Dict-backed ``RequestQueue``; ``prepend`` puts requests first.

    Prepended requests go to their own dict, kept in reverse, so that
    vLLM's preemption (one ``prepend_request`` per victim) costs O(1)
    instead of rebuilding the whole queue::

        _head (reversed):  c  b  a      <- prepend(a, b), then prepend(c)
        order:             c  a  b  | then _tail in insertion order
    """

    def __init__(self, requests: Iterable[Request] = ()) -> None:
        self._head: dict[str, Request] = {}
        self._tail: dict[str, Request] = {r.request_id: r for r in requests}

    def add_request(self, request: Request) -> None:
        # A request queued already keeps its place.
        if request.request_id in self._head:
            self._head[request.request_id] = request
        else:
            self._tail[request.request_id] = request

    def pop_request(self) -> Request:
        request = self.peek_request()
        self.remove_request(request)
        return request

    def peek_request(self) -> Request:
        if self._head:
            return self._head[next(reversed(self._head))]
        if not self._tail:
            raise IndexError("peek from an empty queue")
        return next(iter(self._tail.values()))

    def prepend_request(self, request: Request) -> None:
        self.prepend_requests((request,))

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        # The last of ``requests`` goes in first: reversed, it is second.
        for request in reversed(list(requests)):
            self._tail.pop(request.request_id, None)
            self._head.pop(request.request_id, None)
            self._head[request.request_id] = request

    def remove_request(self, request: Request) -> None:
        request_id = request.request_id
        if self._head.pop(request_id, None) is None:
            del self._tail[request_id]

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            if self._head.pop(request.request_id, None) is None:
                self._tail.pop(request.request_id, None)

    def __contains__(self, request: object) -> bool:
        if not isinstance(request, Request):
            return False
        return request.request_id in self._head or request.request_id in self._tail

    def __bool__(self) -> bool:
        return bool(self._head) or bool(self._tail)

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def __iter__(self) -> Iterator[Request]:
        return iter([*reversed(self._head.values()), *self._tail.values()])
