"""``benchmarks.sim_validate``: the simulator against a measured engine run.

A fake "measured" run made by the simulator itself must validate with zero
error (the plumbing is exact), and a run twice as slow with 100%."""

from __future__ import annotations

import random

import pytest

from benchmarks.sim_validate import validate
from vllm_esp.core.esp.cost_model import (
    DecodeCoeffs,
    ESPCostModel,
    MigrationCoeffs,
    PrefillCoeffs,
)
from vllm_esp.core.esp.loong.policy import LoongPolicy, LoongSettings
from vllm_esp.sim.cluster import SimRequest, simulate

COST = ESPCostModel(
    prefill={1: PrefillCoeffs(0.02, 2e-4, 1e-8), 2: PrefillCoeffs(0.025, 1e-4, 5e-9)},
    decode=DecodeCoeffs(0.01, 1e-4, 1e-7, 1e-5),
    migration=MigrationCoeffs(1e-3, 6144.0, 1e9),
)


def _engine_result(slowdown: float, **engine: object) -> dict:
    rng = random.Random(3)
    trace = [
        SimRequest(f"r{i}", i * 0.3, rng.randint(20, 3000), rng.randint(1, 40), rng.choice("ab"))
        for i in range(30)
    ]
    result = simulate(
        LoongPolicy(2, COST, LoongSettings(max_running_requests=8)),
        trace,
        num_instances=2,
        capacity_tokens=4096,
        truth=COST,
        lockstep=True,
    )
    by_id = {r.req_id: r for r in result.records}
    records = [
        {
            "arrival_s": t.arrival_s,
            "num_prompt_tokens": t.num_prompt_tokens,
            "num_output_tokens": t.num_output_tokens,
            "class": t.cls,
            "ttft_s": by_id[t.req_id].ttft_s * slowdown,
            "jct_s": by_id[t.req_id].jct_s * slowdown,
            "refused": False,
        }
        for t in trace
    ]
    return {
        "records": {"esp_2": records},
        # The trace above prefills whole prompts: no token budget, no bound.
        "engine": {
            "instance_kv_tokens": 4096,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 1 << 30,
            "esp_config": {"max_decode_stall_ms": 0},
            **engine,
        },
    }


def test_a_run_the_simulator_made_validates_exactly():
    report = validate(_engine_result(1.0), COST)
    (only,) = report["rounds"].values()
    assert set(only["classes"]) == {"a", "b", "all"}
    assert only["num_requests"] == 30 and only["num_unfinished_in_sim"] == 0
    assert report["ttft_rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert report["jct_rel_err"] == pytest.approx(0.0, abs=1e-9)


def test_a_run_twice_as_slow_is_off_by_half():
    report = validate(_engine_result(2.0), COST)
    assert report["ttft_rel_err"] == pytest.approx(0.5)
    assert report["jct_rel_err"] == pytest.approx(0.5)


def test_the_replay_chunks_prefills_as_the_engine_does():
    """With the engine's token budget the replay cuts the trace's prompts
    (up to 3,000 tokens) into chunks of 128 tokens per instance: their first
    tokens come later."""
    exact = validate(_engine_result(1.0), COST)
    chunked = validate(_engine_result(1.0, max_num_batched_tokens=128), COST)
    assert chunked["chunk_tokens_per_instance"] == 128
    assert chunked["max_decode_stall_s"] == [None]
    cls = chunked["rounds"]["0"]["classes"]["all"]
    assert cls["sim_mean_ttft_s"] > cls["real_mean_ttft_s"] * 1.05
    assert exact["ttft_rel_err"] == pytest.approx(0.0, abs=1e-9)


def test_calibrations_bracketing_the_replay_are_averaged():
    """Two cost files simulate each request twice; the comparison reads the
    mean of the two (a run made under COST checked against COST and a cost
    model twice as slow everywhere is off by the mean of 0 and 100%)."""
    slow = ESPCostModel(
        prefill={
            d: PrefillCoeffs(2 * p.A_s, 2 * p.B_s, 2 * p.C_s) for d, p in COST.prefill.items()
        },
        decode=DecodeCoeffs(*(2 * x for x in (0.01, 1e-4, 1e-7, 1e-5))),
        migration=MigrationCoeffs(2e-3, 6144.0, 5e8),
    )
    run = _engine_result(1.0)
    both = validate(run, [COST, slow])
    alone = [validate(run, c)["rounds"]["0"]["classes"] for c in (COST, slow)]
    assert both["num_cost_models"] == 2
    for cls, row in both["rounds"]["0"]["classes"].items():
        for key in ("sim_mean_ttft_s", "sim_mean_jct_s"):
            assert row[key] == pytest.approx((alone[0][cls][key] + alone[1][cls][key]) / 2)
    assert 0.0 < both["jct_rel_err"] < validate(run, slow)["jct_rel_err"]
    with pytest.raises(ValueError):
        validate(run, [])
