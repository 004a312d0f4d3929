"""A small, calibrated cost model for one request's work in one step.

The MLFQ scheduler needs a unit of service that means the same thing
whether a request runs alone or in a batch of 64, and whether its prompt is
prefilled in one step or in ten chunks. Wall-clock iteration time (what
FastServe charges) fails both: a batch of 64 makes every member "pay" for
the others, and a chunk's time depends on who shares its step.

We charge instead the *standalone time* of the tokens a request computed:
the time its chunk would take if it ran alone, from this model::

    T(q, k) = alpha + beta * q + gamma * q * (k + (q + 1) / 2)

    q: new tokens computed in the chunk      (prefill chunk or 1 for decode)
    k: tokens already in the KV cache        (context before the chunk)
    alpha: fixed per-step cost   beta: per-token cost (weights, MLP)
    gamma: per (query, key) pair cost (causal attention over k + q keys)

Chunks of one prompt add up to about the unchunked prefill (the attention
term is exact; alpha is paid once per chunk, which is true of the engine as
well), so the skip-join estimate and the charged service are in the same
unit. The coefficients come from ``python -m vllm_esp.calibrate``
(a calibration file measured on the running machine); without one, an
analytic FLOP count divided by a nominal device throughput is used and the
scheduler logs that it is running uncalibrated.

This module is torch-free and numpy-free: the scheduler, the simulator and
the tests share it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Nominal sustained dense throughput (FLOP/s) used only by the analytic
#: fallback. Deliberately round numbers: a calibration replaces them.
NOMINAL_FLOPS = {"cpu": 2.0e10, "cuda": 1.0e14}
#: Nominal fixed per-step cost (s) for the analytic fallback.
NOMINAL_STEP_OVERHEAD_S = {"cpu": 2.0e-3, "cuda": 5.0e-3}


@dataclass(frozen=True)
class StepCostModel:
    """``T(q, k) = alpha + beta*q + gamma*q*(k + (q+1)/2)`` seconds."""

    alpha_s: float
    beta_s: float
    gamma_s: float
    #: Where the coefficients came from: ``"calibrated"`` or ``"analytic"``.
    source: str = "analytic"
    #: Free-form provenance (model, machine, versions, fit error).
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("alpha_s", "beta_s", "gamma_s"):
            value = getattr(self, name)
            if not (value >= 0.0) or value != value or value == float("inf"):
                raise ValueError(f"StepCostModel.{name} must be finite and >= 0, got {value!r}")
        if self.alpha_s + self.beta_s <= 0.0:
            raise ValueError("StepCostModel: alpha_s + beta_s must be > 0")

    def chunk_time(self, num_new_tokens: int, num_computed_tokens: int) -> float:
        """Standalone time of computing ``num_new_tokens`` after
        ``num_computed_tokens`` cached ones."""
        if num_new_tokens <= 0:
            return 0.0
        q = float(num_new_tokens)
        return (
            self.alpha_s
            + self.beta_s * q
            + self.gamma_s * q * (num_computed_tokens + (q + 1.0) / 2.0)
        )

    def prefill_time(self, num_prompt_tokens: int, num_cached_tokens: int = 0) -> float:
        """Estimated first-iteration time of a prompt, prefix-cache aware:
        only the uncached tail is computed."""
        num_cached = min(max(num_cached_tokens, 0), max(num_prompt_tokens - 1, 0))
        return self.chunk_time(num_prompt_tokens - num_cached, num_cached)

    def decode_time(self, num_context_tokens: int) -> float:
        return self.chunk_time(1, num_context_tokens)

    # ------------------------------------------------------------------ io
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepCostModel:
        return cls(
            alpha_s=float(data["alpha_s"]),
            beta_s=float(data["beta_s"]),
            gamma_s=float(data["gamma_s"]),
            source=str(data.get("source", "calibrated")),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StepCostModel:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read calibration file {path}: {e}") from e
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid calibration file {path}: {e}") from e

    # ------------------------------------------------------------ fallback
    @classmethod
    def analytic(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        vocab_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        device: str = "cpu",
    ) -> StepCostModel:
        """FLOP-count fallback for a Llama-style decoder.

        Per token: 2 FLOPs per weight (QKV, O, gated MLP, LM head).
        Per (query, key) pair: 2 * 2 * hidden FLOPs per layer (QK^T and PV).
        """
        head_dim = hidden_size // num_attention_heads
        kv_dim = num_key_value_heads * head_dim
        per_layer = hidden_size * (hidden_size + 2 * kv_dim) + hidden_size * hidden_size
        per_layer += 3 * hidden_size * intermediate_size
        num_weights = num_layers * per_layer + vocab_size * hidden_size
        flops = NOMINAL_FLOPS.get(device, NOMINAL_FLOPS["cpu"])
        return cls(
            alpha_s=NOMINAL_STEP_OVERHEAD_S.get(device, NOMINAL_STEP_OVERHEAD_S["cpu"]),
            beta_s=2.0 * num_weights / flops,
            gamma_s=4.0 * num_layers * hidden_size / flops,
            source="analytic",
            meta={"device": device, "num_weights": num_weights, "nominal_flops": flops},
        )


def default_calibration_dir() -> Path:
    root = os.environ.get("VLLM_ESP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm-esp"
    )
    return Path(root) / "calibration"


def default_calibration_path(model: str, device: str = "cpu") -> Path:
    """Where ``python -m vllm_esp.calibrate`` writes, and the scheduler looks, for ``model``.

    Keyed by the model path (or name) and the device kind: a calibration
    from another machine kind would mislead skip-join more than the
    analytic fallback does.
    """
    key = hashlib.sha256(
        f"{os.path.abspath(model) if os.path.exists(model) else model}|{device}".encode()
    ).hexdigest()[:16]
    stem = Path(model.rstrip("/")).name or "model"
    return default_calibration_dir() / f"{stem}-{device}-{key}.json"
