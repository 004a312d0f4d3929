"""LoongServe's four-step scheduler (``vllm_esp.core.esp.loong``) without a simulator.

* step 1 (dispatch): the future-peak memory gate (against a brute-force
  replay), the out-of-order bound, the compute gate both ways (normal and
  "undecided" requests), the prefill-time cap with its first-request exemption;
* step 2 (allocation): consolidation only when the gain beats the migration,
  set-aside for capacity and for speed;
* step 4 (scaling): scale-down packs fullest-first into the fewest
  instances, multi-master split, scale-up when full or compute-bound;
* the policy: decode steps per decision, preemption only when nothing fits,
  ``placement_for``, and on random views: plans pass ``check_invariants``,
  make progress, and an instant executor finishes every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.cluster import (
    ClusterPlan,
    ClusterView,
    InstanceView,
    Migration,
    RunningRequest,
    WaitingRequest,
)
from vllm_esp.core.esp.cost_model import (
    DecodeCoeffs,
    ESPCostModel,
    MigrationCoeffs,
    PrefillCoeffs,
)
from vllm_esp.core.esp.loong.allocation import (
    PrefillDemand,
    Workspace,
    allocate,
    decode_groups,
)
from vllm_esp.core.esp.loong.dispatch import (
    Dispatch,
    LoongSettings,
    PeakGate,
    WaitingIndex,
    dispatch,
    estimated_waiting_time,
    future_peak_tokens,
    guessed_output_tokens,
    isolated_idle,
)
from vllm_esp.core.esp.loong.policy import LoongPolicy
from vllm_esp.core.esp.loong.scaling import pack_retain, plan_decode_group


def cost_model(
    *, decode_a_s: float = 0.01, bandwidth: float = 1e10, C_s: float = 1e-9
) -> ESPCostModel:
    return ESPCostModel(
        prefill={1: PrefillCoeffs(0.02, 1e-4, C_s)},
        decode=DecodeCoeffs(decode_a_s, 1e-4, 1e-7, 1e-4),
        migration=MigrationCoeffs(0.001, 1024.0, bandwidth),
        ring_hop_s=0.001,
    )


COST = cost_model()


def run(
    rid: str,
    kv: dict[int, int],
    *,
    out: int = 1,
    max_out: int = 100,
    arrival: float = 0.0,
    busy: bool = False,
) -> RunningRequest:
    """A decoding request holding ``kv`` (its prompt is what the outputs leave)."""
    total = sum(kv.values())
    return RunningRequest(
        rid, arrival, total - out + 1, max_out, out, tuple(sorted(kv.items())), busy
    )


def wait(rid: str, prompt: int, *, max_out: int = 100, arrival: float = 1.0) -> WaitingRequest:
    return WaitingRequest(rid, arrival, prompt, max_out)


def make_view(
    caps: list[int],
    running: Sequence[RunningRequest] = (),
    waiting: Sequence[WaitingRequest] = (),
    *,
    busy: frozenset[int] = frozenset(),
) -> ClusterView:
    used = [0] * len(caps)
    for r in running:
        for i, t in r.kv:
            used[i] += t
    instances = tuple(InstanceView(i, c, used[i], i in busy) for i, c in enumerate(caps))
    return ClusterView(0.0, instances, tuple(waiting), tuple(running))


def decodable(view: ClusterView) -> list[RunningRequest]:
    idle = set(view.idle_instances)
    return [r for r in view.running if not r.busy and set(r.kv_instances) <= idle]


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "bad",
    [
        {"max_num_ooe": -1},
        {"max_prefill_time_s": 0.0},
        {"min_comp_bound_decode_batch": 0},
        {"max_running_requests": 0},
        {"decode_steps_per_decision": 0},
        {"output_len_guess": 0.5},
    ],
)
def test_settings_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        LoongSettings(**bad)


def test_output_length_guess_hook() -> None:
    r = run("r", {0: 200}, out=100, max_out=500)
    assert guessed_output_tokens(r, LoongSettings()) == 500
    guess = LoongSettings(output_len_guess=1.1, output_guess_floor_tokens=16)
    assert guessed_output_tokens(r, guess) == 110
    assert guessed_output_tokens(wait("w", 10, max_out=500), guess) == 16
    assert guessed_output_tokens(run("s", {0: 10}, out=5, max_out=8), guess) == 8


# --------------------------------------------------------------------------- step 1
def replay_peak(items: list[tuple[int, int]]) -> int:
    """Peak of the total KV when each request grows one token a step and
    frees at its end (a request is still held at its last token)."""
    horizon = max((rem for _, rem in items), default=0)
    return (
        max(sum(now + t for now, rem in items if t <= rem) for t in range(horizon + 1))
        if items
        else 0
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 30)), max_size=12),
    st.tuples(st.integers(0, 50), st.integers(0, 30)),
    st.integers(0, 20),
)
def test_peak_gate_matches_a_replay(
    items: list[tuple[int, int]], extra: tuple[int, int], base: int
) -> None:
    assert future_peak_tokens(items) == replay_peak(items)
    gate = PeakGate(items, base_tokens=base, capacity_tokens=10**9, max_requests=100)
    assert gate.peak_with(*extra) == base + replay_peak([*items, extra])
    gate.add(*extra)
    assert gate.peak_with(0, 0) == base + replay_peak([*items, extra, (0, 0)])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 30)), max_size=10),
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 30)), min_size=1, max_size=12),
    st.integers(0, 20),
    st.integers(0, 600),
    st.integers(1, 16),
)
def test_peak_gate_admits_exactly_by_bound_or_tables(
    items: list[tuple[int, int]],
    candidates: list[tuple[int, int]],
    base: int,
    cap: int,
    max_requests: int,
) -> None:
    # Admissions decided by the cheap bound, by fresh tables or after a
    # rebuild all agree with the replayed peak; ``closed`` never hides one.
    gate = PeakGate(items, base_tokens=base, capacity_tokens=cap, max_requests=max_requests)
    held = list(items)
    for now, rem in candidates:
        fits = len(held) < max_requests and base + replay_peak([*held, (now, rem)]) <= cap
        closed = gate.closed
        assert gate.admits(now, rem) == fits
        assert not (closed and fits)
        if fits:
            gate.add(now, rem)
            held.append((now, rem))
    assert gate.peak_with(0, 0) == base + replay_peak([*held, (0, 0)])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=40), st.data())
def test_waiting_index_finds_the_next_fit(prompts: list[int], data: st.DataObject) -> None:
    index = WaitingIndex(tuple(wait(f"w{k}", p) for k, p in enumerate(prompts)))
    for _ in range(10):
        start = data.draw(st.integers(0, len(prompts)))
        limit = data.draw(st.integers(-1, 65))
        expected = next((k for k in range(start, len(prompts)) if prompts[k] <= limit), None)
        assert index.next_fit(start, limit) == (len(prompts) if expected is None else expected)


def test_memory_gate_refuses_what_would_overflow_later() -> None:
    # 400 tokens now that grow by 500; the newcomer's 150 fit now, but it
    # outlives the resident and both peak together above the capacity.
    resident = run("r", {0: 400}, max_out=501)
    newcomer = wait("w", 150, max_out=601)
    for cap, admitted in ((500, False), (1000, True)):
        view = make_view([cap, cap], [resident], [newcomer])
        assert sum(i.free_tokens for i in view.instances) >= 150
        step1 = dispatch(view, decodable(view), COST, LoongSettings(), 0)
        assert bool(step1.admitted) == admitted
    # A newcomer that ends first never meets the resident's peak.
    short = wait("s", 150, max_out=2)
    view = make_view([500, 500], [resident], [short])
    assert dispatch(view, decodable(view), COST, LoongSettings(), 0).admitted == (short,)


def test_out_of_order_admissions_are_bounded() -> None:
    resident = run("r", {0: 400}, max_out=501)
    big = wait("big", 150, max_out=601, arrival=1.0)  # refused by the memory gate
    small = wait("small", 10, max_out=2, arrival=2.0)
    view = make_view([500, 500], [resident], [big, small])
    s = LoongSettings(max_num_ooe=2)
    step1 = dispatch(view, decodable(view), COST, s, 0)
    assert step1.admitted == (small,) and step1.num_ooe == 1
    step1 = dispatch(view, decodable(view), COST, s, 1)
    assert step1.admitted == (small,) and step1.num_ooe == 2
    # At the bound the scan is strict FCFS: it stops at the refused head.
    assert dispatch(view, decodable(view), COST, s, 2).admitted == ()
    assert dispatch(view, decodable(view), COST, LoongSettings(max_num_ooe=0), 0).admitted == ()
    # In order again, the count resets.
    view = make_view([500, 500], [resident], [small])
    assert dispatch(view, decodable(view), COST, s, 2).num_ooe == 0


def test_running_request_bound() -> None:
    running = [run("a", {0: 10}), run("b", {1: 10})]
    view = make_view([1000] * 3, running, [wait("w1", 10), wait("w2", 10, arrival=2.0)])
    assert dispatch(view, running, COST, LoongSettings(max_running_requests=2), 0).admitted == ()
    step1 = dispatch(view, running, COST, LoongSettings(max_running_requests=3), 0)
    assert [w.req_id for w in step1.admitted] == ["w1"]


def test_compute_gate_normal_case_both_ways() -> None:
    # Decode KV packs into one of four instances: three are "isolated"; the
    # prompt fits them, and runs now if the slowdown against all four is
    # within the time the decodes still hold their instances.
    running = [run("d0", {0: 100}, max_out=20), run("d1", {1: 100}, max_out=20)]
    newcomer = wait("w", 2000, max_out=2)
    outcomes = set()
    for cost in (cost_model(), cost_model(decode_a_s=1e-5)):
        view = make_view([1000] * 4, running, [newcomer])
        sum_l, sum_l2 = 2000, 2000**2
        slowdown = cost.prefill_time(3, sum_l, sum_l2) - cost.prefill_time(4, sum_l, sum_l2)
        expected = slowdown <= estimated_waiting_time(view, cost, LoongSettings())
        step1 = dispatch(view, decodable(view), cost, LoongSettings(), 0)
        assert bool(step1.admitted) == expected
        outcomes.add(expected)
    assert outcomes == {True, False}


def test_compute_gate_undecided_requests_both_ways() -> None:
    # No instance can be emptied: the newcomer needs the decode instances.
    # It starts if the decodes' normalised slowdown T(all) * sum 1/out_len
    # is within its normalised gain waiting * 1/in_len.
    outcomes = set()
    for out in (1, 5000):
        running = [
            run("d0", {0: 6000}, out=out, max_out=out + 5),
            run("d1", {1: 6000}, out=out, max_out=out + 5),
        ]
        view = make_view([10000] * 2, running, [wait("w", 500, max_out=2)])
        waiting_s = estimated_waiting_time(view, COST, LoongSettings())
        t_all = COST.prefill_time(2, 500, 500**2)
        expected = t_all * (2 / out) <= waiting_s / 500
        step1 = dispatch(view, decodable(view), COST, LoongSettings(), 0)
        assert bool(step1.admitted) == expected
        outcomes.add(expected)
    assert outcomes == {True, False}


def test_refusals_after_the_last_admission_count_as_out_of_order() -> None:
    # The newcomer joins as "undecided" (it needs the decode instances); the
    # request after it fits no idle memory. Refusing it makes the decision
    # out of order whether the scan visits it or skips it by its prompt.
    running = [
        run("d0", {0: 6000}, out=5000, max_out=5005),
        run("d1", {1: 6000}, out=5000, max_out=5005),
    ]
    w, big = wait("w", 500, max_out=2), wait("big", 20000, max_out=2, arrival=2.0)
    alone = make_view([10000] * 2, running, [w])
    assert dispatch(alone, decodable(alone), COST, LoongSettings(), 0) == Dispatch((w,), 0)
    view = make_view([10000] * 2, running, [w, big])
    assert dispatch(view, decodable(view), COST, LoongSettings(), 0) == Dispatch((w,), 1)
    strict = LoongSettings(max_num_ooe=0)
    assert dispatch(view, decodable(view), COST, strict, 0) == Dispatch((w,), 0)


def test_prefill_time_cap_exempts_the_first_request() -> None:
    view = make_view([10000] * 2, [], [wait("a", 3000), wait("b", 3000, arrival=2.0)])
    assert COST.prefill_time(2, 3000, 3000**2) > 1e-3
    tight = LoongSettings(max_prefill_time_s=1e-3)
    assert [w.req_id for w in dispatch(view, [], COST, tight, 0).admitted] == ["a"]
    assert len(dispatch(view, [], COST, LoongSettings(), 0).admitted) == 2


# --------------------------------------------------------------------------- step 2
def test_consolidation_only_when_gain_beats_migration() -> None:
    running = [run("r0", {0: 300}), run("r1", {1: 100})]
    view = make_view([1000] * 3, running)
    outcomes = set()
    for bandwidth in (1e12, 1e5):
        cost = cost_model(bandwidth=bandwidth, C_s=1e-7)
        ws = Workspace.of(view, running)
        alloc = allocate(ws, [2], [800], cost)
        demand = PrefillDemand.of([800])
        pays = demand.time(cost, 1) - demand.time(cost, 2) > cost.migration_time(100)
        if pays:  # the least used instance moves into the fullest with room
            assert alloc.migrations == [Migration("r1", 1, 0, 100)]
            assert sorted(alloc.pool) == [1, 2] and ws.kv["r1"] == {0: 100}
            assert ws.used[:2] == [400, 0]
        else:
            assert alloc.migrations == [] and alloc.pool == [2]
        outcomes.add(pays)
    assert outcomes == {True, False}


def test_set_aside_for_capacity_takes_the_group_with_most_room() -> None:
    running = [run("r0", {0: 900}), run("r1", {1: 200})]
    view = make_view([1000] * 3, running)
    ws = Workspace.of(view, running)
    alloc = allocate(ws, [2], [1500], COST)
    assert alloc.migrations == []  # instance 0 has no room for instance 1's KV
    assert [g.req_ids for g in alloc.aside] == [["r1"]]
    assert [g.req_ids for g in alloc.kept] == [["r0"]]
    assert sorted(alloc.pool) == [1, 2]


def test_set_aside_for_speed_both_ways() -> None:
    outcomes = set()
    cost = cost_model(C_s=1e-7)
    for out in (1, 50000):
        r = run("r0", {0: out + 99}, out=out, max_out=out + 10)
        view = make_view([100000] * 2, [r])
        ws = Workspace.of(view, [r])
        alloc = allocate(ws, [1], [8000], cost)
        demand = PrefillDemand.of([8000])
        now, nxt = demand.time(cost, 1), demand.time(cost, 2)
        aside = (now - nxt) * demand.sum_inv >= nxt * 1 / out
        assert bool(alloc.aside) == aside and bool(alloc.kept) != aside
        outcomes.add(aside)
    assert outcomes == {True, False}


def test_decode_groups_are_connected_components() -> None:
    running = [
        run("a", {0: 5, 1: 5}),
        run("b", {1: 5}),
        run("c", {3: 5}),
        run("d", {2: 5, 3: 5}),
        run("e", {4: 5}),
    ]
    view = make_view([100] * 5, running)
    groups = decode_groups(Workspace.of(view, running), [r.req_id for r in running])
    assert [(g.instances, sorted(g.req_ids)) for g in groups] == [
        ([0, 1], ["a", "b"]),
        ([2, 3], ["c", "d"]),
        ([4], ["e"]),
    ]


# --------------------------------------------------------------------------- step 4
def test_scale_down_packs_fullest_first_into_fewest_instances() -> None:
    view = make_view([100] * 4, [])
    ws = Workspace.of(view, [])
    retains = pack_retain(ws, [150, 30], [3, 1, 0, 2])
    assert [sum(t for _, t in r) for r in retains] == [150, 30]
    assert len({i for r in retains for i, _ in r}) == 2  # ceil(180 / 100)
    # A partly used instance is filled first (it is the fullest with room).
    view = make_view([100] * 4, [run("x", {2: 60})])
    ws = Workspace.of(view, [])
    retains = pack_retain(ws, [150, 30], [0, 1, 2, 3])
    assert retains[0] == ((2, 40), (0, 100), (1, 10))
    assert retains[1] == ((1, 30),)
    assert ws.used == [100, 40, 100, 0]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 100), st.integers(0, 100)), min_size=1, max_size=6),
    st.lists(st.integers(1, 80), min_size=1, max_size=6),
)
def test_scale_down_property(insts: list[tuple[int, int]], lengths: list[int]) -> None:
    caps = [c for c, _ in insts]
    used = [min(c, u) for c, u in insts]
    ws = Workspace(list(caps), list(used), {}, {})
    room = sum(c - u for c, u in zip(caps, used))
    if sum(lengths) > room:
        with pytest.raises(ValueError):
            pack_retain(ws, lengths, range(len(caps)))
        return
    retains = pack_retain(ws, lengths, range(len(caps)))
    assert [sum(t for _, t in r) for r in retains] == lengths
    assert all(u <= c for u, c in zip(ws.used, caps))
    order = sorted((i for i in range(len(caps)) if caps[i] > used[i]), key=lambda i: -used[i])
    touched = [i for i in order if ws.used[i] > used[i]]
    assert touched == order[: len(touched)]  # a prefix of the fullest-first order
    assert all(ws.used[i] == caps[i] for i in touched[:-1])  # all but the last are full


def loong_masters(sizes: int, free: list[int], spares: int, bound: int) -> list[int]:
    """LoongServe's mini-batch cut (brief 1.5), written out for the test."""
    counts = []
    remaining = sizes
    insts = list(free)
    idx = 0
    while idx < len(insts) and remaining > 0:
        num_left = len(insts) - idx
        while remaining // num_left > bound and spares > 0:
            insts.append(10**9)
            spares -= 1
            num_left += 1
        mini = min(remaining, insts[idx], max(remaining // num_left, bound))
        counts.append(mini)
        remaining -= mini
        idx += 1
    return counts


@pytest.mark.parametrize("num_spares", [0, 1, 2, 5])
def test_multi_master_split_and_compute_scale_up(num_spares: int) -> None:
    running = [run(f"r{k:03d}", {0: 10}, arrival=k) for k in range(300)]
    caps = [100000] * (1 + num_spares)
    view = make_view(caps, running)
    ws = Workspace.of(view, running)
    ids = [r.req_id for r in running]
    spares = list(range(1, 1 + num_spares))
    plan = plan_decode_group(ws, ids, [0], spares, num_steps=1, min_comp_bound=128)
    assert plan.batch is not None and plan.unplaced == ()
    masters = [d.master for d in plan.batch.decodes]
    counts = [masters.count(i) for i in dict.fromkeys(masters)]
    assert counts == loong_masters(300, [ws.capacity[0]], num_spares, 128)
    # Contiguous slices: the master changes monotonically along the batch.
    assert masters == sorted(masters)
    assert set(plan.added) == set(masters) - {0}
    assert set(plan.batch.instances) == set(masters) | {0}


def test_scale_up_when_the_home_instance_is_full() -> None:
    # The home instance is full: the group's other instance masters both.
    running = [run("a", {0: 100}), run("b", {0: 50, 1: 10})]
    view = make_view([150, 100, 100], running)
    ws = Workspace.of(view, running)
    plan = plan_decode_group(ws, ["a", "b"], [0, 1], [], num_steps=1, min_comp_bound=128)
    assert plan.batch is not None
    assert {d.req_id: d.master for d in plan.batch.decodes} == {"a": 1, "b": 1}
    assert plan.batch.instances == (0, 1)
    # A lone full instance grows onto a spare, without moving KV.
    running = [run("a", {0: 100})]
    view = make_view([100, 100], running)
    ws = Workspace.of(view, running)
    plan = plan_decode_group(ws, ["a"], [0], [1], num_steps=10, min_comp_bound=128)
    assert plan.batch is not None and plan.added == (1,)
    assert plan.batch.decodes[0].master == 1 and plan.batch.instances == (0, 1)
    assert plan.batch.num_steps == 10
    # No spare: nothing fits.
    ws = Workspace.of(view, running)
    plan = plan_decode_group(ws, ["a"], [0], [], num_steps=1, min_comp_bound=128)
    assert plan.batch is None and plan.unplaced == ("a",)


def test_decode_falls_back_to_one_step_when_steps_do_not_fit() -> None:
    running = [run("a", {0: 95}), run("b", {0: 1})]
    view = make_view([100], running)
    ws = Workspace.of(view, running)
    plan = plan_decode_group(ws, ["a", "b"], [0], [], num_steps=10, min_comp_bound=128)
    assert plan.batch is not None and plan.batch.num_steps == 1
    assert len(plan.batch.decodes) == 2 and ws.used[0] == 98


# --------------------------------------------------------------------------- policy
def test_decode_steps_per_decision_and_placements() -> None:
    running = [run("d", {0: 50}, max_out=40)]
    policy = LoongPolicy(3, COST, LoongSettings(decode_steps_per_decision=7))
    view = make_view([1000] * 3, running)
    plan = policy.schedule(view)
    plan.check_invariants(view)
    assert [b.num_steps for b in plan.batches] == [7]
    assert policy.placement_for("d") == (plan.batches[0].instances, (0,))
    # Admitting a prefill: decodes run one step, the prefill keeps its KV.
    view = make_view([1000] * 3, running, [wait("w", 1200, max_out=5)])
    plan = policy.schedule(view)
    plan.check_invariants(view)
    decodes = [b for b in plan.batches if b.decodes]
    prefills = [b for b in plan.batches if b.prefills]
    assert [b.num_steps for b in decodes] == [1] and prefills
    placement = policy.placement_for("w")
    assert placement is not None
    compute, storage = placement
    item = prefills[0].prefills[0]
    assert compute == prefills[0].instances and storage == tuple(i for i, _ in item.retain)
    assert len(storage) == 2  # 1200 tokens on two instances of 1000
    assert policy.placement_for("nobody") is None


def test_preempts_the_latest_arrival_only_when_nothing_fits() -> None:
    running = [run("old", {0: 60}, arrival=0.0), run("new", {0: 40}, arrival=5.0)]
    view = make_view([100], running)
    plan = LoongPolicy(1, COST).schedule(view)
    plan.check_invariants(view)
    assert plan.preempt == ("new",)
    assert [d.req_id for b in plan.batches for d in b.decodes] == ["old"]
    # A busy instance will free memory: wait instead of preempting.
    busy_view = make_view([100, 100], running, busy=frozenset({1}))
    plan = LoongPolicy(2, COST).schedule(busy_view)
    assert plan == ClusterPlan()


# --------------------------------------------------------------------------- properties
@st.composite
def views(draw: st.DrawFn) -> ClusterView:
    n = draw(st.integers(1, 6))
    caps = [draw(st.integers(20, 300)) for _ in range(n)]
    busy = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    used = [0] * n
    running = []
    for k in range(draw(st.integers(0, 8))):
        insts = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True))
        kv = {}
        for i in sorted(insts):
            if caps[i] > used[i]:
                kv[i] = draw(st.integers(1, min(caps[i] - used[i], 120)))
                used[i] += kv[i]
        if not kv:
            continue
        out = draw(st.integers(1, sum(kv.values())))
        is_busy = all(busy[i] for i in kv) and draw(st.booleans())
        arrival = draw(st.floats(0, 10))
        max_out = out + draw(st.integers(1, 40))
        running.append(run(f"r{k}", kv, out=out, max_out=max_out, arrival=arrival, busy=is_busy))
    for i in range(n):  # reservations of batches in flight
        if busy[i] and used[i] < caps[i]:
            used[i] += draw(st.integers(0, caps[i] - used[i]))
    total = sum(caps)
    waiting = []
    for k in range(draw(st.integers(0, 6))):
        prompt = draw(st.integers(1, total))
        max_out = draw(st.integers(1, max(1, min(40, total - prompt + 1))))
        waiting.append(wait(f"w{k}", prompt, max_out=max_out, arrival=10.0 + k))
    instances = tuple(InstanceView(i, caps[i], used[i], busy[i]) for i in range(n))
    return ClusterView(20.0, instances, tuple(waiting), tuple(running))


@settings(max_examples=200, deadline=None)
@given(views(), st.integers(0, 4), st.integers(1, 10))
def test_plans_are_valid_and_make_progress(view: ClusterView, num_ooe: int, steps: int) -> None:
    s = LoongSettings(decode_steps_per_decision=steps, min_comp_bound_decode_batch=2)
    policy = LoongPolicy(view.num_instances, COST, s)
    policy.num_ooe = num_ooe
    plan = policy.schedule(view)
    plan.check_invariants(view)
    idle = set(view.idle_instances)
    idle_free = sum(i.free_tokens for i in view.instances if not i.busy)
    can_decode = any(not r.busy and set(r.kv_instances) <= idle for r in view.running)
    if not any(i.busy for i in view.instances) and (view.running or view.waiting):
        assert plan.batches
    if can_decode and idle_free > 0:
        assert plan.batches
    if any(i.busy for i in view.instances):
        assert not plan.preempt


def plain_dispatch(
    view: ClusterView, cost: ESPCostModel, s: LoongSettings, num_ooe: int
) -> Dispatch:
    """LoongServe's scan as written: every waiting request in turn, the
    memory gate by replaying the peak (the reference for :func:`dispatch`)."""
    idle = [inst for inst in view.instances if not inst.busy]
    if not view.waiting or not idle or len(view.running) >= s.max_running_requests:
        return Dispatch((), num_ooe)
    items, held = [], 0
    for r in view.running:
        left = max(0, guessed_output_tokens(r, s) - r.num_output_tokens)
        held += r.num_computed_tokens
        if r.is_decoding:
            items.append((r.num_computed_tokens, left))
        else:
            items.append((r.num_prompt_tokens, max(0, left - 1)))
    base = max(0, sum(inst.used_tokens for inst in view.instances) - held)
    capacity = sum(inst.capacity_tokens for inst in view.instances)
    run_items, all_items = list(items), list(items)

    def fits(gate: list[tuple[int, int]], now: int, rem: int) -> bool:
        peak = base + replay_peak([*gate, (now, rem)])
        return len(gate) < s.max_running_requests and peak <= capacity

    idle_free = sum(inst.free_tokens for inst in idle)
    n_iso, iso_tokens = isolated_idle(
        [i.capacity_tokens for i in idle], sum(i.used_tokens for i in idle)
    )
    waiting_s = estimated_waiting_time(view, cost, s)
    dec = [r for r in decodable(view) if r.is_decoding and r.num_remaining_output_tokens > 0]
    inv_decode = sum(1.0 / max(1, r.num_output_tokens) for r in dec)
    run: list[WaitingRequest] = []
    und: list[WaitingRequest] = []
    num_ok, und_open, is_ooe, before, need_break = 0, True, False, 0, False
    allow = num_ooe < s.max_num_ooe

    def sums(reqs: list[WaitingRequest]) -> tuple[int, int, float]:
        lengths = [w.num_prompt_tokens for w in reqs]
        return sum(lengths), sum(n * n for n in lengths), sum(1.0 / n for n in lengths)

    for w in view.waiting:
        now = w.num_prompt_tokens
        rem = max(0, guessed_output_tokens(w, s) - w.num_output_tokens - 1)
        l_run, l2_run, _ = sums([*run, w])
        if fits(run_items, now, rem) and l_run <= idle_free:
            if (not und or allow) and l_run <= iso_tokens:
                t_now = cost.prefill_time(n_iso, l_run, l2_run)
                slowdown = t_now - cost.prefill_time(len(idle), l_run, l2_run)
                if slowdown <= waiting_s and (not run or t_now <= s.max_prefill_time_s):
                    need_break = need_break or t_now > s.max_prefill_time_s
                    if und and not is_ooe:
                        before, is_ooe = len(run), True
                    run.append(w)
                    run_items.append((now, rem))
                    all_items.append((now, rem))
                    continue
            if und_open and fits(all_items, now, rem) and l_run + sums(und)[0] <= idle_free:
                und.append(w)
                all_items.append((now, rem))
                l_all, l2_all, _ = sums(run + und)
                t_all = cost.prefill_time(len(idle), l_all, l2_all)
                within = t_all <= s.max_prefill_time_s
                single = len(run) + len(und) == 1
                if t_all * inv_decode <= waiting_s * sums(und)[2] and (single or within):
                    need_break = need_break or not within
                    num_ok = len(und)
                continue
            und_open = False
        if allow and not need_break:
            if not is_ooe:
                before, is_ooe = len(run), True
            continue
        break
    admitted = tuple(run + und[:num_ok])
    if not admitted:
        return Dispatch((), num_ooe)
    return Dispatch(admitted, num_ooe + 1 if is_ooe and before < len(admitted) else 0)


@settings(max_examples=300, deadline=None)
@given(
    views(),
    st.integers(0, 4),
    st.integers(0, 3),
    st.integers(1, 12),
    st.sampled_from([None, 1.5]),
    st.sampled_from([COST, cost_model(decode_a_s=1e-5), cost_model(C_s=1e-5)]),
)
def test_dispatch_matches_the_plain_scan(
    view: ClusterView,
    num_ooe: int,
    max_num_ooe: int,
    max_running: int,
    guess: float | None,
    cost: ESPCostModel,
) -> None:
    # The fast scan (prompt filter, lazy gate tables, early stops) decides
    # exactly as the plain one, with a fresh index, its own or another queue's.
    s = LoongSettings(
        max_num_ooe=max_num_ooe,
        max_running_requests=max_running,
        output_len_guess=guess,
        output_guess_floor_tokens=4,
    )
    expected = plain_dispatch(view, cost, s, num_ooe)
    dec = [r for r in decodable(view) if r.is_decoding and r.num_remaining_output_tokens > 0]
    assert dispatch(view, dec, cost, s, num_ooe) == expected
    own, other = WaitingIndex(view.waiting), WaitingIndex(view.waiting[1:])
    assert dispatch(view, dec, cost, s, num_ooe, own) == expected
    assert dispatch(view, dec, cost, s, num_ooe, other) == expected


def execute(view: ClusterView, plan: ClusterPlan, prompts: dict[str, int]) -> ClusterView:
    """Carry ``plan`` out instantly (every instance idle afterwards)."""
    waiting = {w.req_id: w for w in view.waiting}
    running = {r.req_id: r for r in view.running}
    front = []
    for rid in plan.preempt:
        r = running.pop(rid)
        front.append(
            WaitingRequest(
                rid,
                r.arrival_s,
                prompts[rid] + r.num_output_tokens,
                r.max_output_tokens,
                r.num_output_tokens,
            )
        )
    for m in plan.migrations:
        kv = dict(running[m.req_id].kv)
        kv[m.src] -= m.num_tokens
        kv[m.dst] = kv.get(m.dst, 0) + m.num_tokens
        running[m.req_id] = replace(
            running[m.req_id], kv=tuple(sorted((i, t) for i, t in kv.items() if t > 0))
        )
    for batch in plan.batches:
        for item in batch.prefills:
            w = waiting.pop(item.req_id)
            out = w.num_output_tokens + 1
            if out < w.max_output_tokens:
                running[w.req_id] = RunningRequest(
                    w.req_id,
                    w.arrival_s,
                    w.num_prompt_tokens,
                    w.max_output_tokens,
                    out,
                    tuple(sorted(item.retain)),
                )
        for dec in batch.decodes:
            r = running.pop(dec.req_id)
            grow = min(batch.num_steps, r.num_remaining_output_tokens)
            if r.num_output_tokens + grow < r.max_output_tokens:
                kv = dict(r.kv)
                kv[dec.master] = kv.get(dec.master, 0) + grow
                running[r.req_id] = replace(
                    r, num_output_tokens=r.num_output_tokens + grow, kv=tuple(sorted(kv.items()))
                )
    used = [0] * view.num_instances
    for r in running.values():
        for i, t in r.kv:
            used[i] += t
    instances = tuple(replace(inst, used_tokens=used[inst.instance]) for inst in view.instances)
    return ClusterView(
        view.now_s + 1.0, instances, tuple(front) + tuple(waiting.values()), tuple(running.values())
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(40, 200),
    st.lists(st.tuples(st.integers(1, 150), st.integers(1, 60)), min_size=1, max_size=12),
)
def test_instant_executor_finishes_every_request(
    n: int, cap: int, reqs: list[tuple[int, int]]
) -> None:
    total = n * cap
    waiting = [
        wait(f"w{k}", min(p, total), max_out=max(1, min(o, total - min(p, total) + 1)), arrival=k)
        for k, (p, o) in enumerate(reqs)
    ]
    prompts = {w.req_id: w.num_prompt_tokens for w in waiting}
    view = ClusterView(0.0, tuple(InstanceView(i, cap, 0) for i in range(n)), tuple(waiting))
    policy = LoongPolicy(n, COST, LoongSettings(min_comp_bound_decode_batch=2))
    for _ in range(2000):
        if not view.waiting and not view.running:
            return
        plan = policy.schedule(view)
        plan.check_invariants(view)
        assert plan.batches
        view = execute(view, plan, prompts)
    raise AssertionError(f"not finished: {len(view.waiting)} waiting, {len(view.running)} running")
