"""MLFQScheduler on the real vLLM scheduler with fabricated runner outputs.

Cost model (``calibration_file`` fixture): every chunk costs 1 ms + 0.01 ms
per token; ``base_quantum_ms=4`` and ratio 2 give quanta 4, 8, 16, 32 ms.
So a 10-token prompt (1.1 ms) joins level 0, 500 tokens (6 ms) level 1,
2000 tokens (21 ms) level 3, and a decode step costs ~1 ms.
"""

from __future__ import annotations

from collections import deque

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import RequestStatus

from vllm_esp.core.mlfq.admission import AdmissionPlan
from vllm_esp.harness.scheduler import create_scheduler, make_request, step
from vllm_esp.integration.mlfq.scheduler import MLFQAsyncScheduler, MLFQScheduler


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(config_model_dir, calibration_file, clock=None, mlfq=None, **kwargs):
    # FastServe's mechanics: every spent quantum demotes.
    settings = {
        "num_levels": 8,
        "demote_by_value": False,
        "base_quantum_ms": 4.0,
        "calibration_file": calibration_file,
        "starvation_threshold_s": 0.0,
    }
    settings.update(mlfq or {})
    return create_scheduler(
        config_model_dir,
        additional_config={"mlfq": settings},
        clock=clock or FakeClock(),
        **kwargs,
    )


def run_until_done(scheduler, max_steps=10_000):
    for _ in range(max_steps):
        if not scheduler.has_requests():
            return
        step(scheduler)
        scheduler.check_invariants()
    raise AssertionError("scheduler did not drain")


def test_skip_join_places_by_estimated_prefill(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file)
    for rid, n in [("short", 10), ("mid", 500), ("long", 2000)]:
        s.add_request(make_request(rid, n, 4))
    policy = s.rank_policy
    assert [policy.level_of(r) for r in ("short", "mid", "long")] == [0, 1, 3]
    assert list(policy.iter_ranked()) == ["short", "mid", "long"]


def test_skip_join_off_puts_everyone_on_top(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, mlfq={"skip_join": False})
    s.add_request(make_request("long", 2000, 4))
    assert s.rank_policy.level_of("long") == 0


def test_prefix_cache_hit_lowers_the_join_level(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, enable_prefix_caching=True)
    prompt = [1 + i % 900 for i in range(2000)]
    s.add_request(make_request("first", 2000, 1, prompt_token_ids=prompt))
    run_until_done(s)
    # Same 2000-token prompt: all but the last block hit the prefix cache.
    s.add_request(make_request("again", 2000, 1, prompt_token_ids=prompt))
    s.add_request(make_request("fresh", 2000, 1))
    assert s.rank_policy.level_of("again") == 0
    assert s.rank_policy.level_of("fresh") == 3


def test_demotion_when_quantum_is_spent(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file)
    s.add_request(make_request("r", 10, 100))
    levels = []
    for _ in range(12):
        step(s)
        levels.append(s.rank_policy.level_of("r"))
    # Level 0: prefill 1.1 ms + 3 decodes of ~1.01 ms reach 4 ms -> level 1
    # after step 4; level 1 (8 ms) takes 8 more steps.
    assert levels[:4] == [0, 0, 0, 1]
    assert levels[4:11] == [1] * 7 and levels[11] == 2
    assert s.rank_policy.stats().num_demotions == 2


def test_promotion_after_starvation_but_not_for_newcomers(config_model_dir, calibration_file):
    clock = FakeClock()
    s = make(
        config_model_dir,
        calibration_file,
        clock=clock,
        mlfq={"starvation_threshold_s": 5.0},
        max_num_seqs=1,
    )
    s.add_request(make_request("long", 2000, 1000))  # level 3
    step(s)
    s.add_request(make_request("blocker", 10, 1000))  # level 0, takes the slot
    clock.t += 1.0
    step(s)
    assert s.rank_policy.level_of("long") == 3
    # A newcomer that has waited less than the threshold is not promoted.
    s.add_request(make_request("newcomer", 2000, 4))
    for _ in range(4):
        clock.t += 1.0
        out, _ = step(s)
        assert "long" not in out.num_scheduled_tokens
    assert s.rank_policy.level_of("newcomer") == 3
    clock.t += 1.5  # "long" last ran 6.5 s ago, the newcomer waited 5.5 s...
    step(s)
    # ...both have now waited past the threshold: both promoted to level 0.
    assert s.rank_policy.level_of("long") == 0
    assert s.rank_policy.stats().num_promotions >= 1
    out, _ = step(s)
    # Promoted requests join the tail of level 0 in promotion order: the
    # one promoted first ("long", idle longest) runs first.
    assert "long" in out.num_scheduled_tokens


def test_rank_preempts_at_max_num_seqs_and_keeps_kv(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, max_num_seqs=2)
    s.add_request(make_request("a", 2000, 1000))
    s.add_request(make_request("b", 2000, 1000))
    for _ in range(3):
        step(s)
    computed_b = s.requests["b"].num_computed_tokens
    s.add_request(make_request("short", 10, 3))  # level 0, must run next step
    out, _ = step(s)
    assert "short" in out.num_scheduled_tokens
    assert len(out.num_scheduled_tokens) == 2
    paused = "b" if "b" not in out.num_scheduled_tokens else "a"
    # The paused request keeps its KV: still RUNNING, no preemption, no
    # recompute when it resumes.
    req = s.requests[paused]
    assert req.status == RequestStatus.RUNNING and req.num_preemptions == 0
    assert s.last_plan.pause == (paused,)
    run_until_done(s)
    assert_all_blocks_free(s)
    assert computed_b > 0


def test_rank_frees_kv_of_lowest_rank_under_memory_pressure(config_model_dir, calibration_file):
    # 40 blocks of 16 tokens; each long request holds 32 blocks after prefill.
    # By rank alone (FastServe's rule; the value rule is tested below).
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=4,
        mlfq={"preempt_by_value": False},
    )
    s.add_request(make_request("long", 500, 50))  # 550 tokens fit 35 blocks
    step(s)
    assert s.requests["long"].num_computed_tokens == 500
    s.add_request(make_request("short", 200, 2))  # level 0, needs 13 blocks
    out, _ = step(s)
    assert "short" in out.num_scheduled_tokens
    long_req = s.requests["long"]
    assert long_req.status == RequestStatus.PREEMPTED and long_req.num_preemptions == 1
    assert s.num_rank_preemptions == 1
    assert "long" in out.preempted_req_ids
    run_until_done(s)


def test_vllm_preempting_inside_a_planned_step_keeps_the_queues_whole(
    config_model_dir, calibration_file
):
    """vLLM preempts a resident itself when a planned step runs out of
    blocks; the restored queues then hold it as waiting, not running."""
    # 13 usable blocks; two 96-token prompts take 6 each, and their first
    # decodes past a block boundary need 2 more.
    s = make(config_model_dir, calibration_file, num_blocks=14, max_num_seqs=4)
    s.add_request(make_request("a", 96, 40))
    s.add_request(make_request("b", 96, 40))

    def blind_plan():  # every unfinished request runs, memory unchecked
        ranked = tuple(s.rank_policy.iter_ranked())
        return AdmissionPlan(run=ranked, preempt=(), skip=(), resident_ids=ranked)

    s._plan = blind_plan
    num_vllm_preemptions = 0
    for _ in range(400):
        if not s.has_requests():
            break
        out, _ = step(s)
        num_vllm_preemptions += len(out.preempted_req_ids)
        s.check_invariants()
    assert not s.has_requests()
    assert num_vllm_preemptions > 0
    assert_all_blocks_free(s)


@pytest.mark.parametrize("learned", [False, True])
def test_preemption_by_value_weighs_recompute(config_model_dir, calibration_file, learned):
    """The same memory pressure as above, with the value rule.
    With no finished requests yet, every request expects the same remaining
    output, so recomputing "long" buys nothing and "short" waits; once
    the lengths of finished requests say a request that has run past the
    short ones is expected to need far more, preempting it pays."""
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=4,
        mlfq={"preempt_by_value": True},
    )
    if learned:
        for i in range(200):
            s.output_lengths.observe(3 if i % 10 else 400)
        s.output_lengths.refit()
    s.add_request(make_request("long", 500, 50))
    step(s)
    for _ in range(10):  # "long" decodes past the short requests' lengths
        step(s)
    s.add_request(make_request("short", 200, 2))
    out, _ = step(s)
    long_req = s.requests["long"]
    if learned:
        assert "short" in out.num_scheduled_tokens and "long" in out.preempted_req_ids
    else:
        assert "short" in s.last_plan.skip and not out.preempted_req_ids
        assert long_req.status == RequestStatus.RUNNING and long_req.num_preemptions == 0
    run_until_done(s)
    # Recompute happens only where the rule judged it worth it.
    assert (s.num_recomputed_tokens > 0) == learned
    assert_all_blocks_free(s)


def test_paused_residents_are_bounded(config_model_dir, calibration_file):
    """Newcomers that outrank the residents pause them, but at most
    ``max_paused_requests`` residents sit paused; the rest wait holding
    nothing."""
    s = make(
        config_model_dir,
        calibration_file,
        max_num_seqs=2,
        mlfq={
            "max_paused_requests": 1,
            "num_levels": 2,
            "demote_by_value": False,
            "preempt_by_value": True,
        },
    )
    for i in range(6):
        s.add_request(make_request(f"old{i}", 64, 200))
        for _ in range(3):
            step(s)  # each runs a little, is demoted, then the next arrives
    for _ in range(5):
        step(s)
        num_residents = len(s.running)
        assert num_residents <= 2 + 1
        assert len(s.last_plan.pause) <= 1
    run_until_done(s)
    assert_all_blocks_free(s)


def test_no_head_of_line_blocking_on_memory(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, num_blocks=21, max_num_seqs=8)
    s.add_request(make_request("huge", 1000, 2))  # needs 63 blocks: never fits
    s.add_request(make_request("small1", 40, 2))
    s.add_request(make_request("small2", 40, 2))
    out, _ = step(s)
    assert set(out.num_scheduled_tokens) == {"small1", "small2"}
    assert "huge" in s.last_plan.skip


def test_no_head_of_line_blocking_on_token_budget(config_model_dir, calibration_file):
    s = make(
        config_model_dir,
        calibration_file,
        enable_chunked_prefill=False,
        max_num_batched_tokens=512,
        max_model_len=512,
        mlfq={"skip_join": False},
    )
    s.add_request(make_request("r0", 100, 2))
    s.add_request(make_request("big", 500, 2))
    s.add_request(make_request("r2", 100, 2))
    out, _ = step(s)
    # r0 + big would exceed the 512-token budget: big is skipped, r2 runs.
    assert set(out.num_scheduled_tokens) == {"r0", "r2"}


@pytest.mark.parametrize("where", ["waiting", "running", "paused", "preempted", "finished"])
def test_finish_and_abort_in_every_state(config_model_dir, calibration_file, where):
    s = make(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=1,
        mlfq={"preempt_by_value": False},  # rank preemption makes "preempted"
    )
    total_free = s.kv_cache_manager.block_pool.get_num_free_blocks()
    s.add_request(make_request("long", 500, 50))
    step(s)
    if where == "paused":
        s.add_request(make_request("short", 10, 1000))
        step(s)
        assert s.last_plan.pause == ("long",)
    elif where == "preempted":
        s.add_request(make_request("short", 200, 1000))
        step(s)
        assert s.requests["long"].status == RequestStatus.PREEMPTED
    elif where == "waiting":
        s.add_request(make_request("short", 10, 1000))  # not scheduled yet
    target = {"waiting": "short", "finished": "long"}.get(where, "long")
    if where == "finished":
        s.finish_requests("long", RequestStatus.FINISHED_STOPPED)
    else:
        s.finish_requests(target, RequestStatus.FINISHED_ABORTED)
    assert target not in s.rank_policy
    s.check_invariants()
    s.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    step(s)
    assert not s.has_unfinished_requests()
    assert len(s.rank_policy) == 0
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == total_free


def make_async(config_model_dir, calibration_file, **kwargs):
    """The scheduler EngineCore builds with async scheduling on: through
    ``MLFQScheduler(vllm_config=...)``, whose ``__new__`` picks the async
    variant. The CPU platform turns async scheduling off while the harness
    builds the config (there is no device to overlap with), so it is turned
    back on before construction, as on GPU."""

    def build(**init_kwargs):
        init_kwargs["vllm_config"].scheduler_config.async_scheduling = True
        return MLFQScheduler(**init_kwargs)

    return make(
        config_model_dir, calibration_file, scheduler_cls=build, async_scheduling=True, **kwargs
    )


class AsyncDriver:
    """Steps an async scheduler as EngineCore's batch queue does: a batch is
    scheduled before the previous one's output is applied (two in flight);
    the oldest output is applied once two are in flight or nothing new was
    scheduled. Which requests sample is fixed when a batch is scheduled (a
    prefill chunk samples nothing): by the time its output is applied, the
    next batch has already advanced them."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.in_flight: deque[tuple[SchedulerOutput, list[str]]] = deque()
        self.first_scheduled: list[str] = []
        self.finished: list[str] = []

    def step(self) -> SchedulerOutput:
        s = self.scheduler
        out = s.schedule()
        sampling = [r for r in out.num_scheduled_tokens if not s.requests[r].is_prefill_chunk]
        self.first_scheduled += [
            r for r in out.num_scheduled_tokens if r not in self.first_scheduled
        ]
        self.in_flight.append((out, sampling))
        if len(self.in_flight) == 2 or not out.total_num_scheduled_tokens:
            done, sampled = self.in_flight.popleft()
            req_ids = list(done.num_scheduled_tokens)
            engine_outputs = s.update_from_output(
                done,
                ModelRunnerOutput(
                    req_ids=req_ids,
                    req_id_to_index={r: i for i, r in enumerate(req_ids)},
                    sampled_token_ids=[[7] if r in sampled else [] for r in req_ids],
                ),
            )
            self.finished += [
                o.request_id
                for outs in engine_outputs.values()
                for o in outs.outputs
                if o.finish_reason is not None
            ]
        s.check_invariants()
        return out

    def drain(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            busy = any(out.total_num_scheduled_tokens for out, _ in self.in_flight)
            if not (self.scheduler.has_requests() or busy):
                return
            self.step()
        raise AssertionError("async scheduler did not drain")


def assert_all_blocks_free(s) -> None:
    pool = s.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # minus the null block


def test_async_variant_is_chosen_when_async_scheduling_is_on(config_model_dir, calibration_file):
    assert type(make(config_model_dir, calibration_file)) is MLFQScheduler
    s = make_async(config_model_dir, calibration_file)
    assert type(s) is MLFQAsyncScheduler
    assert isinstance(s, AsyncScheduler) and isinstance(s, MLFQScheduler)


def test_async_scheduling_runs_in_mlfq_order(config_model_dir, calibration_file):
    s = make_async(config_model_dir, calibration_file, max_num_seqs=1)
    # Arrival order is the reverse of MLFQ order (levels 3, 1, 0).
    requests = [
        make_request("long", 2000, 4),
        make_request("mid", 500, 4),
        make_request("short", 10, 4),
    ]
    for r in requests:
        s.add_request(r)
    driver = AsyncDriver(s)
    driver.drain()
    assert driver.first_scheduled == ["short", "mid", "long"]
    assert driver.finished == ["short", "mid", "long"]
    assert all(r.num_output_tokens == 4 and r.num_output_placeholders == 0 for r in requests)
    assert len(s.rank_policy) == 0
    assert_all_blocks_free(s)


def test_async_rank_pause_keeps_kv(config_model_dir, calibration_file):
    s = make_async(config_model_dir, calibration_file, max_num_seqs=2)
    requests = [make_request("a", 2000, 30), make_request("b", 2000, 30)]
    for r in requests:
        s.add_request(r)
    driver = AsyncDriver(s)
    for _ in range(3):
        driver.step()
    short = make_request("short", 10, 3)  # level 0: runs in the next batch
    s.add_request(short)
    out = driver.step()
    assert "short" in out.num_scheduled_tokens and len(out.num_scheduled_tokens) == 2
    (paused,) = s.last_plan.pause
    assert s.requests[paused].status == RequestStatus.RUNNING
    driver.drain()
    assert all(r.num_preemptions == 0 for r in requests)
    assert all(r.num_output_tokens == r.max_tokens for r in [*requests, short])
    assert s.num_recomputed_tokens == 0
    assert_all_blocks_free(s)


def test_async_rank_preemption_under_memory_pressure(config_model_dir, calibration_file):
    # 40 blocks of 16 tokens: "long" holds 32 after its prefill, "short" needs 13.
    s = make_async(
        config_model_dir,
        calibration_file,
        num_blocks=41,
        max_num_seqs=4,
        mlfq={"preempt_by_value": False},
    )
    long_req, short = make_request("long", 500, 50), make_request("short", 200, 2)
    s.add_request(long_req)
    driver = AsyncDriver(s)
    for _ in range(3):  # prefill, then decodes with outputs in flight
        driver.step()
    s.add_request(short)
    out = driver.step()
    assert "short" in out.num_scheduled_tokens and "long" in out.preempted_req_ids
    assert s.num_rank_preemptions == 1
    driver.drain()
    assert long_req.num_output_tokens == 50 and short.num_output_tokens == 2
    assert long_req.num_output_placeholders == 0
    assert_all_blocks_free(s)


def test_stats_export_levels_and_counters(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file)
    s.add_request(make_request("a", 10, 2))
    s.add_request(make_request("b", 2000, 2))
    stats = s.make_stats()
    extra = {k: v for k, v in stats.num_kv_fetch_reqs_by_stage.items() if k.startswith("vllm_esp:")}
    assert extra["vllm_esp:queue_level_0"] == 1 and extra["vllm_esp:queue_level_3"] == 1
    assert extra["vllm_esp:rank_preemptions_total"] == 0
    assert stats.num_waiting_reqs == 2


@pytest.mark.parametrize("demote_by_value", [True, False])
@pytest.mark.parametrize("max_num_seqs", [1, 2])
def test_tiny_kv_with_fast_promotion_does_not_thrash_on_recompute(
    config_model_dir, calibration_file, max_num_seqs, demote_by_value
):
    """40 blocks, six prompts that do not all fit, promotion after 5 steps,
    about 1,800 tokens of work. Promoted requests stay in level 0 in
    arrival order, so they never free each other's KV in turn (promoted
    to the tail and demoted again after a quantum, they recomputed tens of
    thousands of tokens by rank); by value they also wait for memory."""
    recomputed = {}
    for by_value in (False, True):
        clock = FakeClock()
        s = make(
            config_model_dir,
            calibration_file,
            clock=clock,
            num_blocks=41,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=256,
            mlfq={
                "starvation_threshold_s": 0.02,
                "preempt_by_value": by_value,
                "demote_by_value": demote_by_value,
            },
        )
        for i in range(6):
            s.add_request(make_request(f"r{i}", 150 + 50 * i, 30))
        for _ in range(5000):
            if not s.has_requests():
                break
            clock.t += 0.004
            step(s)
            s.check_invariants()
        assert not s.has_requests()
        assert_all_blocks_free(s)
        recomputed[by_value] = s.num_recomputed_tokens
    assert recomputed[False] < 2_000
    assert recomputed[True] < 300
