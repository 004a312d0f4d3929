"""Elastic placement policies (torch-free): on how many instances a request runs.

The ranking policy (MLFQ, FCFS, ...) decides *which* requests run in a
step; an :class:`ElasticPolicy` decides *where*: which instances compute a
prefill chunk (its degree of parallelism, DoP), which instances store new
KV blocks, and which blocks migrate to consolidate a request. The ESP
scheduler calls it once per scheduled request and step; the simulator and
the tests call the same code.

:class:`ThresholdElasticPolicy` is the first policy (LoongServe's
four-step scheduler with a fitted cost model can replace it behind the
same interface):

* **prefill DoP**: the fewest instances whose share of the chunk's
  estimated time (cost model) is within ``prefill_target_s``, capped by
  ``max_prefill_instances``; the instances with the most free blocks.
* **the hostage bound**: while decodes are resident, a prefill chunk is
  cut to the largest one whose share at its DoP is within
  ``max_decode_stall_s`` (:func:`bounded_prefill_chunk`), and the DoP
  target becomes ``min(prefill_target_s, max_decode_stall_s)``; the step
  is synchronous across instances, so every decode waits for the chunk.
* **scale-down**: the chunk's KV is *stored* on the fewest instances that
  hold the whole prompt (most free first), while it is *computed* on the
  DoP instances; tokens computed elsewhere are shipped to their storage
  instance during the forward (LoongServe's proactive migration).
* **decode / scale-up**: new blocks stay on the instance of the request's
  last block, unless that instance is out of memory or masters more than
  ``decode_scale_up_batch`` decodes: then the new block goes to the least
  loaded other instance and the group grows without moving KV (0 forces a
  scale-up at every block boundary; tests use it).
* **consolidation**: a decoding request spread over several instances
  moves up to ``migrate_blocks_per_step`` blocks per step onto its largest
  shard's instance when that instance has room (fewer partial-attention
  exchanges per token, and whole instances freed for long prefills).

The scheduler builds the policy named by ``ESPConfig.placement`` through
``vllm_esp.core.esp.registry.make_elastic_policy`` (each policy's
:meth:`ElasticPolicy.from_settings` reads the settings it needs) and sees it
only through the interface. A cluster-level policy (LoongServe's
scheduler, ``loong/elastic.py``) also gets the whole cluster once per step
(:meth:`ElasticPolicy.begin_step`) and answers ``place`` from its plan.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from vllm_esp.core.esp.cluster import ClusterView
from vllm_esp.core.esp.cost_model import ESPCostModel

if TYPE_CHECKING:  # config.py imports the registry, which imports this module
    from vllm_esp.core.esp.config import ESPConfig

__all__ = [
    "Consolidation",
    "ElasticPolicy",
    "InstanceLoad",
    "PrefillTime",
    "RequestPlacementView",
    "StepPlacement",
    "StoragePlacement",
    "ThresholdElasticPolicy",
    "bounded_prefill_chunk",
    "decodes_waiting",
]

#: Estimated standalone time (s) of ``num_new_tokens`` after
#: ``num_computed_tokens`` cached ones (``StepCostModel.chunk_time``).
PrefillTime = Callable[[int, int], float]


@dataclass(frozen=True)
class StoragePlacement:
    """Where the next new blocks of one request go.

    ``instances`` are tried in order; ``stripe`` deals blocks round-robin over
    them instead of filling the first. If they run out, the instance with
    the most free blocks takes the rest (placement is a preference: an
    allocation the scheduler admitted never fails).
    """

    instances: tuple[int, ...]
    stripe: bool = False


@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the policy sees it at the start of a step."""

    instance: int
    num_free_blocks: int
    num_blocks: int
    #: Decoding requests whose last block is here (it computes their token).
    num_decodes: int = 0


@dataclass(frozen=True)
class RequestPlacementView:
    """One scheduled request as the policy sees it."""

    req_id: str
    num_prompt_tokens: int
    #: Tokens whose KV exists before this step.
    num_computed_tokens: int
    #: Tokens computed in this step.
    num_new_tokens: int
    #: Blocks held per instance before this step.
    blocks_per_instance: tuple[int, ...]
    #: Instance of the request's last block (None: holds no block yet).
    last_block_instance: int | None
    block_size: int

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass(frozen=True)
class StepPlacement:
    """A request's placement for one step."""

    #: Instances computing the step's tokens (token ``k`` on ``compute[k % d]``).
    compute: tuple[int, ...]
    #: Where the step's new blocks go.
    storage: StoragePlacement
    #: Why (for metrics and logs): "prefill", "decode", "scale-up".
    reason: str = "prefill"


class Consolidation(NamedTuple):
    """Blocks of one decoding request to migrate in this step."""

    src: int
    dst: int
    num_blocks: int


class ElasticPolicy(ABC):
    """Interface of elastic placement policies; see the module docstring."""

    name: ClassVar[str] = ""
    #: The hostage bound the policy keeps (s): while decodes are resident,
    #: no prefill chunk of more than one token has an estimated share above
    #: it at its DoP (``ESPStepPlan.check_invariants``). None: no bound.
    max_decode_stall_s: float | None = None
    #: Waiting requests this step's plan keeps from starting (read after
    #: :meth:`begin_step`; the ranking policy skips them). Empty: the
    #: ranking policy alone admits.
    held_back: frozenset[str] = frozenset()

    @classmethod
    @abstractmethod
    def from_settings(
        cls,
        settings: ESPConfig,
        *,
        num_instances: int,
        prefill_time: PrefillTime,
        esp_cost: ESPCostModel,
    ) -> ElasticPolicy:
        """Build the policy from the ESP settings; each policy reads the
        settings it needs (the registry calls this, never ``__init__``).

        ``prefill_time`` is one instance's calibrated chunk time;
        ``esp_cost`` the cluster cost model (per DoP, decode, migration)."""

    @property
    def plans_steps(self) -> bool:
        """Whether :meth:`begin_step` wants the cluster view every step
        (by default: a policy that overrides it)."""
        return type(self).begin_step is not ElasticPolicy.begin_step

    def begin_step(self, view: ClusterView) -> None:
        """Called once per step before any :meth:`place`, with the whole cluster."""

    @abstractmethod
    def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
        """Compute and storage instances for ``request`` in this step."""

    def max_prefill_tokens(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> int:
        """Most of ``request.num_new_tokens`` it may compute in this step
        (asked before :meth:`place`, which then sees the cut chunk); by
        default, all of them."""
        return request.num_new_tokens

    def compute_instances(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> tuple[int, ...]:
        """The instances :meth:`place` would compute ``request``'s chunk on,
        without placing it (the scheduler keeps each one's share of a chunk
        within what is left of its per-instance token budget). By default,
        asks :meth:`place`; a policy whose ``place`` keeps state overrides it."""
        return self.place(request, loads).compute

    @property
    def consolidates(self) -> bool:
        """Whether :meth:`consolidate` may ever propose a migration.

        False lets the scheduler skip the per-step walk over the decodes.
        By default, a policy that overrides :meth:`consolidate` is asked.
        """
        return type(self).consolidate is not ElasticPolicy.consolidate

    def consolidate(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> Consolidation | None:
        """Blocks to migrate for a decoding request in this step, or None."""
        return None


class ThresholdElasticPolicy(ElasticPolicy):
    """The first elastic policy: DoP by target time, scale-down, scale-up, consolidation."""

    name = "threshold"

    def __init__(
        self,
        num_instances: int,
        *,
        prefill_time: PrefillTime,
        prefill_target_s: float,
        max_prefill_instances: int | None = None,
        decode_scale_up_batch: int = 64,
        migrate_blocks_per_step: int = 0,
        prefill_storage: str = "fewest",
        max_decode_stall_s: float | None = None,
    ) -> None:
        if num_instances < 1:
            raise ValueError("num_instances must be >= 1")
        self.num_instances = num_instances
        self.prefill_time = prefill_time
        self.prefill_target_s = prefill_target_s
        self.max_prefill_instances = min(max_prefill_instances or num_instances, num_instances)
        self.decode_scale_up_batch = decode_scale_up_batch
        self.migrate_blocks_per_step = migrate_blocks_per_step
        if prefill_storage not in ("fewest", "stripe"):
            raise ValueError(f"unknown prefill_storage {prefill_storage!r}")
        self.prefill_storage = prefill_storage
        if max_decode_stall_s is not None and not max_decode_stall_s > 0:
            raise ValueError(f"max_decode_stall_s must be > 0 or None, got {max_decode_stall_s!r}")
        self.max_decode_stall_s = max_decode_stall_s

    @classmethod
    def from_settings(
        cls,
        settings: ESPConfig,
        *,
        num_instances: int,
        prefill_time: PrefillTime,
        esp_cost: ESPCostModel,
    ) -> ThresholdElasticPolicy:
        return cls(
            num_instances,
            prefill_time=prefill_time,
            prefill_target_s=settings.prefill_target_ms / 1000.0,
            max_prefill_instances=settings.max_prefill_instances,
            decode_scale_up_batch=settings.decode_scale_up_batch,
            migrate_blocks_per_step=settings.migrate_blocks_per_step,
            prefill_storage=settings.prefill_storage,
            max_decode_stall_s=settings.decode_stall_s(prefill_time),
        )

    @property
    def consolidates(self) -> bool:
        return self.migrate_blocks_per_step > 0

    # ------------------------------------------------------------------ prefill
    def prefill_dop(
        self, num_new_tokens: int, num_computed_tokens: int, decodes_wait: bool = False
    ) -> int:
        """Fewest instances that bring the chunk's time within the target
        (within the hostage bound too while decodes wait)."""
        estimate = self.prefill_time(num_new_tokens, num_computed_tokens)
        target = self.prefill_target_s
        if decodes_wait and self.max_decode_stall_s is not None:
            target = min(target, self.max_decode_stall_s)
        if target <= 0:
            return self.max_prefill_instances
        dop = max(1, math.ceil(estimate / target))
        # No instance gets less than one token.
        return max(1, min(dop, self.max_prefill_instances, num_new_tokens))

    def max_prefill_tokens(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> int:
        if self.max_decode_stall_s is None or not decodes_waiting(loads):
            return request.num_new_tokens
        # Only a chunk that starts inside the prompt is spread (place());
        # recomputing output tokens of a resumed request runs on one instance.
        max_dop = self.max_prefill_instances if request.is_prefill else 1
        return bounded_prefill_chunk(
            self.prefill_time,
            request.num_new_tokens,
            request.num_computed_tokens,
            max_dop=max_dop,
            max_stall_s=self.max_decode_stall_s,
        )

    def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
        by_free = sorted(loads, key=lambda load: (-load.num_free_blocks, load.instance))
        if request.is_prefill:
            dop = self.prefill_dop(
                request.num_new_tokens, request.num_computed_tokens, decodes_waiting(loads)
            )
            compute = tuple(sorted(load.instance for load in by_free[:dop]))
            if self.prefill_storage == "stripe":
                return StepPlacement(compute, StoragePlacement(compute, stripe=True), "prefill")
            return StepPlacement(compute, self._prefill_storage(request, by_free), "prefill")
        return self._decode(request, loads, by_free)

    def _prefill_storage(
        self, request: RequestPlacementView, by_free: list[InstanceLoad]
    ) -> StoragePlacement:
        # Blocks still needed for the whole prompt plus the first output token.
        bs = request.block_size
        held = sum(request.blocks_per_instance)
        needed = max(0, -(-(request.num_prompt_tokens + 1) // bs) - held)
        chosen: list[int] = []
        # Keep growing where the request already is (its last block first).
        if request.last_block_instance is not None:
            chosen.append(request.last_block_instance)
        for load in by_free:
            if sum(_free_of(by_free, i) for i in chosen) >= needed:
                break
            if load.instance not in chosen:
                chosen.append(load.instance)
        return StoragePlacement(tuple(chosen), stripe=False)

    # ------------------------------------------------------------------ decode
    def _decode(
        self, request: RequestPlacementView, loads: list[InstanceLoad], by_free: list[InstanceLoad]
    ) -> StepPlacement:
        home = request.last_block_instance
        if home is not None:
            load = loads[home]
            if load.num_free_blocks > 0 and load.num_decodes <= self.decode_scale_up_batch:
                return StepPlacement((home,), StoragePlacement((home,)), "decode")
        # Scale up: the least loaded other instance with memory takes the next
        # block; the group grows and no KV moves.
        with_room = [load for load in loads if load.num_free_blocks > 0]
        candidates = (
            [load for load in with_room if load.instance != home] or with_room or list(loads)
        )
        target = min(
            candidates, key=lambda load: (load.num_decodes, -load.num_free_blocks, load.instance)
        )
        reason = "scale-up" if home is not None and target.instance != home else "decode"
        return StepPlacement((target.instance,), StoragePlacement((target.instance,)), reason)

    def consolidate(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> Consolidation | None:
        if self.migrate_blocks_per_step <= 0 or request.is_prefill:
            return None
        shards = [(n, i) for i, n in enumerate(request.blocks_per_instance) if n > 0]
        if len(shards) < 2:
            return None
        _, dst = max(shards, key=lambda s: (s[0], -s[1]))
        # Move the smallest shard first: it is the one that frees a peer.
        _, src = min((s for s in shards if s[1] != dst), key=lambda s: (s[0], s[1]))
        # Leave the destination one block for its own growth.
        room = loads[dst].num_free_blocks - 1
        count = min(self.migrate_blocks_per_step, request.blocks_per_instance[src], room)
        if count <= 0:
            return None
        return Consolidation(src, dst, count)


def decodes_waiting(loads: list[InstanceLoad]) -> bool:
    """Whether any decode is resident (scheduled in the step or paused): each
    waits for every prefill chunk of the step, on whichever instances."""
    return any(load.num_decodes > 0 for load in loads)


def bounded_prefill_chunk(
    prefill_time: PrefillTime,
    num_new_tokens: int,
    num_computed_tokens: int,
    *,
    max_dop: int,
    max_stall_s: float,
) -> int:
    """The largest chunk of at most ``num_new_tokens`` whose estimated time,
    shared by its DoP, is within ``max_stall_s``; never under one token.

    A chunk of ``q`` tokens fits iff ``prefill_time(q, k) <= min(q, max_dop)
    * max_stall_s``: the fewest instances whose share is within the bound
    (at most ``max_dop``, at most one per token) then exist. From ``max_dop``
    tokens on the budget is fixed and the time grows with ``q``, so a
    bisection finds the largest fit; below it each token adds an instance
    to the budget, so the few candidates are tried one by one.
    """

    def fits(q: int) -> bool:
        return prefill_time(q, num_computed_tokens) <= min(q, max_dop) * max_stall_s

    if num_new_tokens <= 1 or fits(num_new_tokens):
        return num_new_tokens
    lo = min(max_dop, num_new_tokens)
    if fits(lo):
        hi = num_new_tokens  # does not fit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo
    return next((q for q in range(lo - 1, 1, -1) if fits(q)), 1)


def _free_of(by_free: list[InstanceLoad], instance: int) -> int:
    for load in by_free:
        if load.instance == instance:
            return load.num_free_blocks
    return 0
