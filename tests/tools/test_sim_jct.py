"""The simulator drives the real schedulers, host swap included (no engine)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from benchmarks.sim_jct import simulate


@dataclass(frozen=True)
class _Req:
    request_id: str
    prompt_len: int
    output_len: int
    arrival_s: float


def _trace() -> list[_Req]:
    # Long requests first, short ones arriving while they run: MLFQ
    # preempts the long ones, and a 1,024-token KV cache cannot keep them.
    reqs = [_Req(f"long{i}", 300, 200, 0.0) for i in range(3)]
    reqs += [_Req(f"short{i}", 40, 8, 0.05 * (i + 1)) for i in range(12)]
    return sorted(reqs, key=lambda r: r.arrival_s)


@pytest.mark.parametrize("policy", ["mlfq", "mlfq-swap"])
def test_simulated_mlfq_preempts_and_swap_never_recomputes(policy, calibration_file):
    r = simulate(
        policy,
        {},
        _trace(),
        max_num_seqs=4,
        calibration_file=calibration_file,
        t0=0.01,
        t_decode=0.0002,
        t_prefill=0.0001,
        kv_tokens=1024,
    )
    assert r["num_requests_finished"] == 15
    if policy == "mlfq":
        assert r["recomputed_tokens"] > 0 and r["copied_blocks"] is None
    else:
        assert r["recomputed_tokens"] == 0 and r["copied_blocks"] > 0
