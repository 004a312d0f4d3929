"""The ESP runner's order of a step's block operations: swap-outs, then
loads (swap-ins, prefetches), then migrations.

The scheduler plans a step's loads inside vLLM's ``schedule()`` (on the block
tables of that moment) and its consolidating migrations after it, so a
request resumed from host memory this step may have a freshly loaded block
migrated in the same step (the move's source is the load's target). Moving
before loading copied the block's stale contents and the resumed request
attended garbage (``tests/e2e/test_esp_swap.py``'s greedy tokens differed).
No model, no engine: one instance, one layer, the runner's real copy paths.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_esp.core.esp.step_plan import BlockMove, ESPStepPlan
from vllm_esp.core.swap.book import BlockCopy
from vllm_esp.integration.esp.runner import ESPStepRunner
from vllm_esp.integration.swap.connector import HostSwapMetadata

NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, HEAD = 8, 2, 4, 8


def make_runner() -> ESPStepRunner:
    kv = torch.zeros((NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD), dtype=torch.float32)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", kv_cache=kv, isa="vec")
    config = SimpleNamespace(additional_config={"swap": {"host_pool_blocks": 4}})
    return ESPStepRunner(
        config, None, {layer.layer_name: layer}, None, instance=0, device=torch.device("cpu")
    )


def plan(step: int, moves: tuple[BlockMove, ...] = ()) -> ESPStepPlan:
    return ESPStepPlan(
        step=step,
        num_instances=1,
        blocks_per_instance=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        requests=(),
        moves=moves,
    )


def block(runner: ESPStepRunner, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    (cache,) = runner.caches.all()
    return cache.kv_cache[b].clone(), cache.positions[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE].clone()


def test_block_loaded_and_migrated_in_one_step_moves_the_loaded_kv():
    runner = make_runner()
    (cache,) = runner.caches.all()
    # Block 1 holds a request's KV (positions 32..35); it is swapped out to
    # host slot 0 and the request is preempted.
    cache.kv_cache[1] = torch.arange(cache.kv_cache[1].numel(), dtype=torch.float32).view(
        cache.kv_cache[1].shape
    )
    cache.positions[BLOCK_SIZE : 2 * BLOCK_SIZE] = torch.arange(32, 32 + BLOCK_SIZE)
    want = block(runner, 1)
    out = HostSwapMetadata(swap_out=(BlockCopy("r", (1,), (0,)),))
    runner.execute(plan(0), out)
    cache.kv_cache[1] = -1.0  # block 1 is reused by someone else
    # It resumes into block 3, and consolidation moves block 3 to block 6 in
    # the same step: block 6 must end up with the loaded KV.
    load = HostSwapMetadata(swap_in=(BlockCopy("r", (3,), (0,)),))
    runner.execute(plan(1, (BlockMove(3, 6),)), load)
    got = block(runner, 6)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    # The load landed in the table's old block too (it may stay prefix-cached).
    assert torch.equal(block(runner, 3)[0], want[0])


def test_block_swapped_out_and_reused_by_a_migration_in_one_step():
    """The order's first half: a block swapped out this step may be a
    migration's destination, so the swap-out reads it first."""
    runner = make_runner()
    (cache,) = runner.caches.all()
    cache.kv_cache[2] = 5.0
    cache.kv_cache[4] = 9.0
    swap = HostSwapMetadata(swap_out=(BlockCopy("victim", (2,), (1,)),))
    runner.execute(plan(0, (BlockMove(4, 2),)), swap)
    assert torch.equal(cache.kv_cache[2], torch.full_like(cache.kv_cache[2], 9.0))
    # The victim's KV went to the host intact: load it back into block 7.
    runner.execute(plan(1), HostSwapMetadata(swap_in=(BlockCopy("victim", (7,), (1,)),)))
    assert torch.equal(cache.kv_cache[7], torch.full_like(cache.kv_cache[7], 5.0))
