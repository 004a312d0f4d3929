"""The worker's copy engine: random KV through the host pool and back is
bit-identical, in vLLM's CPU layout and the others the engine may meet,
and a step costs one op per layer per contiguous host run."""

from __future__ import annotations

import pytest
import torch

from vllm_esp.core.swap.book import BlockCopy, SwapBook
from vllm_esp.kernels.swap_copy import SwapCopyEngine, find_block_dim

NUM_BLOCKS = 24
KV_HEADS, BLOCK_SIZE, HEAD = 2, 32, 64


def random_bits(shape, dtype) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included): a copy that
    went through float arithmetic would not reproduce them."""
    g = torch.Generator().manual_seed(hash(tuple(shape)) % 2**31)
    nbytes = torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(
        -(2**15), 2**15, (*shape[:-1], shape[-1] * nbytes // 2), dtype=torch.int16, generator=g
    )
    return bits.view(dtype)


def cpu_layout(dtype=torch.bfloat16, layers=2) -> dict[str, torch.Tensor]:
    """vLLM's CPU attention cache: per layer [num_blocks, kv_heads, block_size, 2 * head]."""
    return {
        f"model.layers.{i}.self_attn.attn": random_bits(
            (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD), dtype
        )
        for i in range(layers)
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def round_trip(caches: dict[str, torch.Tensor], block_dim: int, rows_per_block: int = 1):
    """Swap three requests out (one host run plus a separate slot), wipe
    their device blocks, swap them into different blocks, compare."""
    originals = {k: v.clone() for k, v in caches.items()}
    engine = SwapCopyEngine(caches, NUM_BLOCKS, num_host_blocks=16)
    out = [
        BlockCopy("a", (5, 2, 9), (0, 1, 2)),
        BlockCopy("b", (11, 3), (3, 4)),
        BlockCopy("c", (7,), (9,)),
    ]
    engine.swap_out(out, blocks_reused_now=True)
    for t in caches.values():
        t.index_fill_(
            block_dim, torch.arange(NUM_BLOCKS * rows_per_block), 0
        )  # garbage over everything
    back = [
        BlockCopy("a", (20, 0, 13), (0, 1, 2)),
        BlockCopy("b", (1, 23), (3, 4)),
        BlockCopy("c", (17,), (9,)),
    ]
    engine.swap_in(back)
    for name, t in caches.items():
        for src, dst in zip(out, back):
            for s, d in zip(src.device_blocks, dst.device_blocks):
                r = rows_per_block
                got = t.narrow(block_dim, d * r, r)
                want = originals[name].narrow(block_dim, s * r, r)
                assert same_bits(got, want), (name, s, d)
    return engine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_round_trip_in_vllm_cpu_layout(dtype):
    engine = round_trip(cpu_layout(dtype), block_dim=0)
    assert len(engine.units) == 2  # one per layer
    assert engine.block_bytes == 2 * KV_HEADS * BLOCK_SIZE * 2 * HEAD * dtype.itemsize


def test_round_trip_in_flash_attention_layout():
    # [2 (K, V), num_blocks, block_size, kv_heads, head]: block dim 1.
    caches = {
        f"l{i}": random_bits((2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD), torch.bfloat16)
        for i in range(2)
    }
    engine = round_trip(caches, block_dim=1)
    assert len(engine.units) == 4  # K and V of each layer


def test_round_trip_with_kernel_blocks_smaller_than_kv_blocks():
    # A backend that splits each 32-token block into two 16-token kernel blocks.
    caches = {"l0": random_bits((NUM_BLOCKS * 2, KV_HEADS, 16, 2 * HEAD), torch.bfloat16)}
    engine = round_trip(caches, block_dim=0, rows_per_block=2)
    assert engine.units[0].rows_per_block == 1  # two kernel blocks viewed as one row


def test_round_trip_when_blocks_are_not_the_outer_dimension_in_memory():
    # Logical [num_blocks, ...] over memory laid out heads-first: the rows
    # cannot be viewed flat, so the engine indexes the tensor as it is.
    base = random_bits((KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, 2 * HEAD), torch.float32)
    caches = {"l0": base.permute(1, 0, 2, 3)}
    engine = round_trip(caches, block_dim=0)
    assert engine.units[0].device.dim() == 4


def test_find_block_dim():
    assert find_block_dim((24, 2, 32, 128), (8192, 4096, 128, 1), 24) == (0, 1)
    assert find_block_dim((2, 24, 32, 2, 64), (98304, 4096, 128, 64, 1), 24) == (1, 1)
    # Two dims of the block count: the outer one (larger stride) is the block dim.
    assert find_block_dim((2, 2, 32, 2, 64), (8192, 4096, 128, 64, 1), 2) == (0, 1)
    assert find_block_dim((48, 2, 16, 128), (4096, 2048, 128, 1), 24) == (0, 2)
    with pytest.raises(ValueError, match="holds 25 blocks"):
        find_block_dim((24, 2, 32, 128), (8192, 4096, 128, 1), 25)


def test_a_step_is_one_op_per_layer_per_host_run(monkeypatch):
    caches = cpu_layout(torch.bfloat16, layers=3)
    engine = SwapCopyEngine(caches, NUM_BLOCKS, num_host_blocks=16)
    calls = {"index_select": 0, "index_copy_": 0}
    real_select, real_copy = torch.index_select, torch.Tensor.index_copy_

    def select(*args, **kwargs):
        calls["index_select"] += 1
        return real_select(*args, **kwargs)

    def copy(self, *args, **kwargs):
        calls["index_copy_"] += 1
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch, "index_select", select)
    monkeypatch.setattr(torch.Tensor, "index_copy_", copy)
    # Four requests, 10 blocks, host slots 0..9: one run.
    step = [
        BlockCopy(r, d, h)
        for r, d, h in (
            ("a", (3, 8, 1), (0, 1, 2)),
            ("b", (20, 4), (3, 4)),
            ("c", (9, 10, 11), (5, 6, 7)),
            ("d", (0, 2), (8, 9)),
        )
    ]
    engine.swap_out(step, blocks_reused_now=True)
    assert calls["index_select"] == 3  # not 3 layers x 10 blocks
    engine.swap_in(step)
    assert calls["index_copy_"] == 3
    # A second, separate host run adds one op per layer.
    engine.swap_out(
        [BlockCopy("e", (5,), (12,)), BlockCopy("f", (6,), (0,))], blocks_reused_now=True
    )
    assert calls["index_select"] == 3 + 6


def test_prefetches_are_reported_once_and_timings_accumulate():
    engine = SwapCopyEngine(cpu_layout(), NUM_BLOCKS, num_host_blocks=8)
    engine.swap_out([BlockCopy("a", (1, 2), (0, 1))], blocks_reused_now=False)
    engine.prefetch([BlockCopy("a", (5, 6), (0, 1)), BlockCopy("b", (7,), (2,))])
    assert engine.finished_prefetches() == {"a", "b"}
    assert engine.finished_prefetches() == set()
    seconds = engine.take_seconds()
    assert seconds["out"] > 0 and seconds["in"] > 0
    assert engine.take_seconds() == {"out": 0.0, "in": 0.0}


def test_measure_reports_both_directions_and_a_reference():
    engine = SwapCopyEngine(cpu_layout(), NUM_BLOCKS, num_host_blocks=8)
    m = engine.measure(num_blocks=8, repeats=3)
    assert m["bytes"] == 8 * engine.block_bytes
    assert all(m[k] > 0 for k in ("swap_out_s", "swap_in_s", "reference_s", "reference_flat_s"))
    with pytest.raises(ValueError, match="cannot measure"):
        engine.measure(num_blocks=9)


# -------------------------------------------------- between engines (ESP instances)
def esp_layout(block_size: int = BLOCK_SIZE, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """An ESP instance's pool units: the int64 per-slot positions of its
    ``PagedKVCache`` wrappers and vLLM's CPU layer tensors (positions first:
    an odd block size makes the packed rows after them need alignment)."""
    caches = {"positions": torch.randint(0, 2**40, (NUM_BLOCKS * block_size,))}
    for i in range(2):
        caches[f"kv.{i}"] = random_bits((NUM_BLOCKS, KV_HEADS, block_size, 2 * HEAD), dtype)
    return caches


def block_rows(t: torch.Tensor, blocks) -> torch.Tensor:
    return t.view(NUM_BLOCKS, -1)[list(blocks)]


@pytest.mark.parametrize("block_size", [BLOCK_SIZE, 3])  # 3: 24-byte position rows
def test_slots_read_on_one_engine_land_in_blocks_of_another(block_size):
    sender_caches = esp_layout(block_size)
    originals = {k: v.clone() for k, v in sender_caches.items()}
    receiver_caches = {k: torch.zeros_like(v) for k, v in sender_caches.items()}
    sender = SwapCopyEngine(sender_caches, NUM_BLOCKS, num_host_blocks=16)
    receiver = SwapCopyEngine(receiver_caches, NUM_BLOCKS, num_host_blocks=16)
    assert len(sender.units) == 3  # two layers and the positions
    sender.swap_out(
        [BlockCopy("a", (5, 2, 9), (0, 1, 2)), BlockCopy("b", (11,), (7,))],
        blocks_reused_now=True,
    )
    for t in sender_caches.values():
        t.zero_()  # the slots, not the device blocks, must carry the data
    # Slots out of order and not contiguous, as a resumed request's may be.
    packed = sender.read_slots([7, 0, 2])
    assert packed.dtype == torch.uint8 and packed.numel() == sender.packed_bytes(3)
    receiver.write_blocks([20, 13, 1], packed)
    for name, t in receiver_caches.items():
        assert same_bits(block_rows(t, [20, 13, 1]), block_rows(originals[name], [11, 5, 9])), name
        untouched = [b for b in range(NUM_BLOCKS) if b not in (20, 13, 1)]
        assert not block_rows(t, untouched).view(torch.uint8).any(), name


def test_packed_buffers_are_one_op_per_unit_each_side(monkeypatch):
    caches = esp_layout()
    engine = SwapCopyEngine(caches, NUM_BLOCKS, num_host_blocks=16)
    engine.swap_out([BlockCopy("a", tuple(range(8)), tuple(range(8)))], blocks_reused_now=True)
    calls = {"index_select": 0, "index_copy_": 0}
    real_select, real_copy = torch.index_select, torch.Tensor.index_copy_

    def select(*args, **kwargs):
        calls["index_select"] += 1
        return real_select(*args, **kwargs)

    def copy(self, *args, **kwargs):
        calls["index_copy_"] += 1
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(torch, "index_select", select)
    monkeypatch.setattr(torch.Tensor, "index_copy_", copy)
    packed = engine.read_slots([6, 1, 3, 0, 7])  # five blocks, four host runs
    engine.write_blocks([10, 11, 12, 13, 14], packed)
    assert calls == {"index_select": 3, "index_copy_": 3}


def test_a_reused_slot_reads_back_its_latest_block():
    caches = esp_layout()
    originals = {k: v.clone() for k, v in caches.items()}
    engine = SwapCopyEngine(caches, NUM_BLOCKS, num_host_blocks=4)
    engine.swap_out([BlockCopy("a", (3, 4), (0, 1))], blocks_reused_now=True)
    engine.swap_in([BlockCopy("a", (8, 9), (0, 1))])  # the book frees slots 0, 1
    engine.swap_out([BlockCopy("b", (6, 7), (0, 1))], blocks_reused_now=True)
    engine.write_blocks([20, 21], engine.read_slots([0, 1]))
    for name, t in caches.items():
        assert same_bits(block_rows(t, [8, 9]), block_rows(originals[name], [3, 4])), name
        assert same_bits(block_rows(t, [20, 21]), block_rows(originals[name], [6, 7])), name


def test_write_blocks_refuses_a_buffer_of_another_size():
    engine = SwapCopyEngine(esp_layout(), NUM_BLOCKS, num_host_blocks=4)
    packed = engine.read_slots([0, 1])
    with pytest.raises(ValueError, match="does not hold 3 blocks"):
        engine.write_blocks([5, 6, 7], packed)
    with pytest.raises(ValueError, match="does not hold 2 blocks"):
        engine.write_blocks([5, 6], packed.view(torch.int16))


# -------------------------------------------------- connector, worker role
def make_connector(model_dir, role, num_blocks=NUM_BLOCKS, host_blocks=16, dtype=torch.bfloat16):
    from vllm.config import CacheConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )

    from vllm_esp.integration.engine_args import swap_kv_transfer_config
    from vllm_esp.integration.swap.connector import HostSwapConnector

    vllm_config = VllmConfig(
        model_config=ModelConfig(
            model=model_dir, dtype="float32", seed=0, skip_tokenizer_init=True
        ),
        cache_config=CacheConfig(block_size=BLOCK_SIZE),
        kv_transfer_config=swap_kv_transfer_config(),
        additional_config={"swap": {"host_pool_blocks": host_blocks}},
    )
    spec = FullAttentionSpec(
        block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=dtype
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)],
    )
    role = KVConnectorRole.WORKER if role == "worker" else KVConnectorRole.SCHEDULER
    return HostSwapConnector(vllm_config, role, kv_cache_config)


def test_worker_connector_runs_a_scheduler_plan(config_model_dir):
    from vllm_esp.integration.swap.connector import (
        HostSwapMetadata,
        HostSwapWorkerMetadata,
    )

    scheduler_side = make_connector(config_model_dir, "scheduler")
    worker = make_connector(config_model_dir, "worker")
    caches = {
        "l0": random_bits((NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD), torch.bfloat16),
        "l1": random_bits((NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD), torch.bfloat16),
    }
    original = {k: v.clone() for k, v in caches.items()}
    worker.register_kv_caches(caches)
    assert worker.copy_engine.block_bytes == scheduler_side.block_bytes  # same slot size both sides

    book = SwapBook(16, BLOCK_SIZE)
    book.swap_out("r", [4, 6, 8], num_tokens=70)
    step1 = book.take_step()
    worker.handle_preemptions(HostSwapMetadata(swap_out=step1.swap_out))
    for t in caches.values():
        t.zero_()
    book.plan_load("r", [10, 11, 12], 0, 69, asynchronous=True)
    step2 = book.take_step()
    worker.bind_connector_metadata(HostSwapMetadata(prefetch=step2.prefetch))
    worker.handle_preemptions(worker._get_connector_metadata())
    worker.start_load_kv(None)
    assert worker.get_finished(set()) == (None, {"r"})
    worker.clear_connector_metadata()
    for name in caches:
        assert same_bits(caches[name][[10, 11, 12]], original[name][[4, 6, 8]])
    meta = worker.build_connector_worker_meta()
    assert isinstance(meta, HostSwapWorkerMetadata) and meta.swap_out_us > 0 and meta.swap_in_us > 0
    assert worker.build_connector_worker_meta() is None  # nothing copied since
