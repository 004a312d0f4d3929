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
#: ``additional_config`` key of :class:`SwapConfig` (scheduler ``mlfq-swap``).
SWAP_CONFIG_KEY = "swap"


class ESPConfigError(ValueError):
    """An invalid vllm-esp setting. The message names the setting."""

class _Settings:
    """Dict/JSON loading shared by the frozen settings dataclasses: unknown
    keys and malformed JSON are refused with the section's name."""

    #: Human name of the section in error messages, e.g. "MLFQ".
    _label: str = ""
    #: Key of the section in ``VllmConfig.additional_config``.
    _key: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None):
        """Build from a plain dict, rejecting unknown keys by name."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ESPConfigError(
                f"unknown {cls._label} setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ESPConfigError(f"{cls._label} settings are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ESPConfigError(f"{cls._label} settings must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None):
        return cls.from_dict((additional_config or {}).get(cls._key))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]



@dataclass(frozen=True)
class MLFQConfig(_Settings):
    """Skip-join MLFQ settings (see ``vllm_esp/policy/mlfq.py``).

    Service is charged in *standalone seconds* from the calibrated cost
    model (``vllm_esp/costmodel/model.py`` says why), so quanta are seconds.
    """

    _label = 'MLFQ'
    _key = ADDITIONAL_CONFIG_KEY

    #: Number of priority levels K. Level 0 is the highest. The default of
    #: 2 ("first quantum first, then FCFS") is what measured best on
    #: ShareGPT, whose output lengths have an increasing hazard rate, so
    #: deeper least-attained-service levels only add round-robin delay
    #: (benchmarks/sim_jct.py, README "Results"); use 6-8 for heavy-tailed
    #: workloads, as FastServe does.
    num_levels: int = 2
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SwapConfig(_Settings):
    """Host-memory KV swap settings of the ``mlfq-swap`` scheduler
    (``additional_config["swap"]``; see ``vllm_esp/kv/`` and the "Host KV
    swap" section of CONTRIBUTING.md).

    Read by both halves of the swap connector: the scheduler side (in
    EngineCore) sizes its host-slot bookkeeping from it and the worker side
    allocates the host tensors, so both derive the same slot count from the
    same numbers.
    """

    _label = 'swap'
    _key = SWAP_CONFIG_KEY

    #: Host pool size in GiB (pinned memory on CUDA, plain memory on CPU).
    #: 4 GiB is vLLM's former ``swap_space`` default: enough for ~80k tokens
    #: of an 8B GQA model, small next to a serving host's RAM.
    host_pool_gib: float = 4.0
    #: Exact pool size in KV blocks; overrides ``host_pool_gib`` when set.
    #: ``0`` = no pool: every preemption falls back to recompute.
    host_pool_blocks: int | None = None
    #: Free device blocks the scheduler aims to keep: whenever fewer are
    #: free after a step's plan, the lowest-ranked paused residents are
    #: offloaded to host (while the host pool can take them) until this
    #: many are free again. A target, never an admission gate: a newcomer
    #: that fits in the free blocks is always admitted, even into the
    #: reserve (refusing it stalled admissions while paused residents held
    #: the memory: issue 3). Swapped requests are prefetched only above it.
    #: ``None`` = ``max_num_seqs`` (FastServe's rule: one spare block per
    #: batch slot, so every running request can cross a block boundary
    #: without a preemption); ``0`` disables proactive offload (evictions
    #: then happen only when a higher-ranked request needs the memory).
    free_block_reserve: int | None = None
    #: Swapped requests brought back ahead of their turn (load in flight or
    #: loaded and waiting), at most. Each one holds device blocks it does not
    #: compute with yet, so keep it small; ``0`` disables prefetch.
    prefetch_depth: int = 2

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ESPConfigError:
            return ESPConfigError(
                f"invalid swap setting {name}={getattr(self, name)!r}: {why}"
            )

        gib = self.host_pool_gib
        if not (isinstance(gib, (int, float)) and not isinstance(gib, bool)
                and math.isfinite(gib) and gib > 0):
            raise bad("host_pool_gib", "must be a positive number of GiB")
        if self.host_pool_blocks is not None and not (
            _is_int(self.host_pool_blocks) and self.host_pool_blocks >= 0
        ):
            raise bad("host_pool_blocks", "must be an integer >= 0 or null (use host_pool_gib)")
        if self.free_block_reserve is not None and not (
            _is_int(self.free_block_reserve) and self.free_block_reserve >= 0
        ):
            raise bad("free_block_reserve", "must be an integer >= 0 or null (= max_num_seqs)")
        if not (_is_int(self.prefetch_depth) and self.prefetch_depth >= 0):
            raise bad("prefetch_depth", "must be an integer >= 0 (0 disables prefetch)")

    def num_host_blocks(self, block_bytes: int) -> int:
        """Host slots for KV blocks of ``block_bytes`` bytes (all layers)."""
        if self.host_pool_blocks is not None:
            return self.host_pool_blocks
        if block_bytes <= 0:
            raise ESPConfigError(f"KV block size must be positive, got {block_bytes} bytes")
        return int(self.host_pool_gib * 2**30) // block_bytes

    def resolved_reserve(self, max_num_seqs: int) -> int:
        """``free_block_reserve`` with ``None`` resolved."""
        return max_num_seqs if self.free_block_reserve is None else self.free_block_reserve
