"""LoongServe's batching-and-DoP dynamic program against brute force, by hand, and at scale."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.cost_model import DecodeCoeffs, ESPCostModel, MigrationCoeffs, PrefillCoeffs
from vllm_esp.core.esp.loong.batching import BatchingStats, PrefillGroup, plan_prefill_batches

Cost = Callable[[int, float, float], float]


def esp_model(
    a_s: float = 0.02, b_s: float = 5e-5, c_s: float = 2e-9, hop_s: float = 0.002
) -> ESPCostModel:
    """DoP 1 fitted, the other DoPs derived (B and C scale by 1/d, A grows per hop)."""
    return ESPCostModel(
        prefill={1: PrefillCoeffs(a_s, b_s, c_s)},
        decode=DecodeCoeffs(0.02, 1e-4, 1e-8),
        migration=MigrationCoeffs(1e-3, 131072, 4e11),
        ring_hop_s=hop_s,
        source="derived",
    )


def plan_cost(plan: Sequence[PrefillGroup], lengths: Sequence[int]) -> float:
    return sum(g.est_time_s * sum(1 / lengths[r] for r in g.requests) for g in plan)


def brute_force(lengths: Sequence[int], free: Sequence[int], cost: Cost) -> float:
    """Least cost over every cut of the sorted requests into contiguous segments, each on
    its own contiguous run of the sorted instances, runs in the same order (gaps allowed)."""
    ls = sorted(lengths, reverse=True)
    fs = sorted(free, reverse=True)
    n, num_inst = len(ls), len(fs)
    best = math.inf

    def go(r: int, e: int, acc: float) -> None:
        nonlocal best
        if r == n:
            best = min(best, acc)
            return
        for r2 in range(r + 1, n + 1):
            seg = ls[r:r2]
            sl, sl2, inv = sum(seg), sum(x * x for x in seg), sum(1 / x for x in seg)
            for e0 in range(e, num_inst):
                for e1 in range(e0 + 1, num_inst + 1):
                    if sl <= sum(fs[e0:e1]):
                        go(r2, e1, acc + cost(e1 - e0, float(sl), float(sl2)) * inv)

    go(0, 0, 0.0)
    return best


def check_plan(
    plan: Sequence[PrefillGroup], lengths: Sequence[int], free: Sequence[int], cost: Cost
) -> None:
    """A partition of the requests on disjoint instance runs that keep the sorted order."""
    reqs = [r for g in plan for r in g.requests]
    assert sorted(reqs) == list(range(len(lengths)))
    insts = [e for g in plan for e in g.instances]
    assert len(insts) == len(set(insts)) and all(g.instances for g in plan)
    for g in plan:
        sl = sum(lengths[r] for r in g.requests)
        assert sl <= sum(free[e] for e in g.instances)
        sl2 = sum(lengths[r] ** 2 for r in g.requests)
        assert g.est_time_s == pytest.approx(cost(len(g.instances), float(sl), float(sl2)))
    for g, h in itertools.pairwise(plan):  # longest requests on the least-loaded instances
        assert min(lengths[r] for r in g.requests) >= max(lengths[r] for r in h.requests)
        assert min(free[e] for e in g.instances) >= max(free[e] for e in h.instances)
    unused = set(range(len(free))) - set(insts)
    if unused and insts:
        assert max(free[e] for e in unused) <= min(free[e] for e in insts)


@st.composite
def affine_costs(draw: st.DrawFn, num_dops: int = 5) -> Cost:
    """``A_d + B_d * sum_l + C_d * sum_l2``, A_d arbitrary, B_d and C_d decreasing in d."""
    a = [draw(st.floats(0.0, 0.05)) for _ in range(num_dops)]
    b = [draw(st.floats(1e-6, 1e-4))]
    c = [draw(st.floats(0.0, 1e-7))]
    for _ in range(num_dops - 1):
        b.append(b[-1] * draw(st.floats(0.3, 1.0)))
        c.append(c[-1] * draw(st.floats(0.3, 1.0)))
    return lambda d, sl, sl2: a[d - 1] + b[d - 1] * sl + c[d - 1] * sl2


small_lengths = st.lists(
    st.one_of(st.integers(1, 200_000), st.sampled_from([100, 5_000, 60_000])),
    min_size=1,
    max_size=6,
)
small_free = st.lists(st.integers(0, 300_000), min_size=0, max_size=5)


@settings(max_examples=200, deadline=None)
@given(small_lengths, small_free, affine_costs())
def test_matches_brute_force(lengths: list[int], free: list[int], cost: Cost) -> None:
    best = brute_force(lengths, free, cost)
    for prune in (True, False):
        stats = BatchingStats()
        plan = plan_prefill_batches(lengths, free, cost, prune=prune, stats=stats)
        assert stats.monge == (prune and bool(free))
        assert (plan is None) == (best == math.inf)
        if plan is not None:
            check_plan(plan, lengths, free, cost)
            assert plan_cost(plan, lengths) == pytest.approx(best, rel=1e-7)


@settings(max_examples=60, deadline=None)
@given(small_lengths, small_free, affine_costs())
def test_non_affine_cost_takes_the_exhaustive_path(
    lengths: list[int], free: list[int], affine: Cost
) -> None:
    def cost(d: int, sl: float, sl2: float) -> float:
        return affine(d, sl, sl2) + 1e-4 * math.sqrt(sl) / d

    stats = BatchingStats()
    plan = plan_prefill_batches(lengths, free, cost, stats=stats)
    assert not stats.monge  # the probe sees the square root
    best = brute_force(lengths, free, cost)
    assert (plan is None) == (best == math.inf)
    if plan is not None:
        check_plan(plan, lengths, free, cost)
        assert plan_cost(plan, lengths) == pytest.approx(best, rel=1e-9)


def loongserve_dp(
    lengths: Sequence[int], free: Sequence[int], cost: Cost
) -> tuple[float, list[tuple[int, int]]] | None:
    """LoongServe's ``minimize_prefill_iteration_time`` (C++) with its Eq. 6 bounds.

    ``g[i][j]``: the ``i`` longest requests on exactly the ``j`` least-loaded
    instances; ``split[i][j]``: the last batch's (size, DoP). Returns the
    least cost and the batches' (size, DoP), longest requests first.
    """
    ls, fs = sorted(lengths, reverse=True), sorted(free, reverse=True)
    n, num_inst = len(ls), len(fs)
    S, Q, V, F = [0], [0], [0.0], [0]
    for x in ls:
        S.append(S[-1] + x)
        Q.append(Q[-1] + x * x)
        V.append(V[-1] + 1 / x)
    for f in fs:
        F.append(F[-1] + f)
    g = [[0.0] + [math.inf] * num_inst] + [[math.inf] * (num_inst + 1) for _ in range(n)]
    split = [[(-1, -1)] * (num_inst + 1) for _ in range(n + 1)]
    for i, j in itertools.product(range(1, n + 1), range(1, num_inst + 1)):
        k_max = split[i][j - 1][0] if split[i][j - 1][0] >= 0 else i
        m_min = max(split[i - 1][j][1], 1)
        for k in range(1, k_max + 1):
            sl, sl2, inv = S[i] - S[i - k], Q[i] - Q[i - k], V[i] - V[i - k]
            for m in range(j, m_min - 1, -1):
                if sl > F[j] - F[j - m]:
                    break
                v = g[i - k][j - m] + cost(m, float(sl), float(sl2)) * inv
                if v < g[i][j]:
                    g[i][j], split[i][j] = v, (k, m)
    j = min(range(num_inst + 1), key=lambda y: (g[n][y], y))
    best = g[n][j]
    if best == math.inf:
        return None
    batches, i = [], n
    while i > 0:
        k, m = split[i][j]
        batches.append((k, m))
        i, j = i - k, j - m
    return best, batches[::-1]


@settings(max_examples=100, deadline=None)
@given(small_lengths, small_free, affine_costs())
def test_paper_bounds_give_feasible_but_worse_plans(
    lengths: list[int], free: list[int], cost: Cost
) -> None:
    paper = loongserve_dp(lengths, free, cost)
    exact = plan_prefill_batches(lengths, free, cost)
    assert (paper is None) == (exact is None)
    if paper is not None and exact is not None:
        assert paper[0] >= plan_cost(exact, lengths) * (1 - 1e-9)


def test_paper_bounds_keep_one_batch_that_splitting_beats() -> None:
    # The first request alone takes all j instances, so ``m >= split_ins[i-1][j]``
    # puts every request in one batch on all instances whenever it fits.
    cost = esp_model().prefill_time
    lengths, free = [100_000, 1_000, 500], [10**6] * 3
    paper = loongserve_dp(lengths, free, cost)
    exact = plan_prefill_batches(lengths, free, cost)
    assert paper is not None and exact is not None
    assert paper[1] == [(3, 3)]
    assert [(len(g.requests), len(g.instances)) for g in exact] == [(1, 1), (1, 1), (1, 1)]
    assert plan_cost(exact, lengths) < paper[0] / 10


# ------------------------------------------------------------------------------ by hand


def test_one_long_request_takes_every_instance_when_attention_dominates() -> None:
    cost = esp_model().prefill_time
    free = [10**6] * 8
    plan = plan_prefill_batches([500_000], free, cost)
    assert plan is not None and len(plan) == 1
    assert sorted(plan[0].instances) == list(range(8))
    check_plan(plan, [500_000], free, cost)


def test_many_short_requests_split_into_dop_one_batches() -> None:
    cost = esp_model().prefill_time
    lengths, free = [200] * 16, [100_000] * 4
    plan = plan_prefill_batches(lengths, free, cost)
    assert plan is not None
    check_plan(plan, lengths, free, cost)
    assert [len(g.instances) for g in plan] == [1, 1, 1, 1]
    assert [len(g.requests) for g in plan] == [4, 4, 4, 4]


def test_capacity_forces_a_larger_group() -> None:
    # Extra ring hops make DoP 1 the fastest; 150K tokens need two instances.
    cost = esp_model(hop_s=10.0).prefill_time
    plan = plan_prefill_batches([150_000], [100_000, 100_000, 100_000], cost)
    assert plan is not None and [len(g.instances) for g in plan] == [2]
    assert plan_prefill_batches([150_000], [100_000], cost) is None
    assert plan_prefill_batches([150_000], [50_000, 50_000], cost) is None


def test_longest_requests_go_to_the_least_loaded_instances() -> None:
    cost = esp_model(hop_s=10.0).prefill_time
    lengths, free = [1_000, 90_000], [95_000, 2_000]
    plan = plan_prefill_batches(lengths, free, cost)
    assert plan is not None
    assert [(g.requests, g.instances) for g in plan] == [((1,), (0,)), ((0,), (1,))]


def test_edges_and_validation() -> None:
    cost = esp_model().prefill_time
    assert plan_prefill_batches([], [10], cost) == ()
    assert plan_prefill_batches([5], [], cost) is None
    with pytest.raises(ValueError):
        plan_prefill_batches([0], [10], cost)
    with pytest.raises(ValueError):
        plan_prefill_batches([5], [-1], cost)


def test_deterministic_under_ties() -> None:
    cost = esp_model().prefill_time
    lengths, free = [300] * 7 + [80_000] * 3, [200_000] * 6
    first = plan_prefill_batches(lengths, free, cost)
    assert first is not None
    assert plan_prefill_batches(lengths, free, cost) == first
    exhaustive = plan_prefill_batches(lengths, free, cost, prune=False)
    assert exhaustive is not None
    assert plan_cost(exhaustive, lengths) == pytest.approx(plan_cost(first, lengths), rel=1e-9)


# ------------------------------------------------------------------------------ scale


def test_scale_300_requests_64_instances() -> None:
    rng = random.Random(0)
    n, num_inst = 300, 64
    lengths = [int(math.exp(rng.uniform(math.log(50), math.log(100_000)))) for _ in range(n)]
    free = [rng.randint(50_000, 500_000) for _ in range(num_inst)]
    cost = esp_model().prefill_time
    stats = BatchingStats()
    plan = plan_prefill_batches(lengths, free, cost, stats=stats)
    assert plan is not None and stats.monge
    check_plan(plan, lengths, free, cost)
    # Divide and conquer: per (j, m) at most n evaluations per recursion level.
    num_pairs = num_inst * (num_inst + 1) // 2
    assert stats.num_evaluations <= num_pairs * n * (math.ceil(math.log2(n + 1)) + 1)
    # The exhaustive DP would evaluate about num_pairs * n^2 / 2 candidates.
    assert stats.num_evaluations < num_pairs * n * n / 2 / 10
    # The optimum beats simple plans: one batch on every instance, and equal
    # runs of requests on single instances.
    one_batch = cost(num_inst, float(sum(lengths)), float(sum(x * x for x in lengths)))
    assert plan_cost(plan, lengths) <= one_batch * sum(1 / x for x in lengths)
    ls = sorted(lengths, reverse=True)
    runs = [ls[k * n // num_inst : (k + 1) * n // num_inst] for k in range(num_inst)]
    assert all(sum(r) <= f for r, f in zip(runs, sorted(free, reverse=True)))  # a real plan
    spread = sum(
        cost(1, float(sum(r)), float(sum(x * x for x in r))) * sum(1 / x for x in r) for r in runs
    )
    assert plan_cost(plan, lengths) <= spread


def test_batching_does_not_import_torch() -> None:
    code = (
        "import sys, vllm_esp.core.esp.loong.batching; "
        "assert not {'torch', 'numpy'} & set(sys.modules), 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
