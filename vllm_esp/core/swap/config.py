"""``SwapConfig``: host-memory KV swap settings (``additional_config["swap"]``)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_esp.core.settings import Settings, SettingsError, is_int, is_number

SWAP_CONFIG_KEY = "swap"


@dataclass(frozen=True)
class SwapConfig(Settings):
    """Host-memory KV swap settings of the ``mlfq-swap`` scheduler
    (``additional_config["swap"]``; see ``vllm_esp/integration/swap/`` and the "Host KV
    swap" section of CONTRIBUTING.md).

    Read by both halves of the swap connector: the scheduler side (in
    EngineCore) sizes its host-slot bookkeeping from it and the worker side
    allocates the host tensors, so both derive the same slot count from the
    same numbers.
    """

    label = "swap"
    key = SWAP_CONFIG_KEY

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
    #: reserve, because refusing it would stall admissions while MLFQ's
    #: paused residents hold the memory. Swapped requests are prefetched
    #: only above it.
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
        bad = self.invalid
        if not (is_number(self.host_pool_gib) and self.host_pool_gib > 0):
            raise bad("host_pool_gib", "must be a positive number of GiB")
        if self.host_pool_blocks is not None and not (
            is_int(self.host_pool_blocks) and self.host_pool_blocks >= 0
        ):
            raise bad("host_pool_blocks", "must be an integer >= 0 or null (use host_pool_gib)")
        if self.free_block_reserve is not None and not (
            is_int(self.free_block_reserve) and self.free_block_reserve >= 0
        ):
            raise bad("free_block_reserve", "must be an integer >= 0 or null (= max_num_seqs)")
        if not (is_int(self.prefetch_depth) and self.prefetch_depth >= 0):
            raise bad("prefetch_depth", "must be an integer >= 0 (0 disables prefetch)")

    def num_host_blocks(self, block_bytes: int) -> int:
        """Host slots for KV blocks of ``block_bytes`` bytes (all layers)."""
        if self.host_pool_blocks is not None:
            return self.host_pool_blocks
        if block_bytes <= 0:
            raise SettingsError(f"KV block size must be positive, got {block_bytes} bytes")
        return int(self.host_pool_gib * 2**30) // block_bytes

    def resolved_reserve(self, max_num_seqs: int) -> int:
        """``free_block_reserve`` with ``None`` resolved."""
        return max_num_seqs if self.free_block_reserve is None else self.free_block_reserve
