"""ESP's cluster cost model: prefill per DoP, a decode step, a KV migration.

LoongServe's analytical model, one row per degree of parallelism ``d``::

    T_prefill(d) = A_d + B_d * sum(l) + C_d * sum(l^2)       (l: prompt lengths)

A chunk of ``q`` new tokens after ``k`` cached ones counts ``q`` in
``sum(l)`` and ``q^2 + 2*q*k`` in ``sum(l^2)`` (its causal (query, key)
pairs, doubled as ``l^2`` counts them), so chunks of one prompt add up to
the whole prompt's quadratic term.

Beyond LoongServe (which uses a constant decode time), one instance's
decode step in a multi-master group::

    T_decode = a + b * num_master + c * num_kv_tokens + e * num_remote
               + f * [num_remote > 0] + g * num_striped_kv_tokens

    num_master:            requests this instance masters (dense work, sampling)
    num_kv_tokens:         KV tokens read here, for its own and foreign requests
    num_remote:            (query, partial) exchanges with other instances
    [num_remote > 0]:      the step exchanges at all (one collective per layer,
                           whatever the number of requests in it)
    num_striped_kv_tokens: the part of num_kv_tokens whose request also has KV
                           elsewhere (read by the partial-attention kernel,
                           which costs more per token than the paged one)

and a migration ``latency + num_tokens * bytes_per_token / bandwidth``.

DoPs without a fitted row are derived from the nearest fitted DoP below
(the largest one if there is none below, i.e. ``d`` below every row, never
happens since DoP 1 is required): ``B`` and ``C`` scale by ``d0 / d``
(sequence parallelism splits tokens and attention pairs evenly) and ``A``
grows by ``ring_hop_s`` per extra ring hop. A tensor-parallel group of
``d`` (a baseline, not ESP) divides the DoP-1 variable terms by
``d * tp_efficiency ** log2(d)``.

The file is written by the profiling command (``python -m vllm_esp.calibrate
--esp``) or by hand from published figures (``source: "derived"``); the
scheduler and the simulator load the same file. Torch-free, numpy-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_esp.core.costmodel import StepCostModel

__all__ = ["DecodeCoeffs", "ESPCostModel", "MigrationCoeffs", "PrefillCoeffs", "chunk_terms"]

FORMAT = "vllm-esp-cost/1"


def _check_nonneg(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{owner}.{name} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class PrefillCoeffs:
    """``T = A + B * sum_l + C * sum_l2`` seconds, for one DoP."""

    A_s: float
    B_s: float
    C_s: float
    #: Mean relative error of the fit (None: not fitted, e.g. derived).
    mean_rel_err: float | None = None

    def __post_init__(self) -> None:
        _check_nonneg("PrefillCoeffs", A_s=self.A_s, B_s=self.B_s, C_s=self.C_s)

    def time(self, sum_l: float, sum_l2: float) -> float:
        return self.A_s + self.B_s * sum_l + self.C_s * sum_l2


@dataclass(frozen=True)
class DecodeCoeffs:
    """``T = a + b * num_master + c * num_kv_tokens + e * num_remote
    + f * [num_remote > 0] + g * num_striped_kv_tokens`` seconds."""

    a_s: float
    b_s: float
    c_s: float
    e_s: float = 0.0
    f_s: float = 0.0
    g_s: float = 0.0
    mean_rel_err: float | None = None

    def __post_init__(self) -> None:
        _check_nonneg(
            "DecodeCoeffs",
            a_s=self.a_s,
            b_s=self.b_s,
            c_s=self.c_s,
            e_s=self.e_s,
            f_s=self.f_s,
            g_s=self.g_s,
        )


@dataclass(frozen=True)
class MigrationCoeffs:
    """``T = latency + num_tokens * bytes_per_token / bandwidth`` seconds."""

    latency_s: float
    bytes_per_token: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        _check_nonneg(
            "MigrationCoeffs", latency_s=self.latency_s, bytes_per_token=self.bytes_per_token
        )
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError("MigrationCoeffs.bandwidth_bytes_per_s must be > 0")


def chunk_terms(items: Iterable[tuple[int, int]]) -> tuple[float, float]:
    """``(sum_l, sum_l2)`` of chunks given as ``(num_new, num_cached)`` pairs."""
    sum_l = 0.0
    sum_l2 = 0.0
    for q, k in items:
        sum_l += q
        sum_l2 += q * q + 2.0 * q * k
    return sum_l, sum_l2


@dataclass(frozen=True)
class ESPCostModel:
    """Prefill rows per DoP, a decode step, a migration; see the module docstring."""

    prefill: Mapping[int, PrefillCoeffs]
    decode: DecodeCoeffs
    migration: MigrationCoeffs
    #: Extra fixed time per ring hop, for DoPs beyond the fitted rows.
    ring_hop_s: float = 0.0
    #: Fraction of linear speed-up kept per doubling of a tensor-parallel group.
    tp_efficiency: float = 0.9
    #: ``"measured"`` (the profiling command) or ``"derived"`` (published figures).
    source: str = "measured"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        rows = {int(d): c for d, c in self.prefill.items()}
        if 1 not in rows or any(d < 1 for d in rows):
            raise ValueError("ESPCostModel.prefill needs a row for DoP 1 and DoPs >= 1 only")
        object.__setattr__(self, "prefill", dict(sorted(rows.items())))
        _check_nonneg("ESPCostModel", ring_hop_s=self.ring_hop_s)
        if not 0 < self.tp_efficiency <= 1:
            raise ValueError("ESPCostModel.tp_efficiency must be in (0, 1]")
        if self.source not in ("measured", "derived"):
            raise ValueError("ESPCostModel.source must be 'measured' or 'derived'")

    # ------------------------------------------------------------------ prefill
    def prefill_coeffs(self, dop: int) -> PrefillCoeffs:
        """The row for ``dop`` (fitted, or derived from the nearest below)."""
        if dop < 1:
            raise ValueError(f"DoP must be >= 1, got {dop}")
        row = self.prefill.get(dop)
        if row is not None:
            return row
        base = max(d for d in self.prefill if d < dop)
        ref = self.prefill[base]
        scale = base / dop
        return PrefillCoeffs(
            A_s=ref.A_s + self.ring_hop_s * (dop - base),
            B_s=ref.B_s * scale,
            C_s=ref.C_s * scale,
        )

    def prefill_time(
        self, dop: int, sum_l: float, sum_l2: float, *, tensor_parallel: bool = False
    ) -> float:
        """Time of a prefill batch with these length sums on ``dop`` instances."""
        if sum_l <= 0:
            return 0.0
        if tensor_parallel and dop > 1:
            row = self.prefill[1]
            return row.A_s + (row.B_s * sum_l + row.C_s * sum_l2) / self._tp_speedup(dop)
        return self.prefill_coeffs(dop).time(sum_l, sum_l2)

    def chunks_time(
        self, dop: int, items: Iterable[tuple[int, int]], *, tensor_parallel: bool = False
    ) -> float:
        """Time of prefill chunks given as ``(num_new, num_cached)`` pairs."""
        sum_l, sum_l2 = chunk_terms(items)
        return self.prefill_time(dop, sum_l, sum_l2, tensor_parallel=tensor_parallel)

    # ------------------------------------------------------------------ decode
    def decode_time(
        self,
        num_master: int,
        num_kv_tokens: int,
        num_remote: int = 0,
        num_striped_kv_tokens: int = 0,
        *,
        tp_degree: int = 1,
    ) -> float:
        """One instance's decode step (or a tensor-parallel group's, ``tp_degree > 1``)."""
        if num_master <= 0 and num_remote <= 0:
            return 0.0
        d = self.decode
        variable = d.b_s * num_master + d.c_s * num_kv_tokens
        if tp_degree > 1:
            variable /= self._tp_speedup(tp_degree)
        t = d.a_s + variable
        if num_remote > 0:
            t += d.e_s * num_remote + d.f_s + d.g_s * num_striped_kv_tokens
        return t

    # ------------------------------------------------------------------ migration
    def migration_time(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        m = self.migration
        return m.latency_s + num_tokens * m.bytes_per_token / m.bandwidth_bytes_per_s

    @classmethod
    def from_step_cost(
        cls, step: StepCostModel, *, bytes_per_token: float, bandwidth_bytes_per_s: float
    ) -> ESPCostModel:
        """The DoP-1 rows of one instance's calibrated step model (the engine's
        fallback when no ESP cost file is given); other DoPs are derived.

        ``T(q, 0) = alpha + beta*q + gamma*q*(q+1)/2``, so ``C = gamma / 2``
        (the ``gamma*q/2`` left over is folded into ``B``); a decode step of
        ``n`` requests over ``k`` KV tokens costs ``alpha + beta*n + gamma*k``.
        """
        return cls(
            prefill={
                1: PrefillCoeffs(step.alpha_s, step.beta_s + step.gamma_s / 2, step.gamma_s / 2)
            },
            decode=DecodeCoeffs(step.alpha_s, step.beta_s, step.gamma_s),
            migration=MigrationCoeffs(0.0, bytes_per_token, bandwidth_bytes_per_s),
            source="measured" if step.source == "calibrated" else "derived",
            meta={"from_step_cost": step.source},
        )

    def _tp_speedup(self, degree: int) -> float:
        return degree * self.tp_efficiency ** math.log2(degree)

    # ------------------------------------------------------------------ io
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "prefill": {
                str(d): {"A_s": c.A_s, "B_s": c.B_s, "C_s": c.C_s, "mean_rel_err": c.mean_rel_err}
                for d, c in self.prefill.items()
            },
            "decode": self._decode_json(),
            "migration": {
                "latency_s": self.migration.latency_s,
                "bytes_per_token": self.migration.bytes_per_token,
                "bandwidth_bytes_per_s": self.migration.bandwidth_bytes_per_s,
            },
            "ring_hop_s": self.ring_hop_s,
            "tp_efficiency": self.tp_efficiency,
            "meta": self.meta,
        }

    def _decode_json(self) -> dict[str, Any]:
        d = self.decode
        out = {"a_s": d.a_s, "b_s": d.b_s, "c_s": d.c_s, "e_s": d.e_s}
        # Zero striped-step terms are left out, so a file without them keeps
        # its bytes and the hash results are stamped with.
        if d.f_s or d.g_s:
            out |= {"f_s": d.f_s, "g_s": d.g_s}
        return out | {"mean_rel_err": d.mean_rel_err}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ESPCostModel:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {data.get('format')!r})")
        return cls(
            prefill={int(d): PrefillCoeffs(**row) for d, row in data["prefill"].items()},
            decode=DecodeCoeffs(**data["decode"]),
            migration=MigrationCoeffs(**data["migration"]),
            ring_hop_s=float(data.get("ring_hop_s", 0.0)),
            tp_efficiency=float(data.get("tp_efficiency", 0.9)),
            source=str(data.get("source", "measured")),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ESPCostModel:
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_json(data)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid ESP cost-model file {path}: {e}") from e

    def sha256(self) -> str:
        """Hash of the coefficients (what results are stamped with)."""
        body = self.to_json()
        body.pop("meta")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
