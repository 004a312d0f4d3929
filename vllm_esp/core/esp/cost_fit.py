"""Fitting :class:`~vllm_esp.core.esp.cost_model.ESPCostModel` rows to measured times.

LoongServe's fit (``2-find-time-function-prefill.py: approach_linalg``) is
least squares on the *relative* error: every sample's row (features and
target) is divided by its measured time ``t`` and weighted by ``t**w``, so
a 5 ms batch matters about as much as a 5 s one (``w = 0.1`` for prefill
tilts it slightly towards the long ones, where mistakes cost most). We
minimise::

    sum_i (t_i**w * (x_i . theta - t_i) / t_i) ** 2      subject to theta >= 0

Negative coefficients are meaningless (a cost that falls as the batch
grows), so the fit is non-negative: with at most six parameters every
support (subset of parameters left free, the others fixed at 0; 63 of
them) is solved and the best feasible one kept, which is the exact NNLS optimum (on its
support the constrained optimum is the unconstrained one).

A parameter whose feature is zero in every sample (e.g. ``num_remote`` when
no decode step had remote KV) is not determined by the data; it is fixed at
0 and named in :attr:`Fit.unidentified`. Samples that determine no unique
solution otherwise (all identical, or one prompt length only, where
``sum_l2 = l * sum_l``) raise :class:`SingularFitError`.

Pure Python (no numpy): the decision core imports it, and the systems are
at most 6 x 6.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.cost_model import DecodeCoeffs, PrefillCoeffs

__all__ = [
    "DecodeSample",
    "Fit",
    "PrefillSample",
    "SingularFitError",
    "fit_decode",
    "fit_prefill",
    "fit_relative",
    "mean_relative_error",
    "ring_hop_from_rows",
    "solve_linear",
]

#: LoongServe's weights: relative rows times ``t**w``.
PREFILL_WEIGHT_EXPONENT = 0.1
DECODE_WEIGHT_EXPONENT = 0.5
#: A pivot below this fraction of the largest one means a singular system
#: (columns are scaled to unit norm first, so this is scale-free).
_PIVOT_RTOL = 1e-10


class SingularFitError(ValueError):
    """The samples do not determine the coefficients (vary the batch shapes)."""


@dataclass(frozen=True)
class PrefillSample:
    """One prefill batch: its length sums and measured seconds."""

    sum_l: float
    sum_l2: float
    seconds: float

    def features(self) -> tuple[float, ...]:
        return (1.0, float(self.sum_l), float(self.sum_l2))


@dataclass(frozen=True)
class DecodeSample:
    """One instance's decode step: its counts and measured seconds."""

    num_master: int
    num_kv_tokens: int
    num_remote: int
    seconds: float
    #: The part of ``num_kv_tokens`` whose request has KV elsewhere too.
    num_striped_kv_tokens: int = 0

    def features(self) -> tuple[float, ...]:
        exchanges = self.num_remote > 0
        return (
            1.0,
            float(self.num_master),
            float(self.num_kv_tokens),
            float(self.num_remote),
            1.0 if exchanges else 0.0,
            float(self.num_striped_kv_tokens) if exchanges else 0.0,
        )


@dataclass(frozen=True)
class Fit:
    """Non-negative coefficients, their mean relative error, what the data left open."""

    coeffs: tuple[float, ...]
    mean_rel_err: float
    #: Indices of parameters with an all-zero feature (fixed at 0).
    unidentified: tuple[int, ...] = ()


def solve_linear(matrix: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Solve ``matrix @ x = rhs`` by Gaussian elimination with partial pivoting.

    Raises :class:`SingularFitError` when a pivot vanishes (relative to the
    largest absolute entry), i.e. the system has no unique solution.
    """
    n = len(rhs)
    if n == 0 or len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"solve_linear needs a non-empty square system, got {n} right-hand sides")
    a = [[float(v) for v in row] + [float(b)] for row, b in zip(matrix, rhs)]
    scale = max((abs(v) for row in a for v in row[:n]), default=0.0)
    if not scale > 0:
        raise SingularFitError("singular system: the matrix is zero")
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= _PIVOT_RTOL * scale:
            raise SingularFitError(f"singular system: no pivot in column {col}")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                a[r] = [v - factor * p for v, p in zip(a[r], a[col])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def mean_relative_error(
    coeffs: Sequence[float], features: Sequence[Sequence[float]], seconds: Sequence[float]
) -> float:
    """``mean(|x . coeffs - t| / t)`` over the samples."""
    if not seconds:
        raise ValueError("mean_relative_error needs at least one sample")
    errs = [
        abs(sum(c * f for c, f in zip(coeffs, row)) - t) / t for row, t in zip(features, seconds)
    ]
    return sum(errs) / len(errs)


def _least_squares(
    rows: list[list[float]], target: list[float], support: tuple[int, ...]
) -> tuple[list[float], float]:
    """Unconstrained least squares of ``rows[:, support] @ y = target``.

    Columns are scaled to unit norm before forming the normal equations
    (sum_l2 is ~1e6 times sum_l), then unscaled. Returns ``(y, residual)``.
    """
    norms = [math.sqrt(sum(r[j] ** 2 for r in rows)) for j in support]
    cols = [[r[j] / s for r in rows] for j, s in zip(support, norms)]
    gram = [[sum(u * v for u, v in zip(ci, cj)) for cj in cols] for ci in cols]
    rhs = [sum(u * b for u, b in zip(ci, target)) for ci in cols]
    z = solve_linear(gram, rhs)
    y = [zi / s for zi, s in zip(z, norms)]
    residual = sum(
        (sum(r[j] * yj for j, yj in zip(support, y)) - b) ** 2 for r, b in zip(rows, target)
    )
    return y, residual


def fit_relative(
    features: Sequence[Sequence[float]], seconds: Sequence[float], weight_exponent: float
) -> Fit:
    """Non-negative least squares on relative error (see the module docstring)."""
    if len(features) != len(seconds):
        raise ValueError("fit_relative: one measured time per feature row")
    if not features:
        raise ValueError("fit_relative needs samples")
    num_params = len(features[0])
    for row, t in zip(features, seconds):
        if len(row) != num_params:
            raise ValueError("fit_relative: feature rows differ in length")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"fit_relative: measured times must be finite and > 0, got {t!r}")
        if not all(math.isfinite(v) and v >= 0 for v in row):
            raise ValueError(f"fit_relative: features must be finite and >= 0, got {row!r}")
    known = tuple(j for j in range(num_params) if any(row[j] for row in features))
    if not known:
        raise SingularFitError("fit_relative: every feature is zero")
    if len(features) < len(known):
        raise SingularFitError(
            f"{len(features)} samples cannot determine {len(known)} coefficients"
        )
    rows = [[v * t ** (weight_exponent - 1.0) for v in row] for row, t in zip(features, seconds)]
    target = [t**weight_exponent for t in seconds]
    # The full support must be well posed: a sub-support of a singular
    # design would hide the problem behind a plausible-looking fit.
    _least_squares(rows, target, known)
    best: tuple[float, list[float], tuple[int, ...]] | None = None
    for size in range(len(known), 0, -1):
        for support in itertools.combinations(known, size):
            y, residual = _least_squares(rows, target, support)
            if all(v >= 0 for v in y) and (best is None or residual < best[0]):
                best = (residual, y, support)
    assert best is not None  # a single column always has a non-negative solution
    coeffs = [0.0] * num_params
    for j, v in zip(best[2], best[1]):
        coeffs[j] = v
    unidentified = tuple(j for j in range(num_params) if j not in known)
    err = mean_relative_error(coeffs, features, seconds)
    return Fit(coeffs=tuple(coeffs), mean_rel_err=err, unidentified=unidentified)


def fit_prefill(samples: Sequence[PrefillSample]) -> PrefillCoeffs:
    """``A + B*sum_l + C*sum_l2`` fitted to prefill batches of one DoP."""
    fit = fit_relative(
        [s.features() for s in samples], [s.seconds for s in samples], PREFILL_WEIGHT_EXPONENT
    )
    a, b, c = fit.coeffs
    return PrefillCoeffs(A_s=a, B_s=b, C_s=c, mean_rel_err=fit.mean_rel_err)


def fit_decode_detailed(samples: Sequence[DecodeSample]) -> Fit:
    """:func:`fit_decode` with the raw :class:`Fit` (which parameters were open)."""
    return fit_relative(
        [s.features() for s in samples], [s.seconds for s in samples], DECODE_WEIGHT_EXPONENT
    )


def fit_decode(samples: Sequence[DecodeSample]) -> DecodeCoeffs:
    """``a + b*num_master + c*num_kv_tokens + e*num_remote + f*[num_remote > 0]
    + g*num_striped_kv_tokens`` fitted to decode steps.

    ``e``, ``f`` and ``g`` are 0 when no sample had a remote exchange (see
    the module docstring).
    """
    fit = fit_decode_detailed(samples)
    a, b, c, e, f, g = fit.coeffs
    return DecodeCoeffs(a_s=a, b_s=b, c_s=c, e_s=e, f_s=f, g_s=g, mean_rel_err=fit.mean_rel_err)


def ring_hop_from_rows(rows: Mapping[int, PrefillCoeffs]) -> float:
    """Fixed time per extra ring hop implied by fitted rows: the growth of ``A``
    per instance from the smallest to the largest DoP, floored at 0 (a fitted
    intercept can shrink with DoP by noise alone)."""
    lo, hi = min(rows), max(rows)
    if hi == lo:
        return 0.0
    return max((rows[hi].A_s - rows[lo].A_s) / (hi - lo), 0.0)
