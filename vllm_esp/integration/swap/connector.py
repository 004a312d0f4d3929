"""``HostSwapConnector``: preemption by host-memory KV swap, as an
out-of-tree vLLM KV connector.

Selected by ``--scheduler mlfq-swap`` (``vllm_esp.core.choices``):
:func:`vllm_esp.integration.engine_args.swap_kv_transfer_config` sets
``kv_transfer_config`` to ``kv_connector="HostSwapConnector"``,
``kv_connector_module_path="vllm_esp.integration.swap.connector"``,
``kv_role="kv_both"``. vLLM builds one instance per process:

* **scheduler role** (EngineCore): owns the :class:`~vllm_esp.core.swap.book.SwapBook`.
  ``MLFQScheduler._preempt_request`` calls :meth:`on_preempt` before vLLM
  frees the victim's blocks; on resume vLLM asks
  :meth:`get_num_new_matched_tokens` (the swapped tokens beyond the local
  prefix-cache hit) and, after allocating, :meth:`update_state_after_alloc`
  (which blocks to fill); :meth:`build_connector_meta` ships the step's
  copies to the workers.
* **worker role**: a :class:`~vllm_esp.kernels.swap_copy.SwapCopyEngine` over
  the registered KV tensors runs the swap-outs in ``handle_preemptions``
  (vLLM calls it before a freed block can be reused), the loads in
  ``start_load_kv`` (before the forward when a request resumes now, i.e.
  ``has_sync_kv_loads``), and reports finished prefetches (vLLM's async
  load path, ``WAITING_FOR_REMOTE_KVS``) through ``get_finished``.

Copy times travel back as worker metadata; every swap number reaches
``/metrics`` through the scheduler's ``vllm_esp:`` stats (see
``vllm_esp/integration/metrics.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

from vllm_esp.core.swap.book import BlockCopy, SwapBook, SwapState
from vllm_esp.core.swap.config import SwapConfig

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from vllm_esp.kernels.swap_copy import SwapCopyEngine

logger = init_logger(f"vllm.{__name__}")

#: KV cache specs whose blocks hold exactly the request's tokens' KV.
_SUPPORTED_SPECS = (FullAttentionSpec, MLAAttentionSpec)


@dataclass
class HostSwapMetadata(KVConnectorMetadata):
    """Scheduler -> worker: one step's copies."""

    swap_out: tuple[BlockCopy, ...] = ()
    swap_in: tuple[BlockCopy, ...] = ()
    prefetch: tuple[BlockCopy, ...] = ()
    #: A block swapped out this step is allocated again this step: the
    #: forward must wait for the swap-out (CUDA; else it overlaps).
    out_blocks_reused: bool = False


@dataclass
class HostSwapWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: copy time since the last step, microseconds."""

    swap_out_us: int = 0
    swap_in_us: int = 0

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        # Tensor-parallel workers copy their shards at the same time.
        assert isinstance(other, HostSwapWorkerMetadata)
        return HostSwapWorkerMetadata(
            max(self.swap_out_us, other.swap_out_us), max(self.swap_in_us, other.swap_in_us)
        )


def kv_block_bytes(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one KV block over all layers (one host slot)."""
    (group,) = kv_cache_config.kv_cache_groups
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)


class HostSwapConnector(KVConnectorBase_V1):
    """Swap-to-host KV connector for the ``mlfq-swap`` scheduler."""

    #: No thread of its own (copies run in the worker's main thread, CUDA
    #: ones on a side stream): vLLM's CPU executor need not reserve a core
    #: for it (``vllm_esp/integration/patches/cpu_cores.py``; without this, 2-core
    #: machines bind the worker's OpenMP team to the EngineCore's core).
    requires_reserved_cpu: ClassVar[bool] = False

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.swap_config = SwapConfig.from_additional_config(vllm_config.additional_config)
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or type(groups[0].kv_cache_spec) not in _SUPPORTED_SPECS:
            # Sliding-window, rolling and Mamba groups drop or rewrite blocks
            # behind the scheduler's back; a whole-block copy of them is not
            # a faithful copy of the request's state. (Exact types: some
            # FullAttentionSpec subclasses roll their window.)
            raise ValueError(
                "HostSwapConnector (scheduler mlfq-swap) supports models with one "
                f"full-attention KV cache group; this model has {[type(g.kv_cache_spec).__name__ for g in groups]}"
            )
        self.block_size = groups[0].kv_cache_spec.block_size
        self.block_bytes = kv_block_bytes(kv_cache_config)
        self.num_host_blocks = self.swap_config.num_host_blocks(self.block_bytes)
        self.num_device_blocks = kv_cache_config.num_blocks
        # Scheduler side.
        self.book = SwapBook(self.num_host_blocks, self.block_size)
        self._local_hit: dict[str, int] = {}
        self._prefetch_ids: set[str] = set()
        self.swap_out_us = 0
        self.swap_in_us = 0
        # Worker side (register_kv_caches).
        self.copy_engine: SwapCopyEngine | None = None
        if role == KVConnectorRole.SCHEDULER:
            logger.info(
                "vllm-esp host KV swap: %d host blocks of %d KiB (%.2f GiB), reserve=%s, prefetch_depth=%d",
                self.num_host_blocks,
                self.block_bytes // 1024,
                self.num_host_blocks * self.block_bytes / 2**30,
                self.swap_config.free_block_reserve,
                self.swap_config.prefetch_depth,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        # A host copy is a cache of the request's own KV, not a hand-off:
        # a preempted request keeps (rather than drops) its in-flight output.
        return False

    # ================================================= scheduler side
    def on_preempt(self, request: Request, block_ids: list[int], num_computed_tokens: int) -> bool:
        """Plan the swap-out of a request about to be preempted (its blocks
        are still allocated). False: recompute (host full, or nothing to keep)."""
        if request.skip_reading_prefix_cache:
            return False  # vLLM would never load it back
        return self.book.swap_out(request.request_id, block_ids, num_computed_tokens)

    def swapped_tokens(self, request_id: str) -> int:
        return self.book.swapped_tokens(request_id)

    def state(self, request_id: str) -> SwapState | None:
        return self.book.state(request_id)

    def mark_prefetch(self, request_ids: set[str]) -> None:
        """Load these (SWAPPED) requests asynchronously if vLLM admits them
        in the coming ``schedule()``; cleared by :meth:`build_connector_meta`."""
        self._prefetch_ids = set(request_ids)

    def clear_prefetch_marks(self) -> None:
        self._prefetch_ids = set()

    def unprefetch(self, request_id: str) -> None:
        self.book.unprefetch(request_id)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        request_id = request.request_id
        swapped = self.book.swapped_tokens(request_id)
        # Leave at least one token to compute (it produces the next token).
        num = min(swapped, request.num_tokens - 1) - num_computed_tokens
        prefetch = request_id in self._prefetch_ids
        if num <= 0:
            # A prefetch candidate must not be admitted to compute: its slot
            # was never planned. "Ask again later" makes vLLM skip it.
            return (None, False) if prefetch else (0, False)
        self._local_hit[request_id] = num_computed_tokens
        return num, prefetch

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        request_id = request.request_id
        local = self._local_hit.pop(request_id, None)
        if self.book.state(request_id) is not SwapState.SWAPPED:
            return
        if num_external_tokens == 0 or local is None:
            # Admitted without our load (the prefix cache held the KV, or
            # the request cannot read cached KV): the copy is useless now.
            self.book.drop(request_id)
            return
        self.book.plan_load(
            request_id,
            blocks.get_block_ids()[0],
            local,
            num_external_tokens,
            asynchronous=request_id in self._prefetch_ids,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        for request_id in scheduler_output.num_scheduled_tokens:
            if self.book.state(request_id) is SwapState.PREFETCHED:
                self.book.resumed(request_id)
        self._prefetch_ids = set()
        self._local_hit.clear()
        step = self.book.take_step()
        reused = False
        if step.swap_out:
            out_blocks = {b for c in step.swap_out for b in c.device_blocks}
            reused = any(
                not out_blocks.isdisjoint(ids) for ids in _allocated_block_ids(scheduler_output)
            )
        return HostSwapMetadata(step.swap_out, step.swap_in, step.prefetch, reused)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for request_id in connector_output.finished_recving or ():
            self.book.load_finished(request_id)
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, HostSwapWorkerMetadata):
            self.swap_out_us += meta.swap_out_us
            self.swap_in_us += meta.swap_in_us

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Device blocks: vLLM frees them (and holds them while a prefetch is
        # in flight, until get_finished reports it). Host slots: ours.
        self.book.finished(request.request_id)
        self._local_hit.pop(request.request_id, None)
        return False, None

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return (0,)  # the request's own blocks, of the only group

    def reset_cache(self) -> bool | None:
        return self.book.reset()

    def swap_stats(self) -> dict[str, int]:
        """Cumulative counters and gauges, keyed as exported (no prefix)."""
        c = self.book.counters
        return {
            "swap_out_requests_total": c.swap_out_requests,
            "swap_out_blocks_total": c.swap_out_blocks,
            "swap_out_bytes_total": c.swap_out_blocks * self.block_bytes,
            "swap_in_requests_total": c.swap_in_requests,
            "swap_in_blocks_total": c.swap_in_blocks,
            "swap_in_bytes_total": c.swap_in_blocks * self.block_bytes,
            "swap_out_time_us_total": self.swap_out_us,
            "swap_in_time_us_total": self.swap_in_us,
            "swap_prefetches_total": c.prefetches,
            "swap_unprefetches_total": c.unprefetches,
            "swap_recompute_fallbacks_total": c.recompute_fallbacks,
            "swap_dropped_total": c.dropped,
            "swap_host_blocks_used": self.book.num_used_blocks,
            "swap_host_pool_blocks": self.num_host_blocks,
            "swap_swapped_requests": len(self.book),
        }

    # ==================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm_esp.kernels.swap_copy import SwapCopyEngine  # torch: worker only

        self.copy_engine = SwapCopyEngine(kv_caches, self.num_device_blocks, self.num_host_blocks)
        logger.info(
            "vllm-esp host KV pool: %d blocks x %d bytes over %d copy units (%s)",
            self.num_host_blocks,
            self.copy_engine.block_bytes,
            len(self.copy_engine.units),
            "pinned, side stream" if self.copy_engine.is_cuda else "synchronous",
        )

    def _engine(self) -> SwapCopyEngine:
        if self.copy_engine is None:
            raise RuntimeError("HostSwapConnector: KV caches were never registered")
        return self.copy_engine

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, HostSwapMetadata)
        self._engine().swap_out(
            kv_connector_metadata.swap_out, kv_connector_metadata.out_blocks_reused
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HostSwapMetadata)
        engine = self._engine()
        engine.swap_in(meta.swap_in)
        engine.prefetch(meta.prefetch)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete (or are fenced) before the forward

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return None  # nothing is saved during the forward: only on preemption

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.copy_engine is None:
            return None, None
        done = self.copy_engine.finished_prefetches()
        return None, (done or None)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.copy_engine is None:
            return None
        seconds = self.copy_engine.take_seconds()
        out_us, in_us = round(seconds["out"] * 1e6), round(seconds["in"] * 1e6)
        if not out_us and not in_us:
            return None
        return HostSwapWorkerMetadata(out_us, in_us)

    def shutdown(self) -> None:
        if self.copy_engine is not None:
            self.copy_engine.synchronize()


def _allocated_block_ids(scheduler_output: SchedulerOutput) -> Iterator[list[int]]:
    """Block ids handed to requests in this step (new and resumed ones get
    their whole table, running ones the blocks appended)."""
    for new in scheduler_output.scheduled_new_reqs:
        if new.block_ids:
            yield new.block_ids[0]
    for ids in scheduler_output.scheduled_cached_reqs.new_block_ids:
        if ids:
            yield ids[0]


def measure_copy_bandwidth(worker: Any, num_blocks: int, repeats: int = 5) -> dict[str, float]:
    """``collective_rpc`` target (benchmarks): time the copy engine of this
    worker against a plain copy of the same bytes. Idle engines only."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    assert isinstance(connector, HostSwapConnector), type(connector)
    return connector._engine().measure(num_blocks, repeats)
