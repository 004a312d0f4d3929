"""Host KV pool bookkeeping, swap settings, the ``mlfq-swap`` name and the
export of swap counters: everything of the swap that needs no engine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vllm_esp
from vllm_esp.core.choices import (
    MLFQ_SCHEDULER_CLS,
    SWAP_CONNECTOR,
    SWAP_CONNECTOR_MODULE,
)
from vllm_esp.core.settings import SettingsError
from vllm_esp.core.swap.book import (
    BlockCopy,
    HostBlockPool,
    SwapBook,
    SwapState,
    host_runs,
)
from vllm_esp.core.swap.config import SwapConfig
from vllm_esp.integration.engine_args import scheduler_args


# --------------------------------------------------------------- host pool
def test_first_fit_keeps_consecutive_allocations_contiguous():
    pool = HostBlockPool(16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(4) == [3, 4, 5, 6]
    pool.free([0, 1, 2])
    assert pool.num_extents == 2
    assert pool.allocate(2) == [0, 1]  # lowest address that fits
    assert pool.allocate(5) == [7, 8, 9, 10, 11]  # [2] is too small: skipped
    pool.check_invariants()


def test_allocation_spans_extents_when_fragmented_and_refuses_when_full():
    pool = HostBlockPool(8)
    pool.allocate(8)
    pool.free([1, 2, 5, 7])
    assert pool.allocate(5) is None  # only 4 free: refused, nothing taken
    assert pool.num_free == 4
    assert pool.allocate(4) == [1, 2, 5, 7]
    assert pool.num_free == 0 and pool.allocate(1) is None
    assert pool.allocate(0) == []


def test_free_merges_neighbours_and_rejects_double_frees():
    pool = HostBlockPool(10)
    pool.allocate(10)
    pool.free([4])
    pool.free([6])
    pool.free([5])  # bridges 4 and 6
    assert pool.num_extents == 1
    with pytest.raises(ValueError, match="double free"):
        pool.free([5])
    with pytest.raises(ValueError, match="duplicate"):
        pool.free([1, 1])
    with pytest.raises(ValueError, match="out of pool"):
        pool.free([10])
    pool.check_invariants()


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_pool_conserves_slots(ops):
    pool = HostBlockPool(32)
    held: list[list[int]] = []
    for alloc, n in ops:
        if alloc:
            got = pool.allocate(n)
            if got is not None:
                held.append(got)
        elif held:
            pool.free(held.pop(n % len(held)))
        pool.check_invariants()
        owned = [b for h in held for b in h]
        assert len(owned) == len(set(owned))
        assert not set(owned) & pool.free_block_ids()
        assert len(owned) + pool.num_free == 32


# --------------------------------------------------------------- the book
def test_host_runs_merge_requests_into_contiguous_copies():
    runs = host_runs(
        [
            BlockCopy("r2", (12, 2), (7, 8)),
            BlockCopy("r1", (7, 3, 9), (4, 5, 6)),
            BlockCopy("r3", (40,), (12,)),
        ]
    )
    assert [(r.host_start, r.device_blocks) for r in runs] == [(4, (7, 3, 9, 12, 2)), (12, (40,))]
    with pytest.raises(ValueError, match="used twice"):
        host_runs([BlockCopy("a", (1,), (3,)), BlockCopy("b", (2,), (3,))])
    with pytest.raises(ValueError, match="used twice"):
        host_runs([BlockCopy("a", (1, 2), (3, 4)), BlockCopy("b", (5,), (3,))])
    with pytest.raises(ValueError, match="used twice"):
        host_runs([BlockCopy("a", (1, 2), (3, 4)), BlockCopy("b", (5, 6), (4, 9))])


def _slow_host_runs(copies):
    """Reference: pair by pair."""
    pairs = sorted((h, d) for c in copies for h, d in zip(c.host_blocks, c.device_blocks))
    runs: list[tuple[int, list[int]]] = []
    for h, d in pairs:
        if runs and h == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(d)
        else:
            runs.append((h, [d]))
    return [(h, tuple(ds)) for h, ds in runs]


@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_copies=st.integers(0, 5), contiguous=st.booleans())
def test_host_runs_equal_the_pairwise_reference(data, num_copies, contiguous):
    slots = data.draw(st.permutations(range(40)))
    copies, used = [], 0
    for i in range(num_copies):
        n = data.draw(st.integers(0, 6))
        if contiguous:  # what first-fit hands out: an ascending range
            start = data.draw(st.integers(0, 33))
            hosts = tuple(range(start, start + n))
            if set(hosts) & {h for c in copies for h in c.host_blocks}:
                continue
        else:
            hosts = tuple(slots[used : used + n])
            used += n
        copies.append(
            BlockCopy(f"r{i}", tuple(data.draw(st.integers(0, 99)) for _ in hosts), hosts)
        )
    assert [(r.host_start, r.device_blocks) for r in host_runs(copies)] == _slow_host_runs(copies)


def test_swap_out_then_sync_load_of_the_blocks_beyond_the_local_hit():
    book = SwapBook(num_host_blocks=8, block_size=16)
    assert book.swap_out("r", [10, 11, 12, 13], num_tokens=50)  # 4 blocks
    step = book.take_step()
    assert step.swap_out == (BlockCopy("r", (10, 11, 12, 13), (0, 1, 2, 3)),)
    assert book.swapped_tokens("r") == 50
    # Resume: 32 tokens hit the prefix cache (blocks 20, 21 are shared).
    copy = book.plan_load(
        "r", [20, 21, 30, 31], num_local_tokens=32, num_load_tokens=18, asynchronous=False
    )
    assert copy == BlockCopy("r", (30, 31), (2, 3))
    assert "r" not in book
    assert book.num_pending_free_blocks == 4  # still read by this step's load...
    assert book.pool.allocate(8) is None  # ...so not reusable yet
    step = book.take_step()
    assert step.swap_in == (copy,)
    assert book.pool.num_free == 8
    book.check_invariants()


def test_host_full_is_a_counted_fallback_and_empty_requests_are_not():
    book = SwapBook(num_host_blocks=3, block_size=16)
    assert not book.swap_out("big", list(range(10)), num_tokens=64)
    assert book.counters.recompute_fallbacks == 1
    assert not book.swap_out("empty", [], num_tokens=0)
    assert book.counters.recompute_fallbacks == 1
    assert book.swap_out("fits", [5, 6, 7], num_tokens=33)
    book.check_invariants()


def test_prefetch_lifecycle_and_abort_while_in_flight():
    book = SwapBook(num_host_blocks=8, block_size=16)
    book.swap_out("a", [1, 2], 32)
    book.swap_out("b", [3, 4], 20)
    book.take_step()
    book.plan_load("a", [7, 8], 0, 31, asynchronous=True)
    book.plan_load("b", [9, 10], 0, 19, asynchronous=True)
    step = book.take_step()
    assert [c.request_id for c in step.prefetch] == ["a", "b"]
    assert book.state("a") is SwapState.PREFETCHING
    book.finished("a")  # aborted mid-load: slots stay until the load lands
    assert book.num_used_blocks == 4
    book.load_finished("a")
    book.load_finished("b")
    assert "a" not in book and book.state("b") is SwapState.PREFETCHED
    book.unprefetch("b")  # device copy given back, host copy still valid
    assert book.swapped_tokens("b") == 20
    book.plan_load("b", [11, 12], 0, 19, asynchronous=True)
    book.load_finished("b")
    book.resumed("b")
    book.take_step()
    assert len(book) == 0 and book.pool.num_free == 8
    assert book.counters.prefetches == 3 and book.counters.unprefetches == 1
    book.check_invariants()


def test_reset_drops_swapped_copies_but_not_prefetches_in_flight():
    book = SwapBook(num_host_blocks=8, block_size=16)
    book.swap_out("a", [1], 5)
    book.swap_out("b", [2], 5)
    book.take_step()
    book.plan_load("b", [3], 0, 4, asynchronous=True)
    assert book.reset() is False and len(book) == 2
    book.load_finished("b")
    book.resumed("b")
    assert book.reset() is True and len(book) == 0
    assert book.counters.dropped == 1


def test_transitions_from_the_wrong_state_are_errors():
    book = SwapBook(num_host_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="no swapped-out copy"):
        book.plan_load("x", [1], 0, 1, asynchronous=False)
    book.swap_out("x", [1, 2], 20)
    with pytest.raises(ValueError, match="block-aligned"):
        book.plan_load("x", [1, 2], 5, 10, asynchronous=False)
    with pytest.raises(ValueError, match="cannot load"):
        book.plan_load("x", [1, 2], 0, 21, asynchronous=False)
    with pytest.raises(ValueError, match="expected a prefetched"):
        book.resumed("x")


# --------------------------------------------------------------- settings
def test_swap_defaults_and_sizing():
    cfg = SwapConfig()
    assert cfg.host_pool_gib == 4.0 and cfg.prefetch_depth == 2
    assert cfg.num_host_blocks(block_bytes=2**20) == 4096
    assert cfg.resolved_reserve(max_num_seqs=16) == 16
    assert SwapConfig(host_pool_blocks=0).num_host_blocks(123) == 0
    assert SwapConfig(free_block_reserve=3).resolved_reserve(16) == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"host_pool_gib": 0}, "host_pool_gib"),
        ({"host_pool_gib": float("nan")}, "host_pool_gib"),
        ({"host_pool_gib": True}, "host_pool_gib"),
        ({"host_pool_blocks": -1}, "host_pool_blocks"),
        ({"host_pool_blocks": 2.5}, "host_pool_blocks"),
        ({"free_block_reserve": -2}, "free_block_reserve"),
        ({"prefetch_depth": -1}, "prefetch_depth"),
        ({"prefetch_depth": "2"}, "prefetch_depth"),
        ({"pool_gib": 4}, "unknown swap setting"),
    ],
)
def test_invalid_swap_settings_name_the_setting(settings, message):
    with pytest.raises(SettingsError, match=message):
        SwapConfig.from_dict(settings)


def test_scheduler_args_for_mlfq_swap_sets_up_the_connector():
    kwargs = vllm_esp.scheduler_args("mlfq-swap", swap={"host_pool_gib": 2}, num_levels=4)
    assert kwargs["scheduler_cls"] == MLFQ_SCHEDULER_CLS
    assert kwargs["additional_config"] == {
        "mlfq": {"num_levels": 4, "policy": "mlfq"},
        "swap": {"host_pool_gib": 2},
    }
    ktc = kwargs["kv_transfer_config"]
    assert (ktc.kv_connector, ktc.kv_connector_module_path, ktc.kv_role) == (
        SWAP_CONNECTOR,
        SWAP_CONNECTOR_MODULE,
        "kv_both",
    )
    with pytest.raises(SettingsError, match="prefetch_depth"):
        scheduler_args("mlfq-swap", swap={"prefetch_depth": -3})
    with pytest.raises(SettingsError, match="takes no swap settings"):
        scheduler_args("mlfq", swap={"host_pool_gib": 1})
    assert "kv_transfer_config" not in scheduler_args("mlfq")


def test_the_configured_connector_is_importable_by_that_name():
    import importlib

    cls = getattr(importlib.import_module(SWAP_CONNECTOR_MODULE), SWAP_CONNECTOR)
    assert cls.__name__ == SWAP_CONNECTOR and cls.__module__ == SWAP_CONNECTOR_MODULE


def test_connector_refuses_models_it_cannot_copy_faithfully(config_model_dir):
    import torch
    from vllm.config import ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import (
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    from vllm_esp.integration.engine_args import swap_kv_transfer_config
    from vllm_esp.integration.swap.connector import HostSwapConnector

    vllm_config = VllmConfig(
        model_config=ModelConfig(model=config_model_dir, dtype="float32", skip_tokenizer_init=True),
        kv_transfer_config=swap_kv_transfer_config(),
    )
    spec = SlidingWindowSpec(
        block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32, sliding_window=64
    )
    config = KVCacheConfig(
        num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]
    )
    with pytest.raises(ValueError, match="one full-attention KV cache group"):
        HostSwapConnector(vllm_config, KVConnectorRole.SCHEDULER, config)


def test_engine_args_accept_what_scheduler_args_returns(tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=str(tmp_path), **scheduler_args("mlfq-swap"))
    assert ea.kv_transfer_config.kv_connector == SWAP_CONNECTOR


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_esp.register()
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def _engine_args(parser, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["model_dir", *argv]))


def test_cli_mlfq_swap_sets_scheduler_connector_and_settings(serve_parser):
    ea = _engine_args(
        serve_parser, "--scheduler", "mlfq-swap", "--swap-config", '{"prefetch_depth": 1}'
    )
    assert ea.scheduler_cls == MLFQ_SCHEDULER_CLS
    assert ea.additional_config["swap"] == {"prefetch_depth": 1}
    assert ea.kv_transfer_config.kv_connector_module_path == SWAP_CONNECTOR_MODULE
    # --swap-config alone implies mlfq-swap.
    ea = _engine_args(serve_parser, "--swap-config", '{"host_pool_blocks": 64}')
    assert ea.kv_transfer_config.kv_connector == SWAP_CONNECTOR
    # Other schedulers leave the connector alone.
    assert _engine_args(serve_parser, "--scheduler", "mlfq").kv_transfer_config is None


def test_cli_swap_errors(serve_parser, capsys):
    with pytest.raises(SystemExit):
        serve_parser.parse_args(
            ["model_dir", "--scheduler", "mlfq-swap", "--swap-config", '{"host_pool_gib": -1}']
        )
    assert "host_pool_gib" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="takes no swap settings"):
        _engine_args(serve_parser, "--scheduler", "mlfq", "--swap-config", "{}")
    with pytest.raises(SettingsError, match="needs the HostSwapConnector"):
        _engine_args(
            serve_parser,
            "--scheduler",
            "mlfq-swap",
            "--kv-transfer-config",
            '{"kv_connector": "ExampleConnector", "kv_role": "kv_both"}',
        )


# ----------------------------------------------------------------- metrics
def test_swap_counters_reach_prometheus_series():
    import prometheus_client as prom
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_esp.integration.metrics import ESPPrometheusStatLogger

    class Cfg:
        class model_config:
            served_model_name = "swap-metrics-test"

    logger = ESPPrometheusStatLogger(Cfg(), engine_index=0)

    def record(**values):
        stats = SchedulerStats()
        stats.num_kv_fetch_reqs_by_stage = {f"vllm_esp:{k}": v for k, v in values.items()}
        logger.record(stats, None)

    def value(name):
        return prom.REGISTRY.get_sample_value(
            name, {"model_name": "swap-metrics-test", "engine": "0"}
        )

    record(
        swap_out_bytes_total=1000,
        swap_out_time_us_total=2_000_000,
        swap_recompute_fallbacks_total=1,
        swap_host_blocks_used=5,
        recomputed_tokens_total=7,
    )
    record(
        swap_out_bytes_total=1500,
        swap_out_time_us_total=2_500_000,
        swap_recompute_fallbacks_total=1,
        swap_host_blocks_used=2,
        recomputed_tokens_total=7,
    )
    assert value("vllm_esp:swap_out_bytes_total") == 1500
    assert value("vllm_esp:swap_out_seconds_total") == pytest.approx(2.5)
    assert value("vllm_esp:swap_recompute_fallbacks_total") == 1
    assert value("vllm_esp:swap_host_blocks_used") == 2
    assert value("vllm_esp:recomputed_tokens_total") == 7
