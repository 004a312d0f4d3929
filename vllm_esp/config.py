"""Frozen, validated settings of the vllm-esp schedulers.

Settings reach the EngineCore process through vLLM's own
``VllmConfig.additional_config`` dict (``--additional-config`` on the CLI,
``additional_config=`` in ``LLM(...)``), under the key ``"mlfq"``; that
dict is part of vLLM's config hash, so two engines with different MLFQ
settings never share a compilation cache entry by mistake.

Everything is validated twice: in the front-end process when the flag is
parsed (so ``vllm serve`` fails before spawning anything) and again in the
scheduler constructor (so ``LLM(...)`` users get the same message).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADDITIONAL_CONFIG_KEY = "mlfq"


class ESPConfigError(ValueError):
    """An invalid vllm-esp setting. The message names the setting."""


@dataclass(frozen=True)
class MLFQConfig:
    """Skip-join MLFQ settings (see ``vllm_esp/policy/mlfq.py``).

    Service is charged in *standalone seconds* from the calibrated cost
    model (``vllm_esp/costmodel/model.py`` says why), so quanta are seconds.
    """

    #: Number of priority levels K. Level 0 is the highest.
    num_levels: int = 8
    #: Quantum of level 0 in milliseconds; ``None`` = auto: the standalone
    #: time of ``auto_quantum_decode_steps`` decode steps at 512 tokens of
    #: context on this machine (from the cost model).
    base_quantum_ms: float | None = None
    #: Level k's quantum is ``base * quantum_ratio ** k``.
    quantum_ratio: float = 2.0
    #: Used only when ``base_quantum_ms`` is None.
    auto_quantum_decode_steps: int = 8
    #: Join the highest level whose quantum covers the estimated prefill
    #: time (FastServe's skip-join). False = every request joins level 0.
    skip_join: bool = True
    #: A request not served for this long (since its last step, or since
    #: arrival if it never ran) is promoted to level 0. ``0`` disables.
    starvation_threshold_s: float = 10.0
    #: Path of a calibration file from ``python -m vllm_esp.costmodel.profile``;
    #: ``None`` = the default path for the model, else the analytic fallback.
    calibration_file: str | None = None
    #: Name of the ranking policy (``mlfq``; ``srpt`` and ``fcfs`` exist for
    #: benchmarks and tests, see ``vllm_esp.policy.POLICIES``).
    policy: str = "mlfq"
    #: KV blocks kept free when planning admissions (absorbs lookahead
    #: slots and rounding, so vLLM's own memory preemption stays rare).
    num_reserved_blocks: int = 0

    def __post_init__(self) -> None:
        from vllm_esp.policy import POLICIES  # local: policy imports config

        def bad(name: str, why: str) -> ESPConfigError:
            return ESPConfigError(
                f"invalid MLFQ setting {name}={getattr(self, name)!r}: {why}"
            )

        if not isinstance(self.num_levels, int) or isinstance(self.num_levels, bool) or not 1 <= self.num_levels <= 64:
            raise bad("num_levels", "must be an integer in [1, 64]")
        if self.base_quantum_ms is not None and not (
            isinstance(self.base_quantum_ms, (int, float))
            and math.isfinite(self.base_quantum_ms)
            and self.base_quantum_ms > 0
        ):
            raise bad("base_quantum_ms", "must be a positive number of milliseconds or null (auto)")
        if not (isinstance(self.quantum_ratio, (int, float)) and math.isfinite(self.quantum_ratio) and self.quantum_ratio > 1.0):
            raise bad("quantum_ratio", "must be a number > 1")
        if not isinstance(self.auto_quantum_decode_steps, int) or self.auto_quantum_decode_steps < 1:
            raise bad("auto_quantum_decode_steps", "must be an integer >= 1")
        if not isinstance(self.skip_join, bool):
            raise bad("skip_join", "must be true or false")
        if not (isinstance(self.starvation_threshold_s, (int, float)) and math.isfinite(self.starvation_threshold_s) and self.starvation_threshold_s >= 0):
            raise bad("starvation_threshold_s", "must be a number of seconds >= 0 (0 disables promotion)")
        if self.policy not in POLICIES:
            raise bad("policy", f"unknown policy; choose from {sorted(POLICIES)}")
        if not isinstance(self.num_reserved_blocks, int) or self.num_reserved_blocks < 0:
            raise bad("num_reserved_blocks", "must be an integer >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MLFQConfig:
        """Build from a plain dict, rejecting unknown keys by name."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ESPConfigError(
                f"unknown MLFQ setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MLFQConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ESPConfigError(f"MLFQ settings are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ESPConfigError("MLFQ settings must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> MLFQConfig:
        return cls.from_dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
