"""Fail loudly when the vLLM internals vllm-esp relies on change.

The plugin subclasses vLLM's V1 scheduler, executor, workers, attention
backends, KV connector and stat logger, replaces parts of the KV cache
manager, and wraps two vLLM functions; none of that is public API. Every
name, signature and attribute ``vllm_esp/integration`` touches is listed
here, grouped by vLLM module, so a vLLM upgrade breaks this file first,
with a message that says what moved and which ``vllm_esp`` module depends
on it, instead of breaking a server at run time.

Real objects are built where that is cheap (the harness's
``create_scheduler`` builds vLLM's own ``Scheduler`` with a real
``KVCacheManager``); everything else is checked with ``inspect``. Each
test's docstring names what depends on it. ``vllm_esp/harness`` builds
vLLM objects too, but every scheduler test goes through it, so a break
there is loud already. ``integration/esp/host_swap.py`` touches no vLLM
name: it works on the ``HostSwapMetadata`` copies of the swap connector.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import vllm

import vllm_esp

# ------------------------------------------------------------ dependents
MLFQ_SCHEDULER = "vllm_esp/integration/mlfq/scheduler.py"
MLFQ_QUEUE = "vllm_esp/integration/mlfq/queue.py"
ESP_SCHEDULER = "vllm_esp/integration/esp/scheduler.py"
FREE_QUEUES = "vllm_esp/integration/esp/free_queues.py"
ESP_EXECUTOR = "vllm_esp/integration/esp/executor.py"
ESP_INSTANCES = "vllm_esp/integration/esp/instances.py"
ESP_WORKER = "vllm_esp/integration/esp/worker.py"
ESP_RUNNER = "vllm_esp/integration/esp/runner.py"
ESP_STEP_CONTEXT = "vllm_esp/integration/esp/step_context.py"
ESP_ATTENTION = "vllm_esp/integration/esp/attention_backend.py"
SWAP_CONNECTOR = "vllm_esp/integration/swap/connector.py"
METRICS = "vllm_esp/integration/metrics.py"
ENGINE_ARGS = "vllm_esp/integration/engine_args.py"
CPU_CORES = "vllm_esp/integration/patches/cpu_cores.py"
COST_MODEL = "vllm_esp/integration/cost_model.py"
CLI = "vllm_esp/cli.py"


# --------------------------------------------------------------- helpers
def params(fn: Callable[..., Any]) -> list[str]:
    """Parameter names; without the ``_ray_trace_ctx`` that Ray's tracing
    adds to actor methods once ``ray`` has been imported in the process."""
    return [p for p in inspect.signature(fn).parameters if p != "_ray_trace_ctx"]


def expect(ok: bool, moved: str, user: str) -> None:
    assert ok, f"vLLM {vllm.__version__}: {moved}; {user} depends on it"


def expect_params(
    fn: Callable[..., Any], expected: list[str], user: str, *, prefix: bool = False
) -> None:
    got = params(fn)
    ok = got[: len(expected)] == expected if prefix else got == expected
    what = "parameters starting with" if prefix else "parameters"
    expect(ok, f"{fn.__qualname__} takes {got}, not the {what} {expected}", user)


def expect_attrs(obj: Any, names: Iterable[str], what: str, user: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    expect(not missing, f"{what} lost {missing}", user)


def expect_source(obj: Any, needles: Iterable[str], user: str) -> None:
    source = inspect.getsource(obj)
    missing = [n for n in needles if n not in source]
    expect(not missing, f"{obj.__qualname__} no longer contains {missing}", user)


def expect_fields(cls: type, names: Iterable[str], user: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(set(names) - fields)
    expect(not missing, f"{cls.__qualname__} lost fields {missing}", user)


def _passes_everything(fn: Callable[..., Any]) -> bool:
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    return {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds


def _vllm_attr(base: type, name: str) -> Any:
    """``name`` as a class of ``base``'s MRO defines it (``object`` excluded)."""
    for klass in base.__mro__:
        if klass is object:
            return None
        if name in vars(klass):
            return vars(klass)[name]
    return None


def _ours(klass: type) -> bool:
    """Neither vLLM's nor the standard library's (``object``, ``ABC``, ``deque``)."""
    top = klass.__module__.split(".")[0]
    return top != "vllm" and top not in sys.stdlib_module_names


def expect_consistent_overrides(
    ours: type, base: type, user: str, *, skip: Iterable[str] = ()
) -> None:
    """Every attribute that ``ours`` (or a mixin of ours in its MRO) defines
    and ``base`` also has is an override of the same shape: a method with the
    same parameter names (or one that passes ``*args, **kwargs`` through), a
    property for a property, and one that wins the MRO. This catches vLLM
    renaming a parameter we override, one of our helpers shadowing a vLLM
    method by accident, and a vLLM method hiding a mixin's. ``skip``: names
    vLLM never calls on ours (the constructor of a drop-in we build)."""
    for klass in (k for k in ours.__mro__ if _ours(k)):
        for name, value in vars(klass).items():
            if (name.startswith("__") and name != "__init__") or name in ("_abc_impl", *skip):
                continue
            theirs = _vllm_attr(base, name)
            if theirs is None:
                continue
            where = f"{klass.__qualname__}.{name} overrides {base.__qualname__}.{name}"
            winner = next(k for k in ours.__mro__ if name in vars(k))
            expect(
                _ours(winner),
                f"{where}, but {winner.__qualname__}'s comes first in {ours.__qualname__}'s MRO",
                user,
            )
            if isinstance(theirs, property) or isinstance(value, property):
                expect(
                    isinstance(theirs, property) and isinstance(value, property),
                    f"{where}: one is a property, the other is not",
                    user,
                )
                continue
            mine, vllms = getattr(klass, name), getattr(base, name)
            if not (callable(mine) and callable(vllms)):
                expect(type(mine) is type(vllms), f"{where}: {type(vllms)} vs {type(mine)}", user)
                continue
            expect(
                _passes_everything(mine) or params(mine) == params(vllms),
                f"{where} with parameters {params(mine)}, vLLM's take {params(vllms)}",
                user,
            )


@pytest.fixture
def stock_scheduler(config_model_dir: str) -> Any:
    """vLLM's own ``Scheduler`` (no vllm_esp code), 40 usable blocks of 16."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_esp.harness.scheduler import create_scheduler

    return create_scheduler(config_model_dir, scheduler_cls=Scheduler, num_blocks=41)


# ================================================================ vllm
def test_pinned_vllm_version() -> None:
    assert vllm.__version__.split("+")[0] == vllm_esp.VLLM_VERSION, (
        f"vllm-esp is written against vLLM {vllm_esp.VLLM_VERSION}, found {vllm.__version__}: "
        "re-check every item in this file before moving the pin"
    )


@pytest.mark.parametrize("group", ["vllm.general_plugins", "vllm.stat_logger_plugins"])
def test_entry_points_installed(group: str) -> None:
    """``vllm_esp.register`` (CLI flags, runtime patches) and the stat logger
    reach vLLM only through these entry points (pyproject.toml)."""
    from importlib.metadata import entry_points

    from vllm.plugins import DEFAULT_PLUGINS_GROUP, STAT_LOGGER_PLUGINS_GROUP

    assert group in (DEFAULT_PLUGINS_GROUP, STAT_LOGGER_PLUGINS_GROUP), (
        f"vLLM no longer loads plugins from {group!r}"
    )
    ours = [e for e in entry_points(group=group) if e.value.startswith("vllm_esp")]
    assert ours, f"vllm-esp is not registered in {group}: reinstall the package"


# ========================================= vllm.v1.core.sched.scheduler
def test_scheduler_methods_we_override_or_call() -> None:
    """MLFQScheduler (and ESPScheduler over it) overrides ``__init__``,
    ``add_request``, ``_free_request``, ``_preempt_request``, ``schedule`` and
    ``make_stats``, and calls ``_handle_blocked_waiting_request`` for landed
    prefetches."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    user = MLFQ_SCHEDULER
    expect(issubclass(AsyncScheduler, Scheduler), "AsyncScheduler is no Scheduler", user)
    expect_params(
        Scheduler.__init__,
        [
            "self",
            "vllm_config",
            "kv_cache_config",
            "structured_output_manager",
            "block_size",
            "hash_block_size",
        ],
        user,
        prefix=True,
    )
    expect_params(Scheduler.schedule, ["self", "throttle_prefills"], user)
    expect_params(Scheduler.add_request, ["self", "request"], user)
    expect_params(
        Scheduler._preempt_request, ["self", "request", "timestamp", "drop_stale_output"], user
    )
    expect_params(Scheduler._free_request, ["self", "request", "delay_free_blocks"], user)
    expect_params(Scheduler._handle_blocked_waiting_request, ["self", "request"], user)
    expect_params(
        Scheduler.update_from_output, ["self", "scheduler_output", "model_runner_output"], user
    )
    expect_params(Scheduler.finish_requests, ["self", "request_ids", "finished_status"], user)
    expect(
        "kv_connector_stats" in params(Scheduler.make_stats),
        "Scheduler.make_stats lost kv_connector_stats",
        user,
    )


def test_prefill_chunk_hook_the_hostage_bound_uses() -> None:
    """ESPScheduler caps prefill chunks in ``_reserve_prefill_lookahead``,
    the last place vLLM trims a chunk before ``allocate_slots``, on both the
    running and the waiting path of ``schedule()``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    user = ESP_SCHEDULER
    expect_params(
        Scheduler._reserve_prefill_lookahead,
        ["self", "request", "num_computed_tokens", "num_new_tokens"],
        user,
    )
    num_calls = inspect.getsource(Scheduler.schedule).count("self._reserve_prefill_lookahead(")
    expect(num_calls == 2, f"schedule() calls _reserve_prefill_lookahead {num_calls}x, not 2", user)


def test_step_token_budgets_the_esp_scheduler_scales() -> None:
    """ESPScheduler makes ``max_num_batched_tokens`` per instance by scaling
    the two budgets ``schedule()`` reads (the token budget and, from the
    scheduler's own ``scheduler_config``, the input budget)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    expect_source(
        Scheduler.schedule,
        [
            "token_budget = self.max_num_scheduled_tokens",
            "input_budget = self.scheduler_config.max_num_batched_tokens",
        ],
        ESP_SCHEDULER,
    )


def test_our_scheduler_overrides_match_vllms() -> None:
    """Every method of MLFQScheduler / ESPScheduler that shares a name with a
    vLLM scheduler method takes vLLM's parameters. MLFQAsyncScheduler puts
    MLFQScheduler before AsyncScheduler, so AsyncScheduler's methods count."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from vllm_esp.integration.esp.scheduler import ESPScheduler
    from vllm_esp.integration.mlfq.scheduler import MLFQAsyncScheduler, MLFQScheduler

    mro = MLFQAsyncScheduler.__mro__
    expect(
        mro.index(MLFQScheduler) < mro.index(AsyncScheduler),
        f"MLFQAsyncScheduler's MRO puts AsyncScheduler first: {mro}",
        MLFQ_SCHEDULER,
    )
    expect_consistent_overrides(MLFQScheduler, AsyncScheduler, MLFQ_SCHEDULER)
    expect_consistent_overrides(ESPScheduler, AsyncScheduler, ESP_SCHEDULER)


def test_engine_core_builds_and_drives_the_scheduler() -> None:
    """``MLFQScheduler.__new__`` picks the async variant from the
    ``vllm_config`` keyword EngineCore passes; the ESP executor reads
    ``esp_plan`` off the very ``SchedulerOutput`` EngineCore hands it (same
    process, no copy); the qualname in ``scheduler_cls`` is resolved by vLLM."""
    from vllm.v1.engine.core import EngineCore

    init = inspect.getsource(EngineCore.__init__)
    expect(
        re.search(r"Scheduler\(\s*vllm_config=vllm_config", init) is not None,
        "EngineCore no longer builds the scheduler with vllm_config=...",
        MLFQ_SCHEDULER,
    )
    expect_source(EngineCore.__init__, ["scheduler_config.get_scheduler_cls()"], MLFQ_SCHEDULER)
    expect_source(
        EngineCore.step,
        [
            "scheduler_output = self.scheduler.schedule(",
            "execute_model(scheduler_output, non_block=True)",
        ],
        ESP_EXECUTOR,
    )


def test_scheduler_state_we_read(stock_scheduler: Any) -> None:
    """Scheduler attributes MLFQScheduler reads, and the ones it swaps for
    the step (``running``, ``waiting``, ``kv_holding_waiting``,
    ``max_num_active_reqs``); host swap reads the connector and async-load
    bookkeeping (``finished_recving_kv_req_ids``, ``deferred_waiting``,
    ``_inflight_prefills``)."""
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.core.sched.request_queue import RequestQueue

    s, user = stock_scheduler, MLFQ_SCHEDULER
    expect_attrs(
        s,
        (
            "running",
            "waiting",
            "kv_holding_waiting",
            "deferred_waiting",
            "requests",
            "kv_cache_manager",
            "kv_cache_config",
            "max_num_running_reqs",
            "max_num_active_reqs",
            "max_num_scheduled_tokens",
            "num_lookahead_tokens",
            "scheduler_reserve_full_isl",
            "max_model_len",
            "num_waiting_for_streaming_input",
            "_pause_state",
            "block_size",
            "scheduler_config",
            "cache_config",
            "vllm_config",
            "connector",
            "finished_recving_kv_req_ids",
            "_inflight_prefills",
        ),
        "vllm.v1.core.sched.scheduler.Scheduler",
        user,
    )
    expect(isinstance(s.running, list), "Scheduler.running is no list", user)
    for name in ("waiting", "kv_holding_waiting"):
        expect(
            isinstance(getattr(s, name), RequestQueue), f"Scheduler.{name} is no RequestQueue", user
        )
    for name in ("deferred_waiting", "_inflight_prefills", "finished_recving_kv_req_ids"):
        expect(isinstance(getattr(s, name), set), f"Scheduler.{name} is no set", user)
    expect(s._pause_state == PauseState.UNPAUSED, "Scheduler._pause_state vs PauseState", user)
    expect(isinstance(s.max_num_active_reqs, int), "max_num_active_reqs is no int", user)
    expect_attrs(
        s.scheduler_config,
        (
            "long_prefill_token_threshold",
            "enable_chunked_prefill",
            "async_scheduling",
            "scheduler_cls",
        ),
        "SchedulerConfig",
        user,
    )
    expect_attrs(s.cache_config, ("enable_prefix_caching",), "CacheConfig", user)


def test_scheduler_stats_side_channel(stock_scheduler: Any) -> None:
    """MLFQScheduler.make_stats adds its numbers to the open
    ``num_kv_fetch_reqs_by_stage`` map of vLLM's ``SchedulerStats``."""
    from vllm.v1.metrics.stats import SchedulerStats

    fields = {f.name: f for f in dataclasses.fields(SchedulerStats)}
    expect(
        "num_kv_fetch_reqs_by_stage" in fields,
        "SchedulerStats lost num_kv_fetch_reqs_by_stage",
        MLFQ_SCHEDULER,
    )
    expect(
        fields["num_kv_fetch_reqs_by_stage"].type in ("dict[str, int]", dict[str, int]),
        "SchedulerStats.num_kv_fetch_reqs_by_stage is no dict[str, int]",
        MLFQ_SCHEDULER,
    )
    stats = stock_scheduler.make_stats()
    expect(
        isinstance(stats.num_kv_fetch_reqs_by_stage, dict),
        "make_stats() returns no mutable num_kv_fetch_reqs_by_stage",
        MLFQ_SCHEDULER,
    )


# ================================== vllm.v1.core.sched.request_queue
def test_request_queue_contract() -> None:
    """IndexedRequestQueue implements RequestQueue; the MLFQ step queues are
    vLLM's FCFSRequestQueue, whose ``remove_requests`` must ignore requests
    it does not hold (the scheduler removes every admitted request from
    both full queues)."""
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, RequestQueue

    from vllm_esp.harness.scheduler import make_request
    from vllm_esp.integration.mlfq.queue import IndexedRequestQueue

    abstract = set(RequestQueue.__abstractmethods__)
    expect(
        abstract
        == {
            "add_request",
            "pop_request",
            "peek_request",
            "prepend_request",
            "prepend_requests",
            "remove_request",
            "remove_requests",
            "__bool__",
            "__len__",
            "__iter__",
        },
        f"RequestQueue's abstract methods are {sorted(abstract)}",
        MLFQ_QUEUE,
    )
    expect_consistent_overrides(IndexedRequestQueue, RequestQueue, MLFQ_QUEUE)
    a, b = make_request("queued", 4, 1), make_request("absent", 4, 1)
    queue = FCFSRequestQueue()
    queue.append(a)
    queue.add_request(b)
    queue.remove_request(b)
    queue.remove_requests([a, b])
    expect(not queue and a not in queue, "FCFSRequestQueue.remove_requests changed", MLFQ_SCHEDULER)


# =========================================================== vllm.v1.request
def test_request_fields() -> None:
    """Request attributes read by MLFQScheduler (ranking, planning, async
    and swap gates), ESPScheduler (placement views, token ids, sampling
    spec) and the swap connector; ``num_computed_tokens`` is also written
    (a prefetch given back restarts at 0)."""
    from vllm.v1.request import Request, RequestStatus

    from vllm_esp.harness.scheduler import make_request

    r = make_request("sig", 8, 4)
    expect(isinstance(r, Request), "make_request builds no vllm Request", MLFQ_SCHEDULER)
    expect_attrs(
        r,
        (
            "request_id",
            "status",
            "num_prompt_tokens",
            "num_tokens",
            "num_tokens_with_spec",
            "num_computed_tokens",
            "num_output_placeholders",
            "max_tokens",
            "num_preemptions",
            "skip_reading_prefix_cache",
            "num_stale_output_tokens",
            "drop_stale_output",
            "is_prefill_chunk",
        ),
        "vllm.v1.request.Request",
        f"{MLFQ_SCHEDULER} and {SWAP_CONNECTOR}",
    )
    expect_attrs(
        r,
        ("all_token_ids", "num_output_tokens", "sampling_params"),
        "vllm.v1.request.Request",
        ESP_SCHEDULER,
    )
    expect_attrs(
        r.sampling_params,
        ("temperature", "top_p", "top_k", "min_p", "seed"),
        "SamplingParams",
        ESP_SCHEDULER,
    )
    expect(callable(r.is_finished), "Request.is_finished is gone", MLFQ_SCHEDULER)
    r.num_computed_tokens = 0  # written by MLFQScheduler._unprefetch
    members = {
        "WAITING",
        "WAITING_FOR_REMOTE_KVS",
        "RUNNING",
        "PREEMPTED",
        "FINISHED_STOPPED",
        "FINISHED_ABORTED",
    }
    expect(
        members <= set(RequestStatus.__members__),
        f"RequestStatus lost {sorted(members - set(RequestStatus.__members__))}",
        MLFQ_SCHEDULER,
    )


# ======================================== vllm.v1.core.sched.output
def test_scheduler_output_fields_and_esp_plan(stock_scheduler: Any) -> None:
    """SchedulerOutput fields read by MLFQScheduler, ESPScheduler, the ESP
    executor and the swap connector; ESPScheduler sets the ad-hoc attribute
    ``esp_plan`` on it, so it must stay a plain (non-slotted) object."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    from vllm_esp.harness.scheduler import fake_output, make_request

    expect_fields(
        SchedulerOutput,
        (
            "num_scheduled_tokens",
            "finished_req_ids",
            "preempted_req_ids",
            "kv_connector_metadata",
            "has_sync_kv_loads",
            "scheduled_new_reqs",
            "scheduled_cached_reqs",
        ),
        f"{MLFQ_SCHEDULER}, {ESP_SCHEDULER}, {ESP_EXECUTOR} and {SWAP_CONNECTOR}",
    )
    expect_fields(NewRequestData, ("req_id", "block_ids"), SWAP_CONNECTOR)
    expect_fields(CachedRequestData, ("new_block_ids", "resumed_req_ids"), SWAP_CONNECTOR)
    charge = f"{MLFQ_SCHEDULER} (its charge of the step)"
    expect_fields(NewRequestData, ("req_id", "num_computed_tokens"), charge)
    expect_fields(CachedRequestData, ("req_ids", "num_computed_tokens"), charge)
    stock_scheduler.add_request(make_request("a", 40, 2))
    out = stock_scheduler.schedule()
    expect(
        out.num_scheduled_tokens == {"a": 40}, "num_scheduled_tokens is no {id: n}", MLFQ_SCHEDULER
    )
    # The charge reads the count before the step's tokens from the output,
    # while the request's own count already includes them.
    new = out.scheduled_new_reqs
    expect(
        [(r.req_id, r.num_computed_tokens) for r in new] == [("a", 0)],
        "NewRequestData.num_computed_tokens is not the count before the step",
        charge,
    )
    stock_scheduler.update_from_output(out, fake_output(stock_scheduler, out))
    second = stock_scheduler.schedule()
    cached = second.scheduled_cached_reqs
    expect(
        (cached.req_ids, cached.num_computed_tokens) == (["a"], [40]),
        "CachedRequestData.num_computed_tokens is not the count before the step",
        charge,
    )
    expect(
        not second.scheduled_new_reqs and second.num_scheduled_tokens == {"a": 1},
        "a running request is not listed among the cached ones alone",
        charge,
    )
    try:
        out.esp_plan = "plan"
    except AttributeError:
        expect(False, "SchedulerOutput no longer takes new attributes (esp_plan)", ESP_SCHEDULER)
    expect(out.esp_plan == "plan", "SchedulerOutput dropped esp_plan", ESP_SCHEDULER)


# ============================================= vllm.v1.core.kv_cache_manager
def test_kv_cache_manager_calls(stock_scheduler: Any) -> None:
    """KVCacheManager methods MLFQScheduler calls: the prefix-cache hit at
    arrival (skip-join), block ids for swap-out, the blocks' ``ref_cnt``
    (exclusive blocks of a victim), ``free`` (a prefetch given back), the
    ``watermark_blocks`` admission gate, and the free-block count."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager

    from vllm_esp.harness.scheduler import make_request, step

    user = MLFQ_SCHEDULER
    expect_params(KVCacheManager.get_computed_blocks, ["self", "request"], user)
    expect_params(KVCacheManager.get_block_ids, ["self", "request_id"], user)
    expect_params(KVCacheManager.get_blocks, ["self", "request_id"], user)
    expect_params(KVCacheManager.free, ["self", "request"], user)
    expect_fields(KVCacheBlocks, ("blocks",), user)
    s = stock_scheduler
    kvm = s.kv_cache_manager
    request = make_request("a", 40, 2)
    hit = kvm.get_computed_blocks(request)
    expect(
        isinstance(hit, tuple) and len(hit) == 3 and isinstance(hit[1], int),
        f"get_computed_blocks returns {hit!r}, not (blocks, num_cached_tokens, _)",
        user,
    )
    s.add_request(request)
    step(s)
    (ids,) = kvm.get_block_ids("a")
    expect(
        len(ids) == 3 and all(isinstance(i, int) for i in ids),
        f"get_block_ids returns {ids!r}",
        user,
    )
    blocks = kvm.get_blocks("a").blocks[0]
    expect(
        [b.block_id for b in blocks] == ids and all(b.ref_cnt == 1 for b in blocks),
        "get_blocks(...).blocks[0] is no list of KVCacheBlock with ref_cnt",
        user,
    )
    expect(isinstance(kvm.watermark_blocks, int), "KVCacheManager.watermark_blocks", user)
    free = kvm.block_pool.get_num_free_blocks()
    kvm.free(request)
    expect(kvm.block_pool.get_num_free_blocks() == free + 3, "KVCacheManager.free", user)


def test_allocate_slots_is_called_through_the_instance(stock_scheduler: Any) -> None:
    """ESPScheduler replaces ``kv_cache_manager.allocate_slots`` on the
    instance with a wrapper taking ``(request, num_new_tokens, *args,
    **kwargs)``: vLLM's ``schedule()`` must look it up on the instance, for
    new and running requests, and get ``KVCacheBlocks`` (or None) back."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager

    from vllm_esp.harness.scheduler import make_request, step

    user = ESP_SCHEDULER
    expect_params(
        KVCacheManager.allocate_slots, ["self", "request", "num_new_tokens"], user, prefix=True
    )
    s = stock_scheduler
    kvm = s.kv_cache_manager
    original = kvm.allocate_slots
    calls: list[tuple[str, int, Any]] = []

    def wrapper(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
        blocks = original(request, num_new_tokens, *args, **kwargs)
        calls.append((request.request_id, num_new_tokens, blocks))
        return blocks

    kvm.allocate_slots = wrapper
    s.add_request(make_request("a", 40, 4))
    first, _ = step(s)  # a new request (the waiting path)
    second, _ = step(s)  # a running one
    expect(
        [(rid, n) for rid, n, _ in calls] == [("a", 40), ("a", 1)],
        f"schedule() bypassed the instance's allocate_slots: {calls}",
        user,
    )
    expect(
        all(isinstance(b, KVCacheBlocks) and b.get_block_ids()[0] is not None for _, _, b in calls),
        "allocate_slots returns no KVCacheBlocks",
        user,
    )
    expect(
        first.num_scheduled_tokens == {"a": 40} and second.num_scheduled_tokens == {"a": 1},
        "the wrapped allocation changed what was scheduled",
        user,
    )


def test_a_prefix_hit_reaches_allocate_slots_as_keywords(config_model_dir: str) -> None:
    """ESPScheduler places a request admitted with a prefix-cache hit by the
    hit's blocks, which vLLM passes to ``allocate_slots`` by keyword
    (``new_computed_blocks``, a ``KVCacheBlocks``; ``num_new_computed_tokens``)
    before they are on the request's table."""
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_esp.harness.scheduler import create_scheduler, make_request, step

    user = ESP_SCHEDULER
    s = create_scheduler(
        config_model_dir, scheduler_cls=Scheduler, num_blocks=41, enable_prefix_caching=True
    )
    kvm = s.kv_cache_manager
    original = kvm.allocate_slots
    seen: list[tuple[str, dict[str, Any]]] = []

    def wrapper(request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
        seen.append((request.request_id, dict(kwargs)))
        return original(request, num_new_tokens, *args, **kwargs)

    kvm.allocate_slots = wrapper
    prompt = list(range(1, 49))  # three full blocks of 16
    s.add_request(make_request("a", 48, 4, prompt_token_ids=prompt))
    step(s)
    (first_ids,) = kvm.get_block_ids("a")
    s.add_request(make_request("b", 48, 4, prompt_token_ids=prompt))
    step(s)
    hit = next(kw for rid, kw in seen if rid == "b")
    blocks = hit.get("new_computed_blocks")
    expect(
        isinstance(blocks, KVCacheBlocks) and hit.get("num_new_computed_tokens", 0) > 0,
        f"a prefix hit no longer reaches allocate_slots as keywords: {sorted(hit)}",
        user,
    )
    hit_ids = [b.block_id for b in blocks.blocks[0]]
    expect(
        bool(hit_ids) and hit_ids == list(first_ids[: len(hit_ids)]),
        "new_computed_blocks.blocks[0] are not the hit's blocks",
        user,
    )


def test_req_to_blocks_is_the_live_block_table(stock_scheduler: Any) -> None:
    """ESPScheduler reads ``coordinator.single_type_managers[0].req_to_blocks``
    (placement views, plans) and rewrites entries in place (migrations);
    MLFQScheduler sums its lengths to bound what eviction frees: it must be
    the table vLLM itself reports and frees from."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlock
    from vllm.v1.request import RequestStatus

    from vllm_esp.harness.scheduler import make_request, step

    user = ESP_SCHEDULER
    s = stock_scheduler
    kvm = s.kv_cache_manager
    managers = kvm.coordinator.single_type_managers
    expect(len(managers) == 1, "one KV group has no single single_type_manager", user)
    table_of = managers[0].req_to_blocks
    s.add_request(make_request("a", 40, 4))
    step(s)
    table = table_of.get("a", ())
    expect(
        isinstance(table, list) and all(isinstance(b, KVCacheBlock) for b in table),
        "req_to_blocks[req_id] is no list of KVCacheBlock",
        user,
    )
    expect(
        [b.block_id for b in table] == kvm.get_block_ids("a")[0],
        "req_to_blocks disagrees with get_block_ids",
        user,
    )
    # A migration swaps an entry for a fresh block and frees the old one.
    pool = kvm.block_pool
    (fresh,) = pool.get_new_blocks(1)
    old, table[0] = table[0], fresh
    pool.free_blocks([old])
    expect(
        kvm.get_block_ids("a")[0][0] == fresh.block_id,
        "an entry written into req_to_blocks is not what vLLM reports",
        user,
    )
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    expect(
        table_of.get("a", ()) == [] or "a" not in table_of,
        "a finished request keeps its req_to_blocks entry",
        user,
    )
    expect(
        pool.get_num_free_blocks() == pool.num_gpu_blocks - 1,
        "blocks rewritten in req_to_blocks are not freed with the request",
        user,
    )


# ================================================= vllm.v1.core.block_pool
def test_block_pool_fields_and_free_queue_methods() -> None:
    """ESPScheduler replaces ``block_pool.free_block_queue`` with
    InstanceFreeQueues, built from ``block_pool.blocks`` minus
    ``null_block``; it takes migration destinations with ``get_new_blocks``
    and returns sources with ``free_blocks``. Every queue method vLLM calls
    on ``free_block_queue`` must exist on InstanceFreeQueues."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

    from vllm_esp.integration.esp.free_queues import InstanceFreeQueues

    expect_params(FreeKVCacheBlockQueue.__init__, ["self", "blocks"], FREE_QUEUES)
    expect_params(BlockPool.get_new_blocks, ["self", "num_blocks"], ESP_SCHEDULER)
    expect_params(BlockPool.free_blocks, ["self", "ordered_blocks"], ESP_SCHEDULER, prefix=True)
    expect_params(BlockPool.get_num_free_blocks, ["self"], MLFQ_SCHEDULER)
    expect_source(
        BlockPool.__init__,
        [
            "self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)",
            "self.null_block = self.free_block_queue.popleft()",
        ],
        FREE_QUEUES,
    )
    expect_source(
        BlockPool.get_num_free_blocks, ["return self.free_block_queue.num_free_blocks"], FREE_QUEUES
    )
    used = set(re.findall(r"free_block_queue\.(\w+)", inspect.getsource(BlockPool)))
    missing = sorted(n for n in used if not hasattr(InstanceFreeQueues, n))
    expect(not missing, f"BlockPool now calls free_block_queue.{missing}", FREE_QUEUES)
    for name in (
        "popleft",
        "popleft_n",
        "remove",
        "append",
        "append_n",
        "prepend_n",
        "get_all_free_blocks",
        "iter_blocks_after",
    ):
        expect(
            hasattr(FreeKVCacheBlockQueue, name) and hasattr(InstanceFreeQueues, name),
            f"FreeKVCacheBlockQueue.{name} (stood in for by InstanceFreeQueues)",
            FREE_QUEUES,
        )
    expect_consistent_overrides(
        InstanceFreeQueues, FreeKVCacheBlockQueue, FREE_QUEUES, skip=("__init__",)
    )
    expect_attrs(KVCacheBlock, ("block_id", "ref_cnt", "is_null"), "KVCacheBlock", ESP_SCHEDULER)


def test_block_pool_works_through_instance_free_queues(stock_scheduler: Any) -> None:
    """With InstanceFreeQueues installed as ESPScheduler installs it, vLLM's
    pool allocates from the chosen instance, counts the N queues' sum as
    free and gets every block back when requests finish."""
    from vllm_esp.core.esp.placement import StoragePlacement
    from vllm_esp.harness.scheduler import make_request, step
    from vllm_esp.integration.esp.free_queues import InstanceFreeQueues

    user = ESP_SCHEDULER
    s = stock_scheduler
    pool = s.kv_cache_manager.block_pool
    expect(
        [b.block_id for b in pool.blocks] == list(range(41)),
        "block_pool.blocks[i].block_id is not i",
        user,
    )
    expect(
        pool.null_block is pool.blocks[0] and pool.null_block.is_null,
        "block_pool.null_block is not blocks[0]",
        user,
    )
    queues = InstanceFreeQueues(pool.blocks, 2, 21, exclude=[pool.null_block])
    pool.free_block_queue = queues
    expect(pool.get_num_free_blocks() == 40, "get_num_free_blocks ignores free_block_queue", user)
    queues.placement = StoragePlacement((1,))
    fresh = pool.get_new_blocks(3)
    queues.placement = None
    expect(
        [b.block_id // 21 for b in fresh] == [1, 1, 1] and all(b.ref_cnt == 1 for b in fresh),
        "get_new_blocks no longer pops from free_block_queue",
        user,
    )
    pool.free_blocks(fresh)
    expect(queues.free_per_instance() == [20, 20], "free_blocks bypasses free_block_queue", user)
    for i in range(3):
        s.add_request(make_request(f"r{i}", 100, 20))
    while s.has_requests():
        step(s)
    expect(
        queues.free_per_instance() == [20, 20] and pool.get_num_free_blocks() == 40,
        f"blocks lost through InstanceFreeQueues: {queues.free_per_instance()}",
        user,
    )


# ============================================= vllm.v1.core.kv_cache_utils
def test_kv_cache_config_and_per_instance_planner(stock_scheduler: Any) -> None:
    """The ESP executor plans one instance's cache with vLLM's own
    ``get_kv_cache_config_from_groups`` for ``nb`` blocks' worth of memory
    (``_pool_bytes_per_block``) and expects exactly ``nb`` blocks back;
    ESPScheduler and the swap connector read the group's page size."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import KVCacheConfig

    user = ESP_EXECUTOR
    expect_params(
        kv_cache_utils.get_kv_cache_config_from_groups,
        ["vllm_config", "kv_cache_groups", "available_memory"],
        user,
    )
    expect_params(kv_cache_utils._pool_bytes_per_block, ["vllm_config", "kv_cache_groups"], user)
    expect_fields(KVCacheConfig, ("num_blocks", "kv_cache_groups", "kv_cache_layout"), user)
    config = stock_scheduler.vllm_config
    resolve_kv_cache_layout(
        config, [[la.name for la in CPUAttentionBackend.supported_kv_cache_layouts()]]
    )
    groups = stock_scheduler.kv_cache_config.kv_cache_groups
    local = kv_cache_utils.get_kv_cache_config_from_groups(
        config, groups, 7 * kv_cache_utils._pool_bytes_per_block(config, groups)
    )
    expect(local.num_blocks == 7, f"7 blocks' memory planned as {local.num_blocks} blocks", user)
    (group,) = groups
    expect_attrs(
        group,
        ("kv_cache_spec", "layer_names"),
        "KVCacheGroupSpec",
        f"{ESP_SCHEDULER} and {SWAP_CONNECTOR}",
    )
    expect(
        isinstance(group.kv_cache_spec.page_size_bytes, int) and group.kv_cache_spec.block_size,
        "KVCacheSpec.page_size_bytes / block_size",
        SWAP_CONNECTOR,
    )


# ======================================= vllm.distributed.kv_transfer
def test_kv_connector_base_methods_we_override() -> None:
    """HostSwapConnector subclasses KVConnectorBase_V1; these are the base
    methods it overrides (scheduler and worker side) and the ones it calls."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorWorkerMetadata,
    )

    from vllm_esp.integration.swap.connector import (
        HostSwapConnector,
        HostSwapMetadata,
        HostSwapWorkerMetadata,
    )

    user, base = SWAP_CONNECTOR, KVConnectorBase_V1
    expect_params(base.__init__, ["self", "vllm_config", "role", "kv_cache_config"], user)
    for name, expected in {
        "get_num_new_matched_tokens": ["self", "request", "num_computed_tokens"],
        "update_state_after_alloc": ["self", "request", "blocks", "num_external_tokens"],
        "build_connector_meta": ["self", "scheduler_output"],
        "update_connector_output": ["self", "connector_output"],
        "request_finished": ["self", "request", "block_ids"],
        "get_loaded_kv_cache_group_ids": ["self", "request"],
        "reset_cache": ["self"],
        "register_kv_caches": ["self", "kv_caches"],
        "handle_preemptions": ["self", "kv_connector_metadata"],
        "start_load_kv": ["self", "forward_context", "kwargs"],
        "wait_for_layer_load": ["self", "layer_name"],
        "save_kv_layer": ["self", "layer_name", "kv_layer", "attn_metadata", "kwargs"],
        "wait_for_save": ["self"],
        "get_finished": ["self", "finished_req_ids"],
        "build_connector_worker_meta": ["self"],
        "shutdown": ["self"],
        "_get_connector_metadata": ["self"],
    }.items():
        expect_params(getattr(base, name), expected, user)
    expect(
        isinstance(inspect.getattr_static(base, "requires_kv_delivery"), property),
        "KVConnectorBase_V1.requires_kv_delivery is no property",
        user,
    )
    expect({"SCHEDULER", "WORKER"} <= set(KVConnectorRole.__members__), "KVConnectorRole", user)
    expect_params(KVConnectorWorkerMetadata.aggregate, ["self", "other"], user)
    expect(
        issubclass(HostSwapMetadata, KVConnectorMetadata)
        and issubclass(HostSwapWorkerMetadata, KVConnectorWorkerMetadata),
        "connector metadata bases",
        user,
    )
    expect_consistent_overrides(HostSwapConnector, base, user)
    expect_consistent_overrides(
        HostSwapWorkerMetadata, KVConnectorWorkerMetadata, user, skip=("__init__",)
    )
    abstract = set(HostSwapConnector.__abstractmethods__)
    expect(not abstract, f"KVConnectorBase_V1 gained abstract methods {sorted(abstract)}", user)


def test_kv_connector_is_built_from_the_module_path(config_model_dir: str) -> None:
    """``mlfq-swap`` selects the connector by name + ``kv_connector_module_path``
    (engine_args.swap_kv_transfer_config); vLLM resolves it through
    KVConnectorFactory (cpu_cores reads the class there too) and builds the
    scheduler-side instance as ``scheduler.connector``."""
    from vllm.config.kv_transfer import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_esp.harness.scheduler import create_scheduler
    from vllm_esp.integration.engine_args import swap_kv_transfer_config
    from vllm_esp.integration.swap.connector import HostSwapConnector

    expect_fields(
        KVTransferConfig, ("kv_connector", "kv_connector_module_path", "kv_role"), ENGINE_ARGS
    )
    expect_params(KVConnectorFactory.get_connector_class, ["kv_transfer_config"], CPU_CORES)
    expect(
        KVConnectorFactory.get_connector_class(swap_kv_transfer_config()) is HostSwapConnector,
        "KVConnectorFactory no longer loads a connector by kv_connector_module_path",
        ENGINE_ARGS,
    )
    expect_params(get_kv_transfer_group, [], SWAP_CONNECTOR)
    s = create_scheduler(
        config_model_dir, scheduler_cls=Scheduler, kv_transfer_config=swap_kv_transfer_config()
    )
    expect(
        isinstance(s.connector, HostSwapConnector),
        f"Scheduler.connector is {type(s.connector)}",
        MLFQ_SCHEDULER,
    )


def test_kv_cache_specs_the_swap_supports() -> None:
    """HostSwapConnector accepts exactly FullAttentionSpec / MLAAttentionSpec
    groups and sizes host slots from ``page_size_bytes``."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    for spec in (FullAttentionSpec, MLAAttentionSpec):
        expect(
            isinstance(inspect.getattr_static(spec, "page_size_bytes"), property),
            f"{spec.__name__}.page_size_bytes is no property",
            SWAP_CONNECTOR,
        )
        expect_fields(spec, ("block_size",), SWAP_CONNECTOR)


# ================================================== vllm.v1.outputs
def test_model_runner_outputs() -> None:
    """The ESP executor builds ModelRunnerOutput (and KVConnectorOutput for
    landed prefetches) itself, returns EMPTY_MODEL_RUNNER_OUTPUT for empty
    steps; the swap connector reads the worker metadata back."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, KVConnectorOutput, ModelRunnerOutput

    expect_fields(
        ModelRunnerOutput,
        ("req_ids", "req_id_to_index", "sampled_token_ids", "kv_connector_output"),
        ESP_EXECUTOR,
    )
    expect_fields(
        KVConnectorOutput,
        ("finished_recving", "kv_connector_worker_meta"),
        f"{ESP_EXECUTOR} and {SWAP_CONNECTOR}",
    )
    expect(EMPTY_MODEL_RUNNER_OUTPUT.req_ids == [], "EMPTY_MODEL_RUNNER_OUTPUT", ESP_EXECUTOR)
    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[7]])
    out.kv_connector_output = KVConnectorOutput(finished_recving={"a"})
    expect(out.kv_connector_output.finished_recving == {"a"}, "KVConnectorOutput", ESP_EXECUTOR)


# ================================================= vllm.v1.executor
def test_executor_base_we_subclass(stock_scheduler: Any) -> None:
    """ESPExecutor subclasses Executor: EngineCore resolves it from the
    qualname in ``distributed_executor_backend``, ``__init__`` calls
    ``_init_executor``, and these are the methods EngineCore calls on it."""
    from vllm.v1.executor.abstract import Executor

    from vllm_esp.core.choices import ESP_EXECUTOR_CLS
    from vllm_esp.integration.esp.executor import ESPExecutor

    user = ESP_EXECUTOR
    expect_attrs(
        Executor,
        (
            "_init_executor",
            "collective_rpc",
            "execute_model",
            "sample_tokens",
            "determine_available_memory",
            "get_kv_cache_specs",
            "initialize_from_config",
            "check_health",
            "shutdown",
            "take_draft_token_ids",
            "supports_async_scheduling",
            "uses_ray",
            "supports_pp",
        ),
        "vllm.v1.executor.abstract.Executor",
        user,
    )
    expect_params(
        Executor.collective_rpc,
        ["self", "method", "timeout", "args", "kwargs", "non_block"],
        user,
        prefix=True,
    )
    expect_params(Executor.execute_model, ["self", "scheduler_output", "non_block"], user)
    expect_params(Executor.initialize_from_config, ["self", "kv_cache_configs"], user)
    expect_source(Executor.__init__, ["self._init_executor()"], user)
    # Not overridden: they go through collective_rpc (ESPExecutor's).
    expect_source(Executor.get_supported_kv_cache_layouts, ["self.collective_rpc("], user)
    expect_source(Executor.set_kv_cache_layout, ["self.collective_rpc("], user)
    expect_consistent_overrides(ESPExecutor, Executor, user)
    config = stock_scheduler.vllm_config
    config.parallel_config.distributed_executor_backend = ESP_EXECUTOR_CLS
    expect(
        Executor.get_class(config) is ESPExecutor,
        "Executor.get_class no longer resolves a qualname",
        user,
    )


def test_multiproc_executor_per_instance() -> None:
    """Each local ESP instance is vLLM's MultiprocExecutor with a world of
    one, driven through ``collective_rpc(..., non_block=True)``."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    user = ESP_INSTANCES
    expect_params(MultiprocExecutor.__init__, ["self", "vllm_config"], user, prefix=True)
    expect_params(
        MultiprocExecutor.collective_rpc,
        ["self", "method", "timeout", "args", "kwargs", "non_block"],
        user,
        prefix=True,
    )
    expect_attrs(MultiprocExecutor, ("check_health", "shutdown"), "MultiprocExecutor", user)


def test_reply_queues_an_instance_stops_spinning_on() -> None:
    """On CPU, MPInstance sets ``busy_loop_s = 0`` on the SpinCondition of
    each of its executor's ``response_mqs``: their reader then sleeps on
    the notification socket, which the writer signals on every enqueue."""
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue, SpinCondition
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    user = ESP_INSTANCES
    expect_source(MultiprocExecutor._init_executor, ["self.response_mqs"], user)
    expect_source(MessageQueue.create_from_handle, ["_spin_condition = SpinCondition("], user)
    expect_source(MessageQueue.enqueue, ["self._spin_condition.notify()"], user)
    expect_source(SpinCondition.wait, ["self.last_read + self.busy_loop_s"], user)


def test_ray_worker_wrapper_per_instance() -> None:
    """A Ray ESP instance is vLLM's RayWorkerWrapper as an actor:
    ``RayWorkerWrapper(rpc_rank=0)``, ``init_worker([kwargs])`` with the
    worker's constructor arguments, ``execute_method``, ``get_node_ip``."""
    from vllm.v1.executor.ray_utils import RayWorkerWrapper
    from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

    user = ESP_INSTANCES
    expect(issubclass(RayWorkerWrapper, WorkerWrapperBase), "RayWorkerWrapper's base", user)
    expect_params(WorkerWrapperBase.__init__, ["self", "rpc_rank"], user, prefix=True)
    expect_params(RayWorkerWrapper.init_worker, ["self", "all_kwargs"], user)
    expect_params(RayWorkerWrapper.execute_method, ["self", "method", "args", "kwargs"], user)
    expect_params(RayWorkerWrapper.get_node_ip, ["self"], user)
    expect_params(
        WorkerBase.__init__,
        [
            "self",
            "vllm_config",
            "local_rank",
            "rank",
            "distributed_init_method",
            "is_driver_worker",
        ],
        user,
    )


# ==================================================== vllm.v1.worker
@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_workers_we_subclass(platform: str) -> None:
    """ESPCPUWorker / ESPGPUWorker are ESPWorkerMixin over vLLM's workers,
    selected by qualname in ``parallel_config.worker_cls``; the executor
    calls these worker methods by name, and the mixin reads ``device``,
    ``model_runner.get_model()`` and the static forward context."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from vllm_esp.integration.esp import worker as esp_worker

    if platform == "cpu":
        from vllm.v1.worker.cpu_worker import CPUWorker as Base

        ours = esp_worker.ESPCPUWorker
    else:
        from vllm.v1.worker.gpu_worker import Worker as Base

        ours = esp_worker.ESPGPUWorker
    user = ESP_WORKER
    expect(issubclass(ours, Base), f"{ours.__name__} is no {Base.__name__}", user)
    expect_attrs(
        Base,
        (
            "init_device",
            "load_model",
            "determine_available_memory",
            "get_kv_cache_spec",
            "initialize_from_config",
            "shutdown",
        ),
        Base.__qualname__,
        f"{ESP_EXECUTOR} and {ESP_INSTANCES}",
    )
    expect_source(Base.init_device, ["self.device = torch.device("], user)
    expect_consistent_overrides(esp_worker.ESPWorkerMixin, Base, user)
    expect_source(WorkerWrapperBase.init_worker, ["worker_cls", "resolve_obj_by_qualname"], user)


def test_model_runner_and_forward_context() -> None:
    """The ESP runner takes the model from ``model_runner.get_model()``, the
    attention layers from ``compilation_config.static_forward_context``,
    runs ``model(input_ids=, positions=)`` / ``compute_logits`` under
    ``set_forward_context`` with the ESP step context as ``attn_metadata``
    and an empty ``slot_mapping`` (vLLM then skips its own KV write)."""
    from vllm.config import CompilationConfig
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.layers.attention import attention as attn_mod
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    user = ESP_RUNNER
    for runner in (CPUModelRunner, GPUModelRunner):
        expect_params(runner.get_model, ["self"], ESP_WORKER)
    expect(
        "static_forward_context" in {f.name for f in dataclasses.fields(CompilationConfig)},
        "CompilationConfig lost static_forward_context",
        ESP_WORKER,
    )
    expect(
        {"attn_metadata", "vllm_config", "num_tokens", "slot_mapping"}
        <= set(params(set_forward_context)),
        "set_forward_context's parameters",
        user,
    )
    expect_source(
        attn_mod.get_attention_context,
        ["isinstance(attn_metadata_raw, dict)", "slot_mapping.get(layer_name)"],
        user,
    )
    expect_params(LlamaForCausalLM.forward, ["self", "input_ids", "positions"], user, prefix=True)
    expect_params(LlamaForCausalLM.compute_logits, ["self", "hidden_states"], user)


def test_distributed_and_network_helpers() -> None:
    """The ESP group is a stateless torch process group beside vLLM's world
    of one; instance 0 offers an address for its rendezvous."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group
    from vllm.utils.network_utils import get_ip, get_open_port

    expect_params(
        stateless_init_torch_distributed_process_group,
        ["host", "port", "rank", "world_size", "backend"],
        ESP_WORKER,
        prefix=True,
    )
    expect_params(get_ip, [], ESP_WORKER)
    expect_params(get_open_port, [], ESP_WORKER)


# ================================================= attention backends
def test_attention_layer_attributes() -> None:
    """The ESP worker picks the Attention layers of the static forward
    context; the runner and step context read ``layer_name``, ``kv_cache``
    and (CPU) ``isa``, which CPU_ATTN's metadata builder sets on the layer."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    expect_source(
        Attention.__init__,
        ["self.layer_name", "self.kv_cache"],
        f"{ESP_WORKER}, {ESP_RUNNER} and {ESP_STEP_CONTEXT}",
    )
    expect_source(
        CPUAttentionMetadataBuilder,
        ["layer.isa = self.isa"],
        f"{ESP_ATTENTION} and {ESP_STEP_CONTEXT}",
    )


def test_cpu_attention_backend_we_subclass() -> None:
    """ESPCPUAttentionBackend / Impl subclass CPU_ATTN: the impl's forward
    signature and attributes, its metadata, the scheduler-metadata op and
    ``get_impl_cls``; registered over the CPU_ATTN member."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import (
        CPUAttentionBackend,
        CPUAttentionBackendImpl,
        CPUAttentionMetadata,
    )

    from vllm_esp.integration.esp import attention_backend as ours

    user = ESP_ATTENTION
    expect_params(
        CPUAttentionBackendImpl.forward,
        ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"],
        user,
        prefix=True,
    )
    expect_source(
        CPUAttentionBackendImpl.__init__,
        [
            f"self.{n} ="
            for n in (
                "scale",
                "num_heads",
                "num_kv_heads",
                "head_size",
                "kv_cache_dtype",
                "sliding_window",
                "alibi_slopes",
                "logits_soft_cap",
            )
        ],
        user,
    )
    expect_fields(
        CPUAttentionMetadata,
        (
            "num_actual_tokens",
            "max_query_len",
            "query_start_loc",
            "max_seq_len",
            "seq_lens",
            "block_table",
            "slot_mapping",
            "scheduler_metadata",
            "causal",
        ),
        user,
    )
    expect_params(
        ops.cpu_attn_get_scheduler_metadata,
        [
            "num_reqs",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "seq_lens",
            "dtype",
            "query_start_loc",
            "causal",
            "sliding_window_size",
            "isa",
            "enable_kv_split",
            "dynamic_causal",
            "kv_cache_dtype",
        ],
        user,
    )
    expect(
        isinstance(inspect.getattr_static(CPUAttentionBackend, "get_impl_cls"), staticmethod),
        "CPUAttentionBackend.get_impl_cls is no staticmethod",
        user,
    )
    expect_params(
        CPUAttentionBackendImpl.do_kv_cache_update,
        ["self", "layer", "key", "value", "kv_cache", "slot_mapping"],
        user,
    )
    expect(CPUAttentionBackend.get_name() == "CPU_ATTN", "CPU_ATTN's name", user)
    expect_consistent_overrides(ours.ESPCPUAttentionImpl, CPUAttentionBackendImpl, user)
    expect_consistent_overrides(ours.ESPCPUAttentionBackend, CPUAttentionBackend, user)


def test_flash_attention_backend_we_subclass() -> None:
    """ESPFlashAttentionBackend / Impl subclass FLASH_ATTN (CUDA)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    from vllm_esp.integration.esp import attention_backend as ours

    user = ESP_ATTENTION
    expect_params(
        FlashAttentionImpl.forward,
        ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"],
        user,
        prefix=True,
    )
    expect_source(
        FlashAttentionImpl.__init__,
        [
            f"self.{n} ="
            for n in ("scale", "num_heads", "sliding_window", "alibi_slopes", "logits_soft_cap")
        ],
        user,
    )
    expect(
        isinstance(inspect.getattr_static(FlashAttentionBackend, "get_impl_cls"), staticmethod),
        "FlashAttentionBackend.get_impl_cls",
        user,
    )
    expect_params(
        FlashAttentionImpl.do_kv_cache_update,
        ["self", "layer", "key", "value", "kv_cache", "slot_mapping"],
        user,
    )
    expect(FlashAttentionBackend.get_name() == "FLASH_ATTN", "FLASH_ATTN's name", user)
    expect_consistent_overrides(ours.ESPFlashAttentionImpl, FlashAttentionImpl, user)


def test_attention_backend_registry() -> None:
    """register_esp_backend overrides the CPU_ATTN / FLASH_ATTN members."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    expect(
        {"CPU_ATTN", "FLASH_ATTN"} <= set(AttentionBackendEnum.__members__),
        "AttentionBackendEnum lost CPU_ATTN / FLASH_ATTN",
        ESP_ATTENTION,
    )
    expect_params(register_backend, ["backend", "class_path"], ESP_ATTENTION, prefix=True)


# ======================================================= vllm.platforms
def test_platform_queries() -> None:
    """Platform checks made by the ESP executor, instances, worker and
    attention backend, the cost model and the CPU-core patch."""
    from vllm.platforms import current_platform

    expect_attrs(
        current_platform,
        ("is_cpu", "is_cuda", "is_cuda_alike", "device_count", "device_name"),
        "current_platform",
        f"{ESP_INSTANCES}, {ESP_ATTENTION}, {COST_MODEL} and {CPU_CORES}",
    )


def test_environment_variables() -> None:
    """Variables vLLM must still read: the OpenMP binding each local ESP
    instance gets, the user's reserved-core override (cpu_cores), and the
    in-process EngineCore switch (harness/offline)."""
    import vllm.envs as envs

    wanted = {
        "VLLM_CPU_OMP_THREADS_BIND": ESP_INSTANCES,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": CPU_CORES,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "vllm_esp/harness/offline.py",
    }
    for name, user in wanted.items():
        expect(name in envs.environment_variables, f"vllm.envs lost {name}", user)


def test_model_config_the_cost_model_reads(stock_scheduler: Any) -> None:
    """The analytic cost model reads the model's size from hf_text_config."""
    model_config = stock_scheduler.vllm_config.model_config
    expect_attrs(
        model_config,
        ("model", "hf_text_config", "served_model_name", "enforce_eager"),
        "ModelConfig",
        f"{COST_MODEL} and {METRICS}",
    )
    expect_attrs(
        model_config.hf_text_config,
        ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads"),
        "hf_text_config",
        COST_MODEL,
    )


def test_vllm_config_fields_the_esp_executor_rewrites(stock_scheduler: Any) -> None:
    """Each instance's config is a deep copy with worker_cls, backend,
    kv_transfer_config and additional_config rewritten."""
    config = copy.deepcopy(stock_scheduler.vllm_config)
    config.kv_transfer_config = None
    config.additional_config = {"esp_instance": 0}
    expect_attrs(
        config,
        (
            "parallel_config",
            "model_config",
            "kv_transfer_config",
            "additional_config",
            "compilation_config",
            "scheduler_config",
            "cache_config",
        ),
        "VllmConfig",
        ESP_EXECUTOR,
    )
    expect_attrs(
        config.parallel_config,
        ("world_size", "worker_cls", "distributed_executor_backend"),
        "ParallelConfig",
        ESP_EXECUTOR,
    )


# ===================================================== vllm.v1.metrics
def test_stat_logger_base_we_subclass(stock_scheduler: Any) -> None:
    """ESPPrometheusStatLogger subclasses StatLoggerBase and is built by
    vLLM's per-engine adapter from the stat-logger plugin group."""
    from vllm.v1.metrics.loggers import (
        PerEngineStatLoggerAdapter,
        StatLoggerBase,
        load_stat_logger_plugin_factories,
    )
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_esp.integration.metrics import ESPPrometheusStatLogger

    user = METRICS
    abstract = set(StatLoggerBase.__abstractmethods__)
    expect(
        abstract == {"__init__", "record", "log_engine_initialized"},
        f"StatLoggerBase's abstract methods are {sorted(abstract)}",
        user,
    )
    expect_params(StatLoggerBase.__init__, ["self", "vllm_config", "engine_index"], user)
    expect_params(
        StatLoggerBase.record, ["self", "scheduler_stats", "iteration_stats"], user, prefix=True
    )
    expect_consistent_overrides(ESPPrometheusStatLogger, StatLoggerBase, user)
    expect(
        ESPPrometheusStatLogger in load_stat_logger_plugin_factories(),
        "the stat-logger plugin group no longer yields our class",
        user,
    )
    adapter = PerEngineStatLoggerAdapter(stock_scheduler.vllm_config, [0], ESPPrometheusStatLogger)
    (logger,) = adapter.per_engine_stat_loggers.values()
    expect(isinstance(logger, ESPPrometheusStatLogger), "the adapter's factory call", user)
    adapter.record(SchedulerStats(), None, engine_idx=0)


# ================================================ vllm.engine.arg_utils
def test_cli_hooks() -> None:
    """engine_args wraps EngineArgs.add_cli_args (staticmethod) and
    from_cli_args (classmethod); vLLM loads plugins before building the
    engine flags; the fields it sets exist."""
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    user = ENGINE_ARGS
    expect_fields(
        EngineArgs,
        (
            "scheduler_cls",
            "additional_config",
            "kv_transfer_config",
            "distributed_executor_backend",
            "enforce_eager",
        ),
        user,
    )
    expect(
        isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod),
        "EngineArgs.add_cli_args is no staticmethod",
        user,
    )
    expect(
        isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod),
        "EngineArgs.from_cli_args is no classmethod",
        user,
    )
    # The class source shows vLLM's own definitions even once wrapped.
    source = inspect.getsource(EngineArgs)
    expect(
        re.search(r"def add_cli_args\(\s*parser", source) is not None,
        "EngineArgs.add_cli_args no longer takes (parser)",
        user,
    )
    expect(
        re.search(r"def from_cli_args\(\s*cls,\s*args", source) is not None,
        "EngineArgs.from_cli_args no longer takes (cls, args)",
        user,
    )
    # AsyncEngineArgs must inherit from_cli_args (our wrapper lives on EngineArgs).
    expect(
        "from_cli_args" not in AsyncEngineArgs.__dict__,
        "AsyncEngineArgs defines its own from_cli_args",
        user,
    )
    expect_source(
        AsyncEngineArgs.add_cli_args, ["load_general_plugins()", "EngineArgs.add_cli_args"], user
    )


def test_scheduler_cls_qualname_is_resolved(stock_scheduler: Any) -> None:
    """``--scheduler mlfq`` sets ``scheduler_cls`` to a qualname string;
    vLLM imports it in EngineCore, also with async scheduling on."""
    from vllm_esp.core.choices import MLFQ_SCHEDULER_CLS
    from vllm_esp.integration.mlfq.scheduler import MLFQScheduler

    scheduler_config = stock_scheduler.vllm_config.scheduler_config
    scheduler_config.scheduler_cls = MLFQ_SCHEDULER_CLS
    scheduler_config.async_scheduling = True
    expect(
        scheduler_config.get_scheduler_cls() is MLFQScheduler,
        "SchedulerConfig.get_scheduler_cls no longer resolves a qualname",
        ENGINE_ARGS,
    )


# ======================================== vllm.utils.ompmultiprocessing
def test_omp_process_manager_we_wrap() -> None:
    """cpu_cores wraps ``OMPProcessManager.__init__(self, config)`` and hands
    it a view of the config without the connector; vLLM must still decide
    the extra reservation from ``config.kv_transfer_config`` alone."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    user = CPU_CORES
    init = OMPProcessManager.__init__
    init = getattr(init, "__wrapped__", init)  # ours, once installed
    expect_params(init, ["self", "config"], user)
    expect_source(init, ["if config.kv_transfer_config:", "self.reserve_cpu_num"], user)


# ========================================================== misc
def test_logger_and_cli_entry() -> None:
    """Every integration module logs under vLLM's handlers; ``vllm-esp``
    hands its arguments to vLLM's own CLI."""
    from vllm.entrypoints.cli.main import main
    from vllm.logger import init_logger

    expect_params(init_logger, ["name"], "vllm_esp/integration/*")
    expect(callable(main), "vllm.entrypoints.cli.main.main", CLI)
