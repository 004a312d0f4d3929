"""Property tests: random arrivals, lengths and aborts on the real scheduler.

Every request finishes exactly once, KV blocks are conserved at every step
and at the end, and no request waits longer than the starvation bound
allows. Simulated time: the fake clock advances 1 ms per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.v1.request import RequestStatus

from vllm_esp.harness.scheduler import create_scheduler, make_request, step

BLOCK_SIZE = 16
NUM_BLOCKS = 80  # 1264 usable tokens: memory pressure is common
STEP_S = 1e-3
STARVATION_S = 0.030


@dataclass(frozen=True)
class Arrival:
    step: int
    num_prompt_tokens: int
    num_output_tokens: int
    abort_after: int | None  # steps after arrival, None = never


arrivals = st.lists(
    st.builds(
        Arrival,
        step=st.integers(0, 60),
        num_prompt_tokens=st.integers(1, 600),
        num_output_tokens=st.integers(1, 40),
        abort_after=st.one_of(st.none(), st.integers(0, 80)),
    ),
    min_size=1,
    max_size=24,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def held_blocks(scheduler) -> set[int]:
    blocks: set[int] = set()
    for request in scheduler.requests.values():
        if request.status == RequestStatus.RUNNING:
            for group in scheduler.kv_cache_manager.get_block_ids(request.request_id):
                blocks.update(group)
    return blocks


def simulate(
    config_model_dir,
    calibration_file,
    workload,
    *,
    max_num_seqs,
    prefix_caching,
    starvation_s,
    max_steps=4000,
):
    clock = Clock()
    s = create_scheduler(
        config_model_dir,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        enable_prefix_caching=prefix_caching,
        additional_config={
            "mlfq": {
                "num_levels": 8,
                "base_quantum_ms": 4.0,
                "calibration_file": calibration_file,
                "starvation_threshold_s": starvation_s,
                # Quantum demotion: the properties are checked under churn.
                "demote_by_value": False,
            }
        },
        clock=clock,
    )
    pool = s.kv_cache_manager.block_pool
    total_free = pool.get_num_free_blocks()
    finished: dict[str, int] = {}
    last_service: dict[str, float] = {}
    max_wait: dict[str, float] = {}
    pending = sorted(enumerate(workload), key=lambda x: x[1].step)
    aborts: dict[int, list[str]] = {}
    num_by_slots = 0  # steps the slot plan answered (and was checked)

    for step_index in range(max_steps):
        clock.t = step_index * STEP_S
        while pending and pending[0][1].step <= step_index:
            i, a = pending.pop(0)
            rid = f"r{i}"
            s.add_request(make_request(rid, a.num_prompt_tokens, a.num_output_tokens))
            last_service[rid] = clock.t
            if a.abort_after is not None:
                aborts.setdefault(step_index + a.abort_after, []).append(rid)
        for rid in aborts.pop(step_index, []):
            for req in s.finish_requests(rid, RequestStatus.FINISHED_ABORTED):
                finished[req.request_id] = finished.get(req.request_id, 0) + 1
        if not pending and not aborts and not s.has_requests():
            break
        # The planner's hot loop builds running requests' candidates
        # inline: they must equal the general path's.
        for cand in s._iter_candidates():
            assert cand == s._candidate(s.requests[cand.request_id]), cand
        # When memory cannot bind, the slot plan is the full planner's.
        by_slots = s._plan_by_slots()
        if by_slots is not None:
            num_by_slots += 1
            full = s._plan_admission()
            assert (by_slots.run, by_slots.skip, by_slots.pause) == (
                full.run,
                full.skip,
                full.pause,
            )
            assert full.preempt == full.offload == full.prefetch == ()
        out, engine_outputs = step(s)
        for rid in out.num_scheduled_tokens:
            max_wait[rid] = max(max_wait.get(rid, 0.0), clock.t - last_service[rid])
            last_service[rid] = clock.t
        for eco in engine_outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = finished.get(o.request_id, 0) + 1
        for rid, req in s.requests.items():
            if not req.is_finished():
                max_wait[rid] = max(max_wait.get(rid, 0.0), clock.t - last_service[rid])
        # Invariants at every step.
        s.check_invariants()
        if not out.num_scheduled_tokens:
            # An empty step is only legitimate when nothing could run.
            assert not any(r.status == RequestStatus.RUNNING for r in s.requests.values()), (
                f"empty step with residents; plan={s.last_plan}"
            )
        assert pool.get_num_free_blocks() + len(held_blocks(s)) == total_free
    else:
        raise AssertionError("workload did not drain")
    return s, finished, max_wait, total_free, num_by_slots


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=arrivals, max_num_seqs=st.integers(1, 6), prefix_caching=st.booleans())
def test_random_workloads_finish_once_and_conserve_blocks(
    config_model_dir, calibration_file, workload, max_num_seqs, prefix_caching
):
    s, finished, max_wait, total_free, _ = simulate(
        config_model_dir,
        calibration_file,
        workload,
        max_num_seqs=max_num_seqs,
        prefix_caching=prefix_caching,
        starvation_s=STARVATION_S,
    )
    ids = {f"r{i}" for i in range(len(workload))}
    assert set(finished) == ids, f"never finished: {ids - set(finished)}"
    assert all(n == 1 for n in finished.values()), f"finished twice: {finished}"
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == total_free
    assert len(s.rank_policy) == 0
    # Starvation bound: a request idle for STARVATION_S is promoted to level
    # 0, where it waits at most for the older level-0 requests, each of
    # which leaves level 0 within its quantum (4 steps) or finishes, and,
    # when it needs memory, for residents to free it (by value it does not
    # preempt them; it ranks first for every block freed): at most the
    # work the others still have, their outputs and prefill chunks.
    work_steps = sum(a.num_output_tokens + -(-a.num_prompt_tokens // 256) for a in workload)
    bound = STARVATION_S + STEP_S * ((len(workload) + 1) * 5 + work_steps)
    assert max(max_wait.values(), default=0.0) <= bound


@pytest.mark.parametrize("num_short", [30, 60])
def test_promotion_bounds_starvation_independently_of_the_stream(
    config_model_dir, calibration_file, num_short
):
    """The starvation bound is not vacuous: under a saturating stream of
    short requests (one every 3 steps, 3 steps of work each) a demoted long
    request waits as long as the stream lasts when promotion is off, and a
    bounded time, whatever the stream's length, when it is on."""
    workload = [Arrival(0, 400, 40, None)] + [
        Arrival(2 + 3 * k, 8, 3, None) for k in range(num_short)
    ]
    _, _, wait_off, _, _ = simulate(
        config_model_dir,
        calibration_file,
        workload,
        max_num_seqs=1,
        prefix_caching=False,
        starvation_s=0.0,
    )
    _, _, wait_on, _, num_by_slots = simulate(
        config_model_dir,
        calibration_file,
        workload,
        max_num_seqs=1,
        prefix_caching=False,
        starvation_s=0.005,
    )
    # Off: starved for (almost) the whole stream, 3 ms per short request.
    assert wait_off["r0"] >= 0.8 * 3 * STEP_S * num_short
    # On: the threshold plus at most ~10 level-0 requests ahead, each of
    # which leaves level 0 within its 4-step quantum, for any stream length.
    assert wait_on["r0"] <= 0.005 + 10 * 4 * STEP_S
    # One request at a time leaves memory to spare: the slot plan answered
    # (and matched the full planner, checked in simulate).
    assert num_by_slots > 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=arrivals,
    max_num_seqs=st.integers(1, 6),
    policy=st.sampled_from(["mlfq", "gittins"]),
)
def test_work_conserving_with_memory_to_spare(
    config_model_dir, calibration_file, workload, max_num_seqs, policy
):
    """With memory to spare, every step runs min(max_num_seqs, unfinished)
    requests or spends the whole token budget, as stock vLLM would: pausing
    and ranking never leave a slot idle while a request could use it."""
    budget = 256
    clock = Clock()
    s = create_scheduler(
        config_model_dir,
        num_blocks=4000,
        block_size=BLOCK_SIZE,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        additional_config={
            "mlfq": {
                "policy": policy,
                "calibration_file": calibration_file,
                "starvation_threshold_s": STARVATION_S,
            }
        },
        clock=clock,
    )
    pending = sorted(enumerate(workload), key=lambda x: x[1].step)
    for step_index in range(4000):
        clock.t = step_index * STEP_S
        while pending and pending[0][1].step <= step_index:
            i, a = pending.pop(0)
            s.add_request(make_request(f"r{i}", a.num_prompt_tokens, a.num_output_tokens))
        if not pending and not s.has_requests():
            break
        num_unfinished = s.get_num_unfinished_requests()
        out, _ = step(s)
        num_run = len(out.num_scheduled_tokens)
        full = out.total_num_scheduled_tokens >= budget
        assert num_run == min(max_num_seqs, num_unfinished) or full, (
            step_index,
            num_run,
            num_unfinished,
            s.last_plan,
        )
    else:
        raise AssertionError("workload did not drain")
