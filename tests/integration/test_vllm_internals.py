"""Fail loudly when the vLLM internals vllm-esp relies on change.

The plugin subclasses vLLM's V1 scheduler and wraps its CLI; those are not
public APIs. Every name, signature and attribute used by ``vllm_esp`` is
listed here, so a vLLM upgrade breaks this file first, with a message that
says what moved, instead of breaking a server at run time.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import vllm

import vllm_esp


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_vllm_version():
    assert vllm.__version__.split("+")[0] == vllm_esp.VLLM_VERSION, (
        f"vllm-esp is written against vLLM {vllm_esp.VLLM_VERSION}, found {vllm.__version__}: "
        "re-check every item in this file before moving the pin"
    )


def test_scheduler_methods_we_override_or_call():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    assert issubclass(AsyncScheduler, Scheduler)
    assert params(Scheduler.__init__)[:6] == [
        "self", "vllm_config", "kv_cache_config", "structured_output_manager",
        "block_size", "hash_block_size",
    ]
    assert params(Scheduler.schedule) == ["self", "throttle_prefills"]
    assert params(Scheduler.add_request) == ["self", "request"]
    assert params(Scheduler._preempt_request) == ["self", "request", "timestamp", "drop_stale_output"]
    assert params(Scheduler._free_request) == ["self", "request", "delay_free_blocks"]
    assert params(Scheduler.update_from_output) == ["self", "scheduler_output", "model_runner_output"]
    assert params(Scheduler.finish_requests) == ["self", "request_ids", "finished_status"]
    assert "kv_connector_stats" in params(Scheduler.make_stats)


def test_scheduler_state_we_read(config_model_dir, calibration_file):
    from vllm.v1.core.sched.request_queue import RequestQueue

    from vllm_esp.harness.scheduler import create_scheduler

    s = create_scheduler(config_model_dir, additional_config={"mlfq": {"calibration_file": calibration_file}})
    for name in (
        "running", "waiting", "kv_holding_waiting", "deferred_waiting", "requests",
        "kv_cache_manager", "max_num_running_reqs", "max_num_active_reqs",
        "max_num_scheduled_tokens", "num_lookahead_tokens", "scheduler_reserve_full_isl",
        "max_model_len", "num_waiting_for_streaming_input", "_pause_state", "block_size",
        "scheduler_config", "vllm_config",
    ):
        assert hasattr(s, name), f"vllm.v1.core.sched.scheduler.Scheduler lost attribute {name!r}"
    assert isinstance(s.running, list)
    assert isinstance(s.kv_holding_waiting, RequestQueue)
    kvm = s.kv_cache_manager
    assert hasattr(kvm, "watermark_blocks")
    assert callable(kvm.block_pool.get_num_free_blocks)
    assert params(kvm.get_computed_blocks) == ["request"]
    assert params(kvm.get_block_ids) == ["request_id"]


def test_request_queue_contract():
    from vllm.v1.core.sched.request_queue import RequestQueue

    abstract = set(RequestQueue.__abstractmethods__)
    assert abstract == {
        "add_request", "pop_request", "peek_request", "prepend_request", "prepend_requests",
        "remove_request", "remove_requests", "__bool__", "__len__", "__iter__",
    }, f"RequestQueue's abstract methods changed: {sorted(abstract)}"


def test_request_fields():
    from vllm_esp.harness.scheduler import make_request

    r = make_request("sig", 8, 4)
    for name in ("num_tokens_with_spec", "num_output_placeholders", "num_computed_tokens",
                 "num_tokens", "num_prompt_tokens", "max_tokens", "status", "num_preemptions",
                 "request_id"):
        assert hasattr(r, name), f"vllm.v1.request.Request lost {name!r}"
    assert callable(r.is_finished)


def test_stats_side_channel():
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

    fields = {f.name: f for f in dataclasses.fields(SchedulerStats)}
    assert "num_kv_fetch_reqs_by_stage" in fields
    assert fields["num_kv_fetch_reqs_by_stage"].type in ("dict[str, int]", dict[str, int])
    assert params(StatLoggerBase.record)[:3] == ["self", "scheduler_stats", "iteration_stats"]


def test_cli_hooks():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"scheduler_cls", "additional_config"} <= names
    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    # AsyncEngineArgs must inherit from_cli_args (our wrapper lives on EngineArgs).
    assert "from_cli_args" not in AsyncEngineArgs.__dict__
    src = inspect.getsource(AsyncEngineArgs.add_cli_args)
    assert "load_general_plugins()" in src and "EngineArgs.add_cli_args" in src, (
        "AsyncEngineArgs.add_cli_args no longer loads plugins before building engine flags"
    )


@pytest.mark.parametrize("group", ["vllm.general_plugins", "vllm.stat_logger_plugins"])
def test_entry_points_installed(group):
    from importlib.metadata import entry_points

    ours = [e for e in entry_points(group=group) if e.value.startswith("vllm_esp")]
    assert ours, f"vllm-esp is not registered in {group}: reinstall the package"


# ---------------------------------------------------------------- ESP (vllm_esp/engine)
def test_esp_block_pool_and_free_queue_contract():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    # InstanceFreeQueues stands in for BlockPool.free_block_queue: these are
    # the queue methods BlockPool calls, and the pool fields ESP reads.
    for name in ("popleft", "popleft_n", "remove", "append", "append_n", "prepend_n",
                 "get_all_free_blocks", "iter_blocks_after"):
        assert hasattr(FreeKVCacheBlockQueue, name), name
    assert params(FreeKVCacheBlockQueue.__init__) == ["self", "blocks"]
    src = inspect.getsource(BlockPool)
    for needle in ("self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)",
                   "self.free_block_queue.popleft_n(num_blocks)",
                   "return self.free_block_queue.num_free_blocks"):
        assert needle in src, needle
    assert params(BlockPool.get_new_blocks) == ["self", "num_blocks"]
    assert params(BlockPool.free_blocks)[:2] == ["self", "ordered_blocks"]
    # The ESP scheduler wraps allocate_slots and reads the per-request tables.
    assert params(KVCacheManager.allocate_slots)[:3] == ["self", "request", "num_new_tokens"]
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    assert "self.req_to_blocks" in inspect.getsource(SingleTypeKVCacheManager.__init__)


def test_esp_executor_contract():
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        KVConnectorOutput,
        ModelRunnerOutput,
    )

    for name in ("_init_executor", "collective_rpc", "execute_model", "sample_tokens",
                 "determine_available_memory", "get_kv_cache_specs", "initialize_from_config",
                 "check_health", "shutdown", "take_draft_token_ids",
                 "supports_async_scheduling"):
        assert hasattr(Executor, name), name
    assert params(MultiprocExecutor.collective_rpc)[:6] == [
        "self", "method", "timeout", "args", "kwargs", "non_block"]
    assert params(kv_cache_utils.get_kv_cache_config_from_groups) == [
        "vllm_config", "kv_cache_groups", "available_memory"]
    assert params(kv_cache_utils._pool_bytes_per_block) == ["vllm_config", "kv_cache_groups"]
    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    assert {"req_ids", "req_id_to_index", "sampled_token_ids", "kv_connector_output"} <= fields
    assert "finished_recving" in {f.name for f in dataclasses.fields(KVConnectorOutput)}
    assert EMPTY_MODEL_RUNNER_OUTPUT.req_ids == []


def test_esp_worker_and_attention_contract():
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.attention import attention as attn_mod
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
    )
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )
    from vllm.v1.executor.ray_utils import RayWorkerWrapper
    from vllm.v1.worker.cpu_worker import CPUWorker

    assert params(stateless_init_torch_distributed_process_group)[:5] == [
        "host", "port", "rank", "world_size", "backend"]
    assert {"attn_metadata", "vllm_config", "num_tokens", "slot_mapping"} <= set(
        params(set_forward_context))
    # The ESP step context arrives as attn_metadata (not a dict); an empty
    # slot_mapping dict makes vLLM skip its own KV write.
    src = inspect.getsource(attn_mod.get_attention_context)
    assert "isinstance(attn_metadata_raw, dict)" in src
    assert "slot_mapping.get(layer_name)" in src
    assert params(CPUAttentionBackendImpl.forward)[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"]
    assert CPUAttentionBackend.get_name() == "CPU_ATTN"
    assert AttentionBackendEnum.CPU_ATTN and AttentionBackendEnum.FLASH_ATTN
    assert params(register_backend)[:2] == ["backend", "class_path"]
    assert hasattr(CPUWorker, "init_device") and hasattr(CPUWorker, "determine_available_memory")
    assert hasattr(RayWorkerWrapper, "execute_method") and hasattr(RayWorkerWrapper, "init_worker")
