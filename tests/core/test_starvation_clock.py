"""``StarvationClock`` against a brute-force scan of every request's last
service, on random streams of arrivals, services, removals and re-used
ids; and its lazy heap keeps one live entry per request (check_invariants)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.mlfq.starvation import StarvationClock


class State:
    served_at = 0.0


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "serve", "remove", "tick"]),
        st.integers(0, 7),  # request id
        st.floats(0.0, 3.0),  # time step (tick), or how far back an arrival was
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([0.0, 0.5, 2.0]))
def test_reports_exactly_the_requests_idle_for_the_threshold(stream, threshold_s):
    clock = StarvationClock(threshold_s)
    states: dict[str, State] = {}
    last: dict[str, float] = {}  # the brute force: every request's last service
    now = 0.0
    for op, i, x in stream:
        rid = f"r{i}"
        if op == "add" and rid not in last:
            since = now - x  # arrivals may be stamped in the past
            states[rid] = State()
            clock.add(rid, states[rid], since)
            last[rid] = since
        elif op == "serve" and rid in last:
            states[rid].served_at = now
            last[rid] = now
        elif op == "remove":
            clock.remove(rid)
            last.pop(rid, None)
            states.pop(rid, None)
        elif op == "tick":
            now += x
            expected = (
                {r for r, t in last.items() if t <= now - threshold_s} if threshold_s > 0 else set()
            )
            got = clock.pop_starved(now)
            assert len(got) == len(set(got)), got
            assert set(got) == expected
            for r in got:
                last[r] = now  # its clock restarts
        clock.check_invariants()
        assert clock.tracked_ids() == set(last)


def test_a_request_served_all_along_is_never_reported():
    clock = StarvationClock(1.0)
    a = State()
    clock.add("a", a, 0.0)
    for step in range(1, 50):
        now = step * 0.1
        a.served_at = now
        assert clock.pop_starved(now) == []
    assert clock.pop_starved(4.9 + 1.0) == ["a"]
    assert clock.pop_starved(4.9 + 1.5) == []  # restarted at 5.9
    assert clock.pop_starved(5.9 + 1.0) == ["a"]


def test_a_zero_threshold_tracks_no_heap():
    clock = StarvationClock(0.0)
    clock.add("a", State(), 0.0)
    assert clock.pop_starved(100.0) == [] and clock._heap == []
