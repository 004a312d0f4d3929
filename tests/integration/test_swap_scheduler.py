"""MLFQScheduler with the host-swap connector (``mlfq-swap``) on the real
vLLM scheduler, with fabricated runner outputs (``tests/sched_harness.py``
style): the scheduler-side connector is the one vLLM builds from
``kv_transfer_config``; the "worker" reports prefetches as landed after a
chosen number of steps, as a CUDA copy stream would.

Cost model (``calibration_file``): 1 ms + 0.01 ms per token per chunk;
``base_quantum_ms=4``, 8 levels (pinned: the scenarios depend on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from vllm_esp.core.swap.book import SwapState
from vllm_esp.harness import scheduler as sched_harness
from vllm_esp.harness.scheduler import fake_output, make_request
from vllm_esp.integration.engine_args import swap_kv_transfer_config
from vllm_esp.integration.mlfq.scheduler import MLFQScheduler
from vllm_esp.integration.swap.connector import HostSwapConnector

BS = 16


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    config_model_dir,
    calibration_file,
    *,
    num_blocks=41,
    max_num_seqs=4,
    swap=None,
    mlfq=None,
    prefix_caching=False,
    max_num_batched_tokens=8192,
    clock=None,
) -> MLFQScheduler:
    """A real MLFQScheduler whose vLLM base built our scheduler-side connector."""
    model_config = ModelConfig(
        model=config_model_dir,
        dtype="float32",
        seed=0,
        skip_tokenizer_init=True,
        max_model_len=8192,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=8192,
        enable_chunked_prefill=True,
        async_scheduling=False,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=BS, enable_prefix_caching=prefix_caching)
    mlfq_settings = {
        "num_levels": 8,
        "base_quantum_ms": 4.0,
        "calibration_file": calibration_file,
        "starvation_threshold_s": 0.0,
        # These tests drive the swap mechanics, so demotion goes by quantum
        # and preemption by rank (the value rules are tested in
        # test_mlfq_scheduler and test_mlfq_policies).
        "demote_by_value": False,
        "preempt_by_value": False,
    }
    mlfq_settings.update(mlfq or {})
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        kv_transfer_config=swap_kv_transfer_config(),
        additional_config={"mlfq": mlfq_settings, "swap": {"host_pool_blocks": 64, **(swap or {})}},
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"],
                FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32),
            )
        ],
    )
    cache_config.num_gpu_blocks = num_blocks
    s = MLFQScheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        block_size=BS,
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
        clock=clock or Clock(),
    )
    assert isinstance(s.swap, HostSwapConnector)
    return s


#: Reports prefetches ``delay`` steps after they were issued.
Worker = sched_harness.SwapWorker


def held_blocks(s) -> set[int]:
    return {b for rid in s.requests for b in s.kv_cache_manager.get_block_ids(rid)[0]}


def assert_conserved(s) -> None:
    """device held + free == total; host used + pending + free == total."""
    pool = s.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() + len(held_blocks(s)) == pool.num_gpu_blocks - 1
    book = s.swap.book
    assert (
        book.num_used_blocks + book.num_pending_free_blocks + book.pool.num_free
        == s.swap.num_host_blocks
    )


def drain(s, worker, max_steps=2000):
    for _ in range(max_steps):
        if not s.has_requests():
            return
        worker.step(s)
        s.check_invariants()
        assert_conserved(s)
    raise AssertionError("scheduler did not drain")


def all_free(s) -> bool:
    s.swap.book.take_step()  # recycle what the last step released
    return (
        s.kv_cache_manager.block_pool.get_num_free_blocks()
        == s.kv_cache_manager.block_pool.num_gpu_blocks - 1
        and s.swap.book.pool.num_free == s.swap.num_host_blocks
        and len(s.swap.book) == 0
    )


def preempted_long(config_model_dir, calibration_file, **kwargs):
    """``long`` (500 tokens, 32 blocks) is preempted by rank for ``short``
    (level 0, 13 blocks): 40 usable blocks hold only one of them."""
    s = make(config_model_dir, calibration_file, **kwargs)
    w = Worker()
    s.add_request(make_request("long", 500, 50))
    w.step(s)
    blocks = list(s.kv_cache_manager.get_block_ids("long")[0])
    s.add_request(make_request("short", 200, 2))
    out, _ = w.step(s)
    return s, w, out, blocks


# ------------------------------------------------------- planner, plain data
def cand(rid, *, resident=False, held=0, tokens=1, need=1, prefetch=0, offload_host=0):
    """A candidate that needs ``need`` new blocks to compute its ``tokens``
    tokens: one token per block, ``need - tokens`` of them computed."""
    from vllm_esp.core.mlfq.admission import Candidate

    assert need >= tokens
    return Candidate(
        request_id=rid,
        resident=resident,
        num_new_tokens=tokens,
        num_computed_tokens=need - tokens,
        num_held_blocks=held,
        block_size=1,
        num_prefetch_blocks=prefetch,
        num_offload_host_blocks=offload_host,
    )


def plan(ranked, residents, **kwargs):
    from vllm_esp.core.mlfq.admission import plan_admission

    args = dict(num_free_blocks=10, num_slots=4, token_budget=100, chunked_prefill=True)
    args.update(kwargs)
    return plan_admission(ranked, residents, **args)


def test_planner_reserve_never_refuses_a_newcomer_that_fits():
    # Issue 3: newcomers used to be refused unless the reserve stayed free,
    # while paused residents sat on the memory: admissions stalled. Now a
    # newcomer that fits is admitted and the reserve is restored by
    # offloading the lowest-ranked paused resident instead.
    r = cand("r", resident=True, held=5, need=1)
    n = cand("n", need=3)
    p = cand("p", resident=True, held=1, offload_host=1)  # below the cut: paused
    got = plan(
        [r, n, p],
        [p, r],
        num_slots=2,
        num_free_blocks=6,
        num_reserve_blocks=4,
        num_host_free_blocks=10,
    )
    # 6 - 1 (r) - 3 (n) = 2 free < 4: p goes to host (the reserve is a
    # target; it cannot be met in full here, and nothing waits for it).
    assert got.run == ("r", "n") and got.skip == () and got.preempt == ()
    assert got.offload == ("p",) and got.pause == ()
    # Residents may still grow into the reserve, as before.
    grow = cand("g", resident=True, held=5, need=3)
    assert plan([grow], [grow], num_free_blocks=4, num_reserve_blocks=4).run == ("g",)


def test_planner_reserve_never_empties_a_step():
    # Free blocks below the reserve and nothing to reclaim: the old rule
    # skipped the first newcomer and stopped looking, so the step ran
    # empty with 5 free blocks and two 2-block requests waiting.
    n1, n2 = cand("n1", need=2), cand("n2", need=2)
    got = plan([n1, n2], [], num_free_blocks=5, num_reserve_blocks=8)
    assert got.run == ("n1", "n2") and got.skip == ()
    # A newcomer that does not fit is still skipped (no head-of-line block).
    big = cand("big", need=4)
    got = plan([n1, big, n2], [], num_free_blocks=5, num_reserve_blocks=8)
    assert got.run == ("n1", "n2") and got.skip == ("big",)


def test_planner_offloads_lowest_paused_residents_the_host_can_take():
    top = cand("top", resident=True, held=8, need=1)
    mid = cand("mid", resident=True, held=4, offload_host=4)
    low = cand("low", resident=True, held=6, offload_host=50)  # host too small for it
    p = plan(
        [top, mid, low],
        [low, mid, top],
        num_slots=1,
        num_free_blocks=2,
        num_reserve_blocks=3,
        num_host_free_blocks=10,
    )
    assert p.run == ("top",) and p.offload == ("mid",) and p.pause == ("low",)
    # Without a reserve nothing is offloaded, whatever is free.
    assert plan([top, mid, low], [low, mid, top], num_slots=1, num_free_blocks=-5).offload == ()


def test_planner_prefetches_the_next_swapped_requests_only_when_nothing_was_evicted():
    run = cand("run", resident=True, held=2)
    swapped = [cand(f"s{i}", tokens=1, need=5, prefetch=4) for i in range(4)]
    ranked = [run, *swapped]
    p = plan(
        ranked,
        [run],
        num_slots=1,
        num_free_blocks=13,
        num_reserve_blocks=2,
        num_prefetch=3,
        prefetch_window=3,
    )
    # 13 - 1 (run) = 12: s0 (4) and s1 (4) fit above the reserve, s2 would not.
    assert p.run == ("run",) and p.prefetch == ("s0", "s1")
    p = plan(ranked, [run], num_slots=1, num_free_blocks=100, num_prefetch=1, prefetch_window=3)
    assert p.prefetch == ("s0",)  # depth
    p = plan(ranked, [run], num_slots=1, num_free_blocks=100, num_prefetch=4, prefetch_window=2)
    assert p.prefetch == ("s0", "s1")  # only the predicted next batch
    # A step that offloads does not prefetch (no ping-pong).
    paused = cand("paused", resident=True, held=3)
    p = plan(
        [run, paused, *swapped],
        [paused, run],
        num_slots=1,
        num_free_blocks=1,
        num_reserve_blocks=2,
        num_host_free_blocks=10,
        num_prefetch=3,
        prefetch_window=4,
    )
    assert p.offload == ("paused",) and p.prefetch == ()


# ------------------------------------------------------------------ swap-out
def test_preemption_plans_a_swap_out_of_the_victims_blocks(config_model_dir, calibration_file):
    s, _, out, blocks = preempted_long(config_model_dir, calibration_file)
    assert s.last_plan.preempt == ("long",)
    (copy,) = out.kv_connector_metadata.swap_out
    assert copy.request_id == "long" and list(copy.device_blocks) == blocks[:32]
    assert len(copy.host_blocks) == 32
    # The freed blocks went to "short" in this very step: the worker must
    # finish the copy before the forward writes them.
    assert out.kv_connector_metadata.out_blocks_reused
    req = s.requests["long"]
    assert req.status == RequestStatus.PREEMPTED and req.num_computed_tokens == 0
    assert s.swap.state("long") is SwapState.SWAPPED and s.swap.swapped_tokens("long") == 500
    stats = s.plugin_stats()
    assert stats["vllm_esp:swap_out_blocks_total"] == 32
    assert stats["vllm_esp:swap_out_bytes_total"] == 32 * s.swap.block_bytes
    assert stats["vllm_esp:swap_out_time_us_total"] == 6  # the worker's report, summed


def test_resume_loads_instead_of_recomputing(config_model_dir, calibration_file):
    s, w, _, _ = preempted_long(config_model_dir, calibration_file)
    req = s.requests["long"]
    assert req.num_tokens == 501  # 500 prompt + 1 sampled before preemption
    assert s.swap.get_num_new_matched_tokens(req, 0) == (500, False)
    resumed = None
    for _ in range(10):
        out, _ = w.step(s)
        if "long" in out.num_scheduled_tokens:
            resumed = out
            break
    assert resumed is not None
    assert resumed.num_scheduled_tokens["long"] == 1  # only the token after the swapped ones
    assert resumed.has_sync_kv_loads
    (copy,) = resumed.kv_connector_metadata.swap_in
    assert list(copy.device_blocks) == list(s.kv_cache_manager.get_block_ids("long")[0][:32])
    assert s.num_recomputed_tokens == 0
    drain(s, w)
    assert s.plugin_stats()["vllm_esp:recomputed_tokens_total"] == 0
    assert all_free(s)


def test_swap_in_leaves_shared_prefix_blocks_alone(config_model_dir, calibration_file):
    # "twin" shares the first 320 tokens (20 blocks) of "long"'s prompt and
    # keeps running, so those blocks stay cached and referenced.
    s = make(config_model_dir, calibration_file, num_blocks=71, prefix_caching=True)
    w = Worker()
    prompt = [1 + (i * 7) % 900 for i in range(500)]
    s.add_request(make_request("long", 500, 50, prompt_token_ids=prompt))
    w.step(s)
    s.add_request(make_request("twin", 400, 400, prompt_token_ids=prompt[:320] + [3] * 80))
    w.step(s)
    twin_blocks = set(s.kv_cache_manager.get_block_ids("twin")[0])
    shared = twin_blocks & set(s.kv_cache_manager.get_block_ids("long")[0])
    assert len(shared) == 20
    for _ in range(3):  # long spends its level-1 quantum: level 2
        w.step(s)
    # A level-1 newcomer that needs 38 blocks > 32 free preempts the
    # lowest-ranked resident, long (whose 20 shared blocks stay allocated
    # to twin, so evicting it frees 12).
    s.add_request(make_request("big", 600, 2))
    assert s.rank_policy.rank_key("big") < s.rank_policy.rank_key("long")
    out, _ = w.step(s)
    assert s.last_plan.preempt == ("long",)
    (out_copy,) = out.kv_connector_metadata.swap_out
    assert out_copy.request_id == "long" and len(out_copy.host_blocks) == 32
    s.swap_reserve_blocks = 0  # let long come back while twin still runs
    for _ in range(40):
        out, _ = w.step(s)
        if out.kv_connector_metadata.swap_in:
            break
    (copy,) = out.kv_connector_metadata.swap_in
    table = s.kv_cache_manager.get_block_ids("long")[0]
    # The local prefix-cache hit is reused, never written: the 20 blocks
    # shared with twin, and long's own full blocks that were still cached
    # in the free pool. Only the rest comes from host, slot i -> block i.
    first = 32 - len(copy.device_blocks)
    assert 20 <= first < 32
    assert set(table[:20]) == shared
    assert list(copy.device_blocks) == table[first:32]
    assert copy.host_blocks == out_copy.host_blocks[first:32]
    assert not set(copy.device_blocks) & twin_blocks
    assert out.num_scheduled_tokens["long"] == 1
    drain(s, w)


# ---------------------------------------------------------------- fallback
def test_full_host_pool_falls_back_to_recompute(config_model_dir, calibration_file):
    s, w, out, _ = preempted_long(config_model_dir, calibration_file, swap={"host_pool_blocks": 8})
    assert out.kv_connector_metadata.swap_out == ()
    assert s.swap.state("long") is None
    stats = s.plugin_stats()
    assert stats["vllm_esp:swap_recompute_fallbacks_total"] == 1
    for _ in range(10):
        out, _ = w.step(s)
        if "long" in out.num_scheduled_tokens:
            break
    assert out.num_scheduled_tokens["long"] == 501  # the whole sequence again
    assert s.num_recomputed_tokens == 500
    drain(s, w)
    assert all_free(s)


def test_no_pool_at_all_is_plain_recompute(config_model_dir, calibration_file):
    s, w, _out, _ = preempted_long(config_model_dir, calibration_file, swap={"host_pool_blocks": 0})
    assert s.plugin_stats()["vllm_esp:swap_recompute_fallbacks_total"] == 1
    drain(s, w)
    assert all_free(s)


def test_reset_prefix_cache_recomputes_rather_than_restoring_old_kv(
    config_model_dir, calibration_file
):
    s = make(config_model_dir, calibration_file)
    w = Worker()
    s.add_request(make_request("r", 100, 20))
    w.step(s)
    assert s.reset_prefix_cache(reset_running_requests=True)
    assert s.swap.state("r") is None and s.requests["r"].status == RequestStatus.PREEMPTED
    out, _ = w.step(s)
    assert out.kv_connector_metadata.swap_out == () and out.num_scheduled_tokens["r"] == 101


# ----------------------------------------------------- offload and prefetch
def test_proactive_offload_keeps_the_reserve_and_never_prefetches_then(
    config_model_dir, calibration_file
):
    # 40 usable blocks, one slot: a (19 blocks) runs; the level-0 newcomer
    # b (15) is admitted with exactly the reserve of 6 left; then a and b
    # share the slot by rank, the other one paused with its KV. When the
    # running a needs its next block (free would drop below the reserve),
    # the paused b goes to host, before anyone runs out of memory.
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=1,
        swap={"free_block_reserve": 6},
        mlfq={"skip_join": False},
    )
    w = Worker()
    s.add_request(make_request("a", 300, 100))  # 19 blocks
    w.step(s)
    s.add_request(make_request("b", 230, 200))  # 15 blocks, grows one per 16 tokens
    offload_step = None
    for _i in range(60):
        out, _ = w.step(s)
        s.check_invariants()
        if s.last_plan.offload:
            offload_step = out
            break
    assert offload_step is not None and s.last_plan.offload == ("b",)
    assert set(offload_step.num_scheduled_tokens) == {"a"}
    assert s.last_plan.prefetch == ()
    assert [c.request_id for c in offload_step.kv_connector_metadata.swap_out] == ["b"]
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() >= 6
    assert s.plugin_stats()["vllm_esp:swap_proactive_offloads_total"] == 1
    drain(s, w)
    assert s.num_recomputed_tokens == 0 and all_free(s)


def test_reserve_is_restored_by_offload_not_by_refusing_or_evicting_runnable_requests(
    config_model_dir,
    calibration_file,
):
    # 40 usable blocks, 2 slots, reserve 10. a (300 tokens, 19 blocks) and
    # p (40 tokens, 3 blocks) have spent their level-0 quantum; n (200
    # tokens, 13 blocks) arrives at level 0 with 18 blocks free:
    #
    #   ranked:  n (new, 13 blocks)  a (19, running)  | p (3, paused: no slot)
    #   free 18 - 13 (n) - 1 (a's 20th block) = 4 < 10
    #   -> n and a run; p, below the cut, goes to host: free 7
    #
    # The old rule (a newcomer must leave the reserve free) swapped out
    # both p and the runnable a to make room for n + 10, and ran n alone.
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=2,
        swap={"free_block_reserve": 10},
        mlfq={"skip_join": False},
    )
    w = Worker()
    s.add_request(make_request("a", 300, 200))
    s.add_request(make_request("p", 40, 200))
    for _ in range(5):
        w.step(s)
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 18
    s.add_request(make_request("n", 200, 5))
    rank = s.rank_policy.rank_key
    assert rank("n") < rank("a") < rank("p")
    out, _ = w.step(s)
    assert s.last_plan.run == ("n", "a") and s.last_plan.preempt == ()
    assert s.last_plan.offload == ("p",)
    assert out.num_scheduled_tokens == {"n": 200, "a": 1}
    assert [c.request_id for c in out.kv_connector_metadata.swap_out] == ["p"]
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 7
    assert s.plugin_stats()["vllm_esp:swap_proactive_offloads_total"] == 1
    drain(s, w)
    assert s.num_recomputed_tokens == 0 and all_free(s)


@pytest.mark.parametrize("delay", [0, 2])
def test_prefetch_loads_the_next_request_before_its_turn(config_model_dir, calibration_file, delay):
    # A swapped, B (63 blocks) finishes, C takes the only slot: A is next in
    # rank and now fits above the reserve -> loaded ahead of its turn.
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=81,
        max_num_seqs=1,
        swap={"free_block_reserve": 2},
        mlfq={"skip_join": False},
    )
    w = Worker(delay=delay)
    s.add_request(make_request("A", 450, 30))
    w.step(s)
    s.add_request(make_request("B", 1000, 1))
    s.add_request(make_request("C", 32, 6))
    out, _ = w.step(s)
    assert s.last_plan.preempt == ("A",)
    assert s.last_plan.prefetch == ()  # never in a step that evicted
    out, _ = w.step(s)
    assert s.last_plan.prefetch == ("A",) and set(out.num_scheduled_tokens) == {"C"}
    (copy,) = out.kv_connector_metadata.prefetch
    assert not out.has_sync_kv_loads  # the load does not hold up this forward
    assert s.requests["A"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert list(copy.device_blocks) == list(s.kv_cache_manager.get_block_ids("A")[0][:29])
    for _ in range(40):
        out, _ = w.step(s)
        s.check_invariants()
        if "A" in out.num_scheduled_tokens:
            break
    assert out.num_scheduled_tokens["A"] == 1
    assert (
        out.kv_connector_metadata.swap_in == () and not out.has_sync_kv_loads
    )  # nothing left to load
    assert "A" in out.scheduled_cached_reqs.resumed_req_ids
    stats = s.plugin_stats()
    assert stats["vllm_esp:swap_prefetches_total"] == 1 and s.num_recomputed_tokens == 0
    drain(s, w)
    assert all_free(s)


def test_a_prefetched_request_gives_its_blocks_back_without_a_copy(
    config_model_dir, calibration_file
):
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=81,
        max_num_seqs=1,
        swap={"free_block_reserve": 2, "host_pool_blocks": 128},
        mlfq={"skip_join": False},
    )
    w = Worker()
    s.add_request(make_request("A", 450, 30))
    w.step(s)
    s.add_request(make_request("B", 1000, 1))
    s.add_request(make_request("C", 32, 1))
    w.step(s)  # B preempts A (swap-out)
    w.step(s)  # C runs; A prefetched; the load lands in this step
    assert s.swap.state("A") is SwapState.PREFETCHED and s.requests["A"].num_computed_tokens == 450
    # A level-0 newcomer needs the memory A holds (57 + 2 blocks > 51 free):
    # A is evicted by freeing its blocks.
    s.add_request(make_request("D", 900, 2))
    out, _ = w.step(s)
    assert "A" in s.last_plan.preempt
    assert out.kv_connector_metadata.swap_out == ()  # host copy kept: nothing to copy
    assert s.swap.state("A") is SwapState.SWAPPED and s.requests["A"].num_computed_tokens == 0
    assert s.plugin_stats()["vllm_esp:swap_unprefetches_total"] == 1
    drain(s, w)
    assert s.swap.book.counters.recompute_fallbacks == 0
    assert s.num_recomputed_tokens == 0 and all_free(s)


# ------------------------------------------------------------------ aborts
def _to_state(config_model_dir, calibration_file, state, delay=2):
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=81,
        max_num_seqs=1,
        swap={"free_block_reserve": 2},
        mlfq={"skip_join": False},
    )
    w = Worker(delay=delay)
    s.add_request(make_request("A", 450, 30))
    w.step(s)
    s.add_request(make_request("B", 1000, 1))
    s.add_request(make_request("C", 32, 6))
    if state == "swap-out in flight":
        # Abort between schedule() (copy planned) and the runner's output.
        out = s.schedule()
        s.finish_requests("A", RequestStatus.FINISHED_ABORTED)
        s.update_from_output(out, fake_output(s, out))
        return s, w
    w.step(s)
    if state == "swapped":
        return s, w
    out = s.schedule()  # A's prefetch is planned now
    assert s.swap.state("A") is SwapState.PREFETCHING
    if state == "prefetch in flight, load reported after the abort":
        s.finish_requests("A", RequestStatus.FINISHED_ABORTED)  # the worker has not reported yet
        mro = fake_output(s, out)
        mro.kv_connector_output = KVConnectorOutput(finished_recving={"A"})
        s.update_from_output(out, mro)
        return s, w
    mro = fake_output(s, out)
    mro.kv_connector_output = KVConnectorOutput(finished_recving={"A"})
    s.update_from_output(out, mro)
    if state == "prefetched, not promoted":
        return s, w
    w.step(s)
    assert (
        s.swap.state("A") is SwapState.PREFETCHED
        and s.requests["A"].status == RequestStatus.PREEMPTED
    )
    return s, w


@pytest.mark.parametrize(
    "state",
    [
        "swap-out in flight",
        "swapped",
        "prefetch in flight, load reported after the abort",
        "prefetched, not promoted",
        "prefetched",
    ],
)
def test_abort_in_every_swap_state_frees_host_and_device_blocks(
    config_model_dir, calibration_file, state
):
    s, w = _to_state(config_model_dir, calibration_file, state)
    if state not in ("swap-out in flight", "prefetch in flight, load reported after the abort"):
        s.finish_requests("A", RequestStatus.FINISHED_ABORTED)
    s.check_invariants()
    assert "A" not in s.rank_policy
    drain(s, w)
    assert s.swap.state("A") is None and "A" not in s.requests
    assert all_free(s)


def test_abort_with_the_load_still_in_flight_waits_for_the_worker(
    config_model_dir, calibration_file
):
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=81,
        max_num_seqs=1,
        swap={"free_block_reserve": 2},
        mlfq={"skip_join": False},
    )
    w = Worker(delay=3)
    s.add_request(make_request("A", 450, 30))
    w.step(s)
    s.add_request(make_request("B", 1000, 1))
    s.add_request(make_request("C", 32, 6))
    w.step(s)
    w.step(s)  # prefetch issued, lands 3 steps later
    assert s.swap.state("A") is SwapState.PREFETCHING
    s.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    # vLLM keeps A's device blocks and we keep its host slots until the
    # worker is done reading/writing them.
    assert "A" in s.requests and s.swap.book.num_used_blocks == 29
    assert s.has_requests()
    drain(s, w)
    assert "A" not in s.requests and all_free(s)


# --------------------------------------------------------------- property
@dataclass(frozen=True)
class Arrival:
    step: int
    num_prompt_tokens: int
    num_output_tokens: int
    abort_after: int | None


arrivals = st.lists(
    st.builds(
        Arrival,
        step=st.integers(0, 40),
        num_prompt_tokens=st.integers(1, 300),
        num_output_tokens=st.integers(1, 40),
        abort_after=st.one_of(st.none(), st.integers(0, 60)),
    ),
    min_size=1,
    max_size=16,
)

PROPERTY_STRATEGIES = dict(
    workload=arrivals,
    max_num_seqs=st.integers(1, 4),
    prefix_caching=st.booleans(),
    # 0: no pool; 24: frequent fallbacks; 200: everything fits.
    host_blocks=st.sampled_from([0, 24, 200, 200]),
    reserve=st.integers(0, 6),
    prefetch_depth=st.sampled_from([0, 1, 2, 3, 3]),
    delay=st.integers(0, 2),  # steps until a prefetch lands (CUDA stream)
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PROPERTY_STRATEGIES)
def test_random_workloads_conserve_device_and_host_blocks(
    config_model_dir,
    calibration_file,
    workload,
    max_num_seqs,
    prefix_caching,
    host_blocks,
    reserve,
    prefetch_depth,
    delay,
):
    """Device used + free == total and host used + pending + free == total
    after every step; every request finishes once; at the end everything
    is free. Aborts land at random steps, i.e. in every state."""
    clock = Clock()
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=70,
        max_num_seqs=max_num_seqs,
        prefix_caching=prefix_caching,
        max_num_batched_tokens=256,
        clock=clock,
        swap={
            "host_pool_blocks": host_blocks,
            "free_block_reserve": reserve,
            "prefetch_depth": prefetch_depth,
        },
        mlfq={"starvation_threshold_s": 0.03},
    )
    w = Worker(delay=delay)
    pending = sorted(enumerate(workload), key=lambda x: x[1].step)
    aborts: dict[int, list[str]] = {}
    finished: dict[str, int] = {}
    for step_index in range(4000):
        clock.t = 1000.0 + step_index * 1e-3
        while pending and pending[0][1].step <= step_index:
            i, a = pending.pop(0)
            s.add_request(make_request(f"r{i}", a.num_prompt_tokens, a.num_output_tokens))
            if a.abort_after is not None:
                aborts.setdefault(step_index + a.abort_after, []).append(f"r{i}")
        for rid in aborts.pop(step_index, []):
            for req in s.finish_requests(rid, RequestStatus.FINISHED_ABORTED):
                finished[req.request_id] = finished.get(req.request_id, 0) + 1
        if not pending and not aborts and not s.has_requests():
            break
        out, engine_outputs = w.step(s)
        for eco in engine_outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = finished.get(o.request_id, 0) + 1
        s.check_invariants()
        assert_conserved(s)
        if not out.num_scheduled_tokens:
            runnable = [r for r in s.requests.values() if r.status == RequestStatus.RUNNING]
            assert not runnable, f"empty step with residents; plan={s.last_plan}"
    else:
        raise AssertionError("workload did not drain")
    assert set(finished) == {f"r{i}" for i in range(len(workload))}
    assert all(n == 1 for n in finished.values()), finished
    assert len(s.rank_policy) == 0
    assert all_free(s)
