r"""LoongServe's step 3: cut prefill requests into batches and give each a DoP.

Requests are sorted by prefill length, longest first, instances by free KV
slots, most free (least loaded) first. A plan cuts both lists into contiguous
segments paired in order (the longest requests run on the least-loaded
instances; the last instances may stay unused), minimising the sum of
normalised input latency (LoongServe Eq. 5)::

    sum over batches b of  T_{m_b}(sum_l, sum_l2) * sum_{r in b} 1 / l_r

where ``m_b`` is the batch's DoP, subject to ``sum_l`` fitting in the free
slots of the batch's instances. With ``S``, ``Q``, ``V`` the prefix sums of
``l``, ``l^2``, ``1/l`` over the sorted requests and ``F`` those of the free
slots, ``g[i][j]`` is the least cost of the ``i`` longest requests on at most
the ``j`` least-loaded instances::

                  instances, most free first
                0          j-m            j              E
      requests  +-----------+-------------+--------------+
         0      | g[0][*] = 0                            |
         x      |           g[x][j-m]                    |
                |               \  last batch: requests  |
                |                \ (x, i] on (j-m, j]    |
         i      |                 `---------> g[i][j]    |
         n      |                                g[n][E] | <- the answer
                +----------------------------------------+

    g[i][j] = min(g[i][j-1],                        instance j left unused
                  min over m, x of g[x][j-m] + w_m(x, i))
    w_m(x, i) = T_m(S[i]-S[x], Q[i]-Q[x]) * (V[i]-V[x]),  if S[i]-S[x] <= F[j]-F[j-m]

Pruning. The paper's bounds (Eq. 6: ``k <= split_req[i][j-1]``, ``m >=
split_ins[i-1][j]``), as LoongServe's C++ applies them over exactly ``j``
instances (transcribed in ``tests/core/test_esp_batching.py``), are not exact:
the first request alone takes all ``j`` instances, so the ``m`` bound keeps
every ``g[i][j]`` one batch on all ``j`` instances until capacity breaks the
chain, and the plan often costs many times the optimum.

What is exact: for one ``(j, m)`` the matrix ``g[x][j-m] + w_m(x, i)`` (rows
``i``, columns ``x``) is Monge when ``T_m`` is affine with ``B, C >= 0``
(``A*V`` is modular; ``S*V`` and ``Q*V`` are products of interval sums, which
satisfy the quadrangle inequality), and capacity keeps it so (it only forbids
the longest batches). So each row's best ``x`` is nondecreasing in ``i``, and
divide and conquer finds them all with ``O(n log n)`` evaluations:
``O(E^2 n log n)`` in all, not ``O(E^2 n^2)``. ``prune=True`` takes this path
when ``prefill_time`` reads as affine per DoP (``ESPCostModel`` does; probed),
otherwise the exhaustive one, exact for any cost. Ties go to fewer instances,
then the smaller DoP, then the longer batch.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["BatchingStats", "PrefillGroup", "plan_prefill_batches"]

PrefillTime = Callable[[int, float, float], float]
_INF = math.inf
# Probes for an affine cost's coefficients: large, so differences dominate rounding.
_PROBE_L, _PROBE_L2 = float(2**20), float(2**40)
_CHECK_POINTS = ((3.0, 5.0), (12345.0, 1.5e9), (777777.0, 4.4e11))
_AFFINE_RTOL = 1e-9
# Per column j, per row i: the last batch's (DoP, start), or None (instance j unused).
_Args = list[list[tuple[int, int] | None]]


@dataclass(frozen=True)
class PrefillGroup:
    """One prefill batch: ``requests`` (into ``lengths``) on ``instances`` (into ``free_tokens``)."""

    requests: tuple[int, ...]
    instances: tuple[int, ...]
    est_time_s: float


@dataclass
class BatchingStats:
    """Work counters, filled in by the call that receives it."""

    num_evaluations: int = 0  # candidate (batch, DoP) costs the dynamic program evaluated
    num_cost_calls: int = 0  # calls to prefill_time: probes, exhaustive path, est_time_s
    monge: bool = False  # whether the divide-and-conquer path ran


class _Problem:
    """Sorted orders and prefix sums; index ``i`` covers the first ``i`` sorted items."""

    def __init__(self, lengths: Sequence[int], free_tokens: Sequence[int]) -> None:
        if any(int(x) != x or x <= 0 for x in lengths):
            raise ValueError("prefill lengths must be positive integers")
        if any(int(x) != x or x < 0 for x in free_tokens):
            raise ValueError("free token counts must be non-negative integers")
        self.req_order = sorted(range(len(lengths)), key=lambda r: (-lengths[r], r))
        self.inst_order = sorted(range(len(free_tokens)), key=lambda e: (-free_tokens[e], e))
        self.n, self.num_instances = len(lengths), len(free_tokens)
        self.S, self.Q, self.V, self.F = [0], [0], [0.0], [0]
        for r in self.req_order:
            length = int(lengths[r])
            self.S.append(self.S[-1] + length)
            self.Q.append(self.Q[-1] + length * length)
            self.V.append(self.V[-1] + 1.0 / length)
        for e in self.inst_order:
            self.F.append(self.F[-1] + int(free_tokens[e]))


def plan_prefill_batches(
    lengths: Sequence[int],
    free_tokens: Sequence[int],
    prefill_time: PrefillTime,
    *,
    prune: bool = True,
    stats: BatchingStats | None = None,
) -> tuple[PrefillGroup, ...] | None:
    """The least-cost plan (module docstring), longest requests first; None if none fits.

    ``prune=False`` forces the exhaustive path; ``stats`` receives the work done.
    """
    stats = BatchingStats() if stats is None else stats
    p = _Problem(lengths, free_tokens)
    if p.n == 0:
        return ()
    if p.num_instances == 0:
        return None
    cost = _counted(prefill_time, stats)
    coeffs = _affine_coeffs(cost, p.num_instances) if prune else None
    stats.monge = coeffs is not None
    args = _solve_exhaustive(p, cost, stats) if coeffs is None else _solve_monge(p, coeffs, stats)
    if args is None:
        return None
    segments: list[tuple[int, int, int]] = []
    i, j = p.n, p.num_instances
    while i > 0:
        step = args[j][i]
        if step is None:  # instance j left unused
            j -= 1
            continue
        m, x = step
        segments.append((x, i, m))
        i, j = x, j - m
    # Segments keep their order and sizes but move onto the lowest instance
    # indices: unused instances end up last, each segment's instances only
    # gain free slots (they are sorted most free first), the cost is unchanged.
    placed: list[tuple[int, int, int, int]] = []
    used = 0
    for x, i, m in reversed(segments):
        placed.append((x, i, used, m))
        used += m
    return _groups(p, placed, cost)


def _counted(prefill_time: PrefillTime, stats: BatchingStats) -> PrefillTime:
    def cost(dop: int, sum_l: float, sum_l2: float) -> float:
        stats.num_cost_calls += 1
        return prefill_time(dop, sum_l, sum_l2)

    return cost


def _affine_coeffs(cost: PrefillTime, num_dops: int) -> list[tuple[float, float, float]] | None:
    """``(A, B, C)`` per DoP (index 0 unused) if ``cost`` is affine with ``B, C >= 0``."""
    coeffs = [(0.0, 0.0, 0.0)]
    for d in range(1, num_dops + 1):
        t1 = cost(d, 1.0, 0.0)
        b = (cost(d, 1.0 + _PROBE_L, 0.0) - t1) / _PROBE_L
        c = (cost(d, 1.0, _PROBE_L2) - t1) / _PROBE_L2
        a = t1 - b
        if not (math.isfinite(a) and b >= 0 and c >= 0 and math.isfinite(b + c)):
            return None
        for sl, sl2 in _CHECK_POINTS:
            t = cost(d, sl, sl2)
            if not abs(t - (a + b * sl + c * sl2)) <= _AFFINE_RTOL * abs(t) + 1e-15:
                return None
        coeffs.append((a, b, c))
    return coeffs


def _empty_args(n: int) -> _Args:
    return [[None] * (n + 1)]


def _last_finite(col: list[float]) -> int:
    """``g[.][y]`` is finite exactly on a prefix of rows (fewer requests fit wherever more do)."""
    hi = len(col) - 1
    while col[hi] == _INF:
        hi -= 1
    return hi


def _solve_exhaustive(p: _Problem, cost: PrefillTime, stats: BatchingStats) -> _Args | None:
    """Every (row, DoP, batch start); the batch grows until capacity fails (it keeps failing)."""
    S, Q, V, F, n = p.S, p.Q, p.V, p.F, p.n
    cols, args = [[0.0] + [_INF] * n], _empty_args(n)
    for j in range(1, p.num_instances + 1):
        col, arg = cols[-1][:], _empty_args(n)[0]
        for m in range(1, j + 1):
            d, cap, hi = cols[j - m], F[j] - F[j - m], _last_finite(cols[j - m])
            for i in range(1, n + 1):
                best, bx = _INF, -1
                for x in range(min(i - 1, hi), -1, -1):
                    sl = S[i] - S[x]
                    if sl > cap:
                        break
                    stats.num_evaluations += 1
                    v = d[x] + cost(m, float(sl), float(Q[i] - Q[x])) * (V[i] - V[x])
                    if v <= best:  # the leftmost best, as the Monge path
                        best, bx = v, x
                if best < col[i]:
                    col[i], arg[i] = best, (m, bx)
        cols.append(col)
        args.append(arg)
    return args if cols[-1][n] < _INF else None


def _solve_monge(
    p: _Problem, coeffs: list[tuple[float, float, float]], stats: BatchingStats
) -> _Args | None:
    """Per ``(j, m)``, every row's best batch start by divide and conquer (module docstring).

    ``L[x] = B_m * S[x] + C_m * Q[x]``, so ``T_m`` of the batch ``(x, i]`` is
    ``A_m + L[i] - L[x]`` (rounding: about 1e-16 of ``L[n]``, far below any
    cost difference that matters).
    """
    S, V, F, n, num_inst = p.S, p.V, p.F, p.n, p.num_instances
    lins = [[b * s + c * q for s, q in zip(S, p.Q)] for _, b, c in coeffs]
    cols, args, his = [[0.0] + [_INF] * n], _empty_args(n), [0]  # his: last finite row
    for j in range(1, num_inst + 1):
        col, arg = cols[-1][:], _empty_args(n)[0]
        rows = list(range(1, n + 1)) if j < num_inst else [n]  # g[n][E] is all that is left
        for m in range(1, j + 1):
            cap, d, a_s, L = F[j] - F[j - m], cols[j - m], coeffs[m][0], lins[m]
            # lo[i]: the first batch start x whose batch (x, i] fits.
            lo = [0] * (n + 1) if cap >= S[n] else [bisect_left(S, s - cap) for s in S]
            stack = [(0, len(rows) - 1, 0, his[j - m])]  # (first row, last row, least x, most x)
            while stack:
                r0, r1, x0, x1 = stack.pop()
                mid = (r0 + r1) >> 1
                i = rows[mid]
                a, b = max(lo[i], x0), min(i - 1, x1)
                if a > b:  # nothing fits row i; rows above start at most at b, below at least at a
                    x, xr = b, a
                else:
                    k, vi = a_s + L[i], V[i]
                    vals = [
                        dx + (k - lx) * (vi - vx)
                        for dx, lx, vx in zip(d[a : b + 1], L[a : b + 1], V[a : b + 1])
                    ]
                    stats.num_evaluations += b - a + 1
                    best = min(vals)
                    x = xr = a + vals.index(best)  # the leftmost best
                    if best < col[i]:
                        col[i], arg[i] = best, (m, x)
                if r0 < mid and x0 <= x:
                    stack.append((r0, mid - 1, x0, x))
                if mid < r1 and xr <= x1:
                    stack.append((mid + 1, r1, xr, x1))
        cols.append(col)
        args.append(arg)
        his.append(_last_finite(col))
    return args if cols[-1][n] < _INF else None


def _groups(
    p: _Problem, placed: list[tuple[int, int, int, int]], cost: PrefillTime
) -> tuple[PrefillGroup, ...]:
    """``PrefillGroup``s from ``(x, i, first instance, m)``, all positions in sorted order."""
    return tuple(
        PrefillGroup(
            requests=tuple(p.req_order[x:i]),
            instances=tuple(p.inst_order[e0 : e0 + m]),
            est_time_s=cost(m, float(p.S[i] - p.S[x]), float(p.Q[i] - p.Q[x])),
        )
        for x, i, e0, m in placed
    )
