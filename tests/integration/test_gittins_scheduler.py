"""The Gittins policy inside the real vLLM scheduler, with fabricated runner
outputs: it learns output lengths from finished requests, then serves short
requests before long ones that arrived earlier, and every step stays full."""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_esp.harness.scheduler import create_scheduler, make_request, step

MAX_NUM_SEQS = 4
SHORT, LONG = 8, 200


def make(config_model_dir, calibration_file, policy: str | None):
    if policy is None:  # stock vLLM
        return create_scheduler(
            config_model_dir, scheduler_cls=Scheduler, max_num_seqs=MAX_NUM_SEQS
        )
    mlfq = {"policy": policy, "calibration_file": calibration_file}
    return create_scheduler(
        config_model_dir, max_num_seqs=MAX_NUM_SEQS, additional_config={"mlfq": mlfq}
    )


def drain(s, finished_at: dict[str, int], steps: list[int], limit: int = 5000) -> None:
    for _ in range(limit):
        if not s.has_requests():
            return
        num_unfinished = sum(1 for r in s.requests.values() if not r.is_finished())
        out, engine_outputs = step(s)
        # Work conserving: the batch is as full as the runnable requests allow.
        assert len(out.num_scheduled_tokens) == min(MAX_NUM_SEQS, num_unfinished)
        steps.append(len(out.num_scheduled_tokens))
        for eco in engine_outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished_at[o.request_id] = len(steps)
    raise AssertionError("did not drain")


def short_and_long_finish_order(s) -> dict[str, int]:
    """Teach the bimodal lengths (9 short : 1 long), then let 4 long requests
    run for a while before 4 short ones arrive."""
    finished_at: dict[str, int] = {}
    steps: list[int] = []
    for i in range(40):
        s.add_request(make_request(f"warm{i}", 16, LONG if i % 10 == 0 else SHORT))
    drain(s, finished_at, steps)
    for i in range(4):
        s.add_request(make_request(f"long{i}", 16, LONG))
    for _ in range(40):
        step(s)
    for i in range(4):
        s.add_request(make_request(f"short{i}", 16, SHORT))
    drain(s, finished_at, steps)
    return finished_at


def test_gittins_serves_short_requests_before_earlier_long_ones(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, "gittins")
    finished_at = short_and_long_finish_order(s)
    assert s.rank_policy.num_observed_lengths == 48
    last_short = max(finished_at[f"short{i}"] for i in range(4))
    first_long = min(finished_at[f"long{i}"] for i in range(4))
    assert last_short < first_long
    s.check_invariants()
    pool = s.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_stock_fcfs_makes_the_short_requests_wait(config_model_dir, calibration_file):
    # The contrast that makes the test above meaningful.
    finished_at = short_and_long_finish_order(make(config_model_dir, calibration_file, None))
    assert min(finished_at[f"short{i}"] for i in range(4)) > max(
        finished_at[f"long{i}"] for i in range(4)
    )


def test_aborted_requests_teach_nothing(config_model_dir, calibration_file):
    s = make(config_model_dir, calibration_file, "gittins")
    for i in range(3):
        s.add_request(make_request(f"r{i}", 16, SHORT))
    step(s)
    from vllm.v1.request import RequestStatus

    s.finish_requests(["r0"], RequestStatus.FINISHED_ABORTED)
    drain(s, {}, [])
    assert s.rank_policy.num_observed_lengths == 2
