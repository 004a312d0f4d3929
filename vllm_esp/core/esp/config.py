"""``ESPConfig``: settings of ``--scheduler esp`` (``additional_config["esp"]``).

Validated in the front end (``--esp-config`` / ``--esp-instances`` fail at
parse time) and again in EngineCore by the scheduler and the executor,
which both read the same dict, so they agree on the instance count and
geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_esp.core.esp.placement import PrefillTime
from vllm_esp.core.esp.registry import ELASTIC_POLICIES
from vllm_esp.core.settings import Settings, is_int, is_number

ESP_CONFIG_KEY = "esp"
BACKENDS = ("mp", "ray")
PREFILL_STORAGE = ("fewest", "stripe")
#: ``max_decode_stall_ms`` auto: this many one-request decode steps.
DECODE_STALL_STEPS = 4


@dataclass(frozen=True)
class ESPConfig(Settings):
    """Elastic sequence parallelism across ``num_instances`` model replicas.

    **The hostage bound** (``max_decode_stall_ms``). An ESP step is one
    synchronous step across the instances, so every decode in it, on any
    instance, waits for the step's prefill chunks layer by layer. While
    decodes are resident (scheduled in the step or paused), each prefill
    chunk is cut so that its estimated time (cost model) at its DoP is
    within the bound, and its DoP is the fewest instances whose share is
    within ``min(prefill_target_ms, bound)``: the chunk and the DoP both
    come from the cost model against the bound. With no decode resident a
    chunk is as large as vLLM's token budget allows. A one-token chunk
    always runs (it costs what a decode of the same context costs), so a
    prefill never stops. The bound is per chunk: two prefills in one step
    each keep to it.

    The auto default (null) is ``DECODE_STALL_STEPS`` = 4 times the cost
    model's one-request decode step, ``decode_time(0)``: a decode that
    shares a step with a prefill chunk waits for it at most as long as 4
    decode steps take, so its time per output token stays within about 5x
    of decoding alone, on whatever machine the cost model describes. Four,
    not one: every chunk pays the fixed per-step cost again, and a bound of
    at least 4 times that cost keeps at least three quarters of every
    bounded chunk's time for the prompt's own tokens.
    """

    label = "ESP"
    key = ESP_CONFIG_KEY

    #: Instances (full model replicas, each with its own KV cache). 1 = the
    #: stock single-instance engine (no ESP executor at all).
    num_instances: int = 1
    #: How instances are started: ``"mp"`` (local processes, vLLM's
    #: ``MultiprocExecutor`` per instance) or ``"ray"`` (Ray actors in one
    #: placement group; multi-node).
    backend: str = "mp"
    #: Ray cluster address for ``backend="ray"`` (None: ``ray.init()``'s default,
    #: i.e. ``RAY_ADDRESS`` or a new local cluster).
    ray_address: str | None = None
    #: Elastic placement policy (``vllm_esp.core.esp.registry.ELASTIC_POLICIES``):
    #: ``"loong"``, LoongServe's scheduler (admission, DoP, retention,
    #: masters, migrations for the whole cluster each step); ``"threshold"``,
    #: the per-request rules that the settings below tune (``loong`` places
    #: what its plan leaves out by them).
    placement: str = "loong"
    #: ESP cluster cost model file (``python -m vllm_esp.calibrate --esp``),
    #: read by the ``loong`` placement; None: derived from one instance's
    #: calibrated step model (other DoPs by the file format's scaling rule).
    cost_model_file: str | None = None
    #: Prefill DoP: the fewest instances whose share of a chunk's estimated
    #: time (cost model) is within this target.
    prefill_target_ms: float = 250.0
    #: Cap on a prefill chunk's DoP (None = num_instances).
    max_prefill_instances: int | None = None
    #: Where a prefill's KV is kept: ``"fewest"`` = the fewest instances that
    #: hold the prompt (scale-down: KV computed elsewhere is shipped there
    #: during the forward); ``"stripe"`` = blocks dealt round-robin over the
    #: computing instances (no shipping, KV spread for the decode phase).
    prefill_storage: str = "fewest"
    #: A prefill chunk of at least this many tokens on several instances
    #: also rotates its request's context of earlier steps (the part its
    #: compute instances store) around the ring, so every instance attends
    #: its own queries to it: that attention is split evenly, for one copy
    #: of the context's KV per instance and layer. Shorter chunks (and
    #: context stored elsewhere) send their queries to where it is stored,
    #: which is cheaper in bytes but puts all of that attention on the
    #: instances storing it. null: never rotate.
    ring_context_min_tokens: int | None = 256
    #: An instance mastering more decodes than this sends new blocks elsewhere
    #: (scale-up without moving KV); 0 = every new decode block goes to the
    #: least loaded instance.
    decode_scale_up_batch: int = 64
    #: Blocks a decoding request may migrate per step to consolidate (0 = off).
    migrate_blocks_per_step: int = 4
    #: The hostage bound: the longest (ms) a step may make resident decodes
    #: wait for one prefill chunk (its estimated time at its DoP). null =
    #: auto, ``DECODE_STALL_STEPS`` one-request decode steps of the cost
    #: model (see the class docstring); 0 = no bound.
    max_decode_stall_ms: float | None = None
    #: CPU only: core list per instance for OpenMP binding, e.g. ["0", "1"]
    #: (None: split the allowed cores evenly).
    cpu_binds: tuple[str, ...] | None = None
    #: CPU only: the head-major copies of spread requests' KV that each
    #: instance keeps across steps, so a decode re-gathers only the block it
    #: appended to (``vllm_esp/kernels/attention/mirror.py``), may take at
    #: most this fraction of the instance's KV cache in extra memory, per
    #: layer; 0 turns them off (every partial gathers its blocks again).
    cpu_kv_mirror_fraction: float = 1.0

    def __post_init__(self) -> None:
        bad = self.invalid
        if not (is_int(self.num_instances) and 1 <= self.num_instances <= 256):
            raise bad("num_instances", "must be an integer in [1, 256]")
        if self.backend not in BACKENDS:
            raise bad("backend", f"choose from {list(BACKENDS)}")
        if self.ray_address is not None and not isinstance(self.ray_address, str):
            raise bad("ray_address", "must be a string or null")
        if self.placement not in ELASTIC_POLICIES:
            raise bad("placement", f"choose from {sorted(ELASTIC_POLICIES)}")
        if self.cost_model_file is not None and not isinstance(self.cost_model_file, str):
            raise bad("cost_model_file", "must be a path string or null")
        if not (is_number(self.prefill_target_ms) and self.prefill_target_ms > 0):
            raise bad("prefill_target_ms", "must be a positive number of milliseconds")
        if self.max_prefill_instances is not None and not (
            is_int(self.max_prefill_instances) and self.max_prefill_instances >= 1
        ):
            raise bad("max_prefill_instances", "must be an integer >= 1 or null")
        if self.prefill_storage not in PREFILL_STORAGE:
            raise bad("prefill_storage", f"choose from {list(PREFILL_STORAGE)}")
        if self.ring_context_min_tokens is not None and not (
            is_int(self.ring_context_min_tokens) and self.ring_context_min_tokens >= 1
        ):
            raise bad("ring_context_min_tokens", "must be an integer >= 1 or null")
        if not (is_int(self.decode_scale_up_batch) and self.decode_scale_up_batch >= 0):
            raise bad("decode_scale_up_batch", "must be an integer >= 0")
        if not (is_int(self.migrate_blocks_per_step) and self.migrate_blocks_per_step >= 0):
            raise bad("migrate_blocks_per_step", "must be an integer >= 0 (0 disables)")
        if self.max_decode_stall_ms is not None and not (
            is_number(self.max_decode_stall_ms) and self.max_decode_stall_ms >= 0
        ):
            raise bad(
                "max_decode_stall_ms", "must be a number of milliseconds >= 0 (0: off) or null"
            )
        if not (is_number(self.cpu_kv_mirror_fraction) and 0 <= self.cpu_kv_mirror_fraction <= 1):
            raise bad("cpu_kv_mirror_fraction", "must be a number in [0, 1] (0: off)")
        if self.cpu_binds is not None:
            binds = self.cpu_binds
            if not (isinstance(binds, (list, tuple)) and all(isinstance(b, str) for b in binds)):
                raise bad("cpu_binds", 'must be a list of core-list strings, e.g. ["0", "1"]')
            if len(binds) != self.num_instances:
                raise bad("cpu_binds", f"needs one entry per instance ({self.num_instances})")
            object.__setattr__(self, "cpu_binds", tuple(binds))

    def decode_stall_s(self, prefill_time: PrefillTime) -> float | None:
        """The hostage bound in seconds for this cost model (None: no bound)."""
        if self.max_decode_stall_ms is None:
            return DECODE_STALL_STEPS * prefill_time(1, 0)
        if self.max_decode_stall_ms == 0:
            return None
        return self.max_decode_stall_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["cpu_binds"] is not None:
            data["cpu_binds"] = list(data["cpu_binds"])
        return data
