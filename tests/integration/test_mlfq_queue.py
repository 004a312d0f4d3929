"""``IndexedRequestQueue`` against a plain list model of vLLM's queue
contract: random adds, prepends, pops and removals keep the same order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.harness.scheduler import make_request
from vllm_esp.integration.mlfq.queue import IndexedRequestQueue

REQUESTS = [make_request(f"r{i}", 4, 1) for i in range(8)]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 7)),
        st.tuples(st.just("prepend"), st.lists(st.integers(0, 7), unique=True, max_size=3)),
        st.tuples(st.just("remove"), st.lists(st.integers(0, 7), unique=True, max_size=3)),
        st.tuples(st.just("pop"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_indexed_queue_keeps_the_order_of_a_list(ops) -> None:
    queue = IndexedRequestQueue()
    model: list = []
    for op, arg in ops:
        if op == "add":
            request = REQUESTS[arg]
            if request not in model:  # a queued request keeps its place
                model.append(request)
            queue.add_request(request)
        elif op == "prepend":
            chosen = [REQUESTS[i] for i in arg]
            model = chosen + [r for r in model if r not in chosen]
            queue.prepend_requests(chosen)
        elif op == "remove":
            chosen = [REQUESTS[i] for i in arg]
            model = [r for r in model if r not in chosen]
            queue.remove_requests(chosen)
        elif model:
            assert queue.peek_request() is model[0]
            assert queue.pop_request() is model.pop(0)
        assert list(queue) == model
        assert len(queue) == len(model) and bool(queue) == bool(model)
        assert all((r in queue) == (r in model) for r in REQUESTS)
