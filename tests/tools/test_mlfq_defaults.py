"""MLFQ's default settings against stock FCFS, in simulated time.

The real schedulers (stock vLLM's for ``fcfs``, ``MLFQScheduler`` with
``MLFQConfig()``'s defaults) are driven by fabricated model outputs
(``benchmarks.sim_jct.simulate``) on two kinds of traffic near
saturation, where the order matters:

* short/long: 90% of replies 8-48 tokens, 10% 400 (a decreasing hazard
  past the short mode): short requests must not wait behind long ones;
* increasing hazard: replies uniform in 16-256 tokens, where FCFS is
  close to the best non-clairvoyant order and MLFQ must not undo it.

The step model and the cost model are this machine class's (the default
preset on the CPU engine: a decode step 4.5 ms plus 0.45 ms per sequence,
0.3 ms per prefill token).
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.sim_jct import simulate
from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.data.trace import TraceRequest

_STEP = {"t0": 0.0045, "t_decode": 0.00045, "t_prefill": 0.0003}


@pytest.fixture(scope="module")
def machine_calibration(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "cpu.json"
    StepCostModel(alpha_s=4.95e-3, beta_s=3e-4, gamma_s=0.0, source="calibrated").save(path)
    return str(path)


def _trace(kind: str, num_requests: int, rate: float, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    out = []
    for i, arrival in enumerate(arrivals):
        prompt_len = int(rng.integers(30, 301))
        if kind == "mixed":
            is_long = bool(rng.random() < 0.1)
            output_len = 400 if is_long else int(rng.integers(8, 49))
            source = "synthetic-mixed-long" if is_long else "synthetic-mixed-short"
        else:
            output_len, source = int(rng.integers(16, 257)), "synthetic-uniform"
        out.append(
            TraceRequest(
                request_id=f"{kind}-{i:04d}",
                arrival_s=float(arrival),
                prompt_len=prompt_len,
                output_len=output_len,
                prompt_token_ids=tuple(range(1, prompt_len + 1)),
                source=source,
            )
        )
    return out


def _run(policy: str, trace: list[TraceRequest], calibration: str) -> dict:
    return simulate(
        policy,
        None if policy == "fcfs" else {},
        trace,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        calibration_file=calibration,
        kv_tokens=65536,
        **_STEP,
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_default_mlfq_serves_short_requests_first_on_short_long_traffic(seed, machine_calibration):
    # FCFS near saturation: short requests queue behind long ones. MLFQ's
    # defaults must take them out of that queue, not add to it: with the
    # first quantum spent mostly on the prefill, two levels ("first
    # quantum, then FCFS") put every short request back behind the long
    # ones plus every newer arrival's prefill (1.05x FCFS's mean here, and
    # short requests 1.06x).
    trace = _trace("mixed", 250, 11.0, seed)
    fcfs, mlfq = _run("fcfs", trace, machine_calibration), _run("mlfq", trace, machine_calibration)
    assert mlfq["num_requests_finished"] == fcfs["num_requests_finished"] == len(trace)
    assert mlfq["recomputed_tokens"] == 0
    assert mlfq["mean_jct_s"] <= fcfs["mean_jct_s"]
    assert mlfq["short_mean_jct_s"] <= 0.8 * fcfs["short_mean_jct_s"]


@pytest.mark.parametrize("seed", [0, 1])
def test_default_mlfq_keeps_fcfs_order_on_increasing_hazard(seed, machine_calibration):
    # A request that has run is closer to its end than a fresh one, so
    # demoting it behind newcomers only delays it: demotion by value
    # keeps it in its level, as FCFS would.
    trace = _trace("uniform", 200, 4.6, seed)
    fcfs, mlfq = _run("fcfs", trace, machine_calibration), _run("mlfq", trace, machine_calibration)
    assert mlfq["num_requests_finished"] == len(trace)
    assert mlfq["mean_jct_s"] <= 1.02 * fcfs["mean_jct_s"]
