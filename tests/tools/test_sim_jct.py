"""The simulator drives the real schedulers, host swap included (no engine)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from benchmarks import serve_suite, sim_vs_real
from benchmarks.sim_jct import simulate
from vllm_esp.data.trace import TraceRequest, make_mixed_trace, make_sharegpt_trace
from vllm_esp.demo import SERVER_FLAGS


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


def test_the_attention_term_charges_each_chunk_its_causal_keys(calibration_file):
    # One 1,000-token prompt alone, chunked by a 256-token budget, then 2
    # decodes: the attention term adds t_attn times the keys each chunk
    # attends to, q * (c + (q + 1) / 2), summed (here: the prompt's
    # 1000 * 1001 / 2, then 1,001 and 1,002 keys for the decodes).
    trace = [_Req("p", 1000, 3, 0.0)]
    kwargs = dict(
        max_num_seqs=1,
        calibration_file=calibration_file,
        t0=0.0,
        t_decode=0.0,
        t_prefill=0.0,
        kv_tokens=4096,
        max_num_batched_tokens=256,
    )
    linear = simulate("fcfs", None, trace, **kwargs)
    quadratic = simulate("fcfs", None, trace, t_attn=1e-6, **kwargs)
    assert linear["makespan_s"] == 0.0
    assert quadratic["makespan_s"] == pytest.approx(1e-6 * (1000 * 1001 / 2 + 1001 + 1002))


# ------------------------------------------------- --from-suite: sim vs real
class _WordTokenizer:
    """One token per word (its length), BOS = 0: enough for the generators."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [len(w) for w in text.split()]
        return [0, *ids] if add_special_tokens else ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return " ".join("w" * t for t in token_ids if t or not skip_special_tokens)


_SEED = 7
_CAPACITY_RPS = {"sharegpt": 2.0, "mixed": 5.0}


def _pairs() -> list[tuple[str, str]]:
    return [
        (
            " ".join(f"p{i}x{j}" for j in range(20 + 13 * i)),
            " ".join("r" for _ in range(5 + 17 * i)),
        )
        for i in range(30)
    ]


def _traces() -> dict[str, list[TraceRequest]]:
    tok, pairs = _WordTokenizer(), _pairs()
    sharegpt_rate = 0.5 * _CAPACITY_RPS["sharegpt"]
    return {
        "sharegpt_burst": make_sharegpt_trace(tok, 6, math.inf, _SEED, scale=0.5, pairs=pairs),
        "sharegpt_0.5": make_sharegpt_trace(tok, 6, sharegpt_rate, _SEED, scale=0.5, pairs=pairs),
        "mixed_0.9": make_mixed_trace(tok, 10, 0.9 * _CAPACITY_RPS["mixed"], _SEED, pairs=pairs),
    }


def _suite_json(traces: dict[str, list[TraceRequest]]) -> dict[str, Any]:
    """A suite result as ``benchmarks.serve_suite`` writes it (its own
    ``traces_json``), through a JSON round trip, without replays."""
    specs = [
        serve_suite.TraceSpec("sharegpt_burst", "sharegpt", None),
        serve_suite.TraceSpec("sharegpt_0.5", "sharegpt", 0.5),
        serve_suite.TraceSpec("mixed_0.9", "mixed", 0.9),
    ]
    run = serve_suite.SuiteRun(
        traces=traces,
        capacity={f: {"capacity_rps": c, "makespan_s": 2.0} for f, c in _CAPACITY_RPS.items()},
    )
    out = {
        "seed": _SEED,
        "model": "unused",
        "server_flags": list(SERVER_FLAGS),
        "schedulers": ["fcfs", "mlfq"],
        "sessions": [{"policy": "fcfs", "kv_cache_tokens": 8192}, {"kv_cache_tokens": 4096}],
        "capacity": run.capacity,
        "traces": serve_suite.traces_json(run, specs),
    }
    return json.loads(json.dumps(out))


def test_suite_traces_are_rebuilt_exactly_from_the_suite_json() -> None:
    traces = _traces()
    suite = _suite_json(traces)
    for name, original in traces.items():
        rebuilt = sim_vs_real.suite_trace(suite, name)
        assert [(r.arrival_s, r.prompt_len, r.output_len, r.source) for r in rebuilt] == [
            (r.arrival_s, r.prompt_len, r.output_len, r.source) for r in original
        ]
    # The Poisson traces arrive over time; a burst of the same requests at 0.
    assert rebuilt[-1].arrival_s > 0 and {r.source for r in rebuilt} == {
        "synthetic-mixed-short",
        "synthetic-mixed-long",
    }
    burst = sim_vs_real.suite_trace(suite, "mixed_0.9", burst=True)
    assert {r.arrival_s for r in burst} == {0.0}
    assert sim_vs_real.default_traces(suite) == ["sharegpt_0.5", "mixed_0.9"]
    assert sim_vs_real.suite_engine(suite) == sim_vs_real.SuiteEngine(
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        max_model_len=2048,
        kv_tokens=4096,
        block_size=128,
    )


def test_comparison_arithmetic_and_summary() -> None:
    assert sim_vs_real.compare(1.1, 1.0)["within_15pct"] is True
    c = sim_vs_real.compare(0.8, 1.0)
    assert c["sim_over_real"] == pytest.approx(0.8) and c["within_15pct"] is False
    assert sim_vs_real.compare(None, 1.0)["sim_over_real"] is None
    real = {
        "policies": {
            "fcfs": {"all": {"mean_e2e_s": 2.0}, "short": {"mean_e2e_s": 1.0}},
            "mlfq": {"all": {"mean_e2e_s": 4.0}},
        },
        "replays": [
            {"policy": p, "classes": {"all": {"mean_e2e_s": v}}}
            for p, v in (("fcfs", 1.5), ("mlfq", 4.0), ("fcfs", 2.5))
        ],
    }
    sim = {"fcfs": {"mean_jct_s": 2.2, "short_mean_jct_s": 1.5}, "mlfq": {"mean_jct_s": 3.0}}
    default = {"fcfs": {"mean_jct_s": 1.0}, "mlfq": {"mean_jct_s": 4.4}}
    out = sim_vs_real.compare_trace(real, sim, default)
    assert out["fcfs"]["sim_over_real"] == pytest.approx(1.1)
    assert out["fcfs"]["real_mean_e2e_s_per_round"] == [1.5, 2.5]
    assert out["fcfs"]["per_class"]["short"]["sim_over_real"] == pytest.approx(1.5)
    assert out["mlfq"]["sim_over_real"] == pytest.approx(0.75) and out["mlfq"]["per_class"] == {}
    assert out["mlfq"]["default_step_model"]["sim_over_real"] == pytest.approx(1.1)
    spread = sim_vs_real.spread_diagnostics(out)
    assert spread["sim_max_over_min_across_policies"] == pytest.approx(3.0 / 2.2)
    assert spread["real_max_over_min_across_policies"] == pytest.approx(2.0)
    assert spread["real_max_over_min_across_rounds"] == pytest.approx(2.5 / 1.5)
    summary = sim_vs_real.within_summary({"t": out})
    assert summary["num"] == 2 and summary["num_within"] == 1 and not summary["all_within"]
    assert list(summary["misses"]) == ["t/mlfq"]
    assert summary["max_abs_error"] == pytest.approx(0.25)


def test_burst_makespans_are_the_fcfs_burst_replays_else_the_capacity() -> None:
    replays = [{"policy": p, "wall_s": w} for p, w in (("fcfs", 4.0), ("mlfq", 9.0), ("fcfs", 6.0))]
    suite: dict[str, Any] = {
        "capacity": {"sharegpt": {"makespan_s": 4.0}, "mixed": {"makespan_s": 5.0}},
        "traces": {
            "sharegpt_burst": {"family": "sharegpt", "load": None, "replays": replays},
            "sharegpt_0.5": {"family": "sharegpt", "load": 0.5, "replays": replays},
            "mixed_0.9": {"family": "mixed", "load": 0.9, "replays": replays},
        },
    }
    assert sim_vs_real.real_burst_makespans(suite, "sharegpt") == [4.0, 6.0]
    assert sim_vs_real.real_burst_makespans(suite, "mixed") == [5.0]
    assert sim_vs_real.real_burst_makespans(suite, "heavy_tail") == []


def test_burst_calibration_scales_the_step_model_to_the_real_makespan() -> None:
    suite = {
        "seed": 0,
        "capacity": {"sharegpt": {"makespan_s": 3.0}},
        "traces": {
            "sharegpt_0.5": {
                "family": "sharegpt",
                "load": 0.5,
                "rate_rps": 1.0,
                "num_requests": 3,
                "sources": ["sharegpt"],
                "requests": {
                    "prompt_len": [40, 8, 20],
                    "output_len": [6, 3, 4],
                    "class": [None] * 3,
                },
            }
        },
    }
    engine = sim_vs_real.SuiteEngine(2, 1024, 2048, 4096, 128)
    step = sim_vs_real.StepTimeModel(t0=0.01, t_decode=0.001, t_prefill=0.0001)
    cal = sim_vs_real.burst_calibration(suite, "sharegpt", engine, step, None)
    assert cal is not None and cal["num_requests"] == 3
    assert cal["real_fcfs_burst_makespans_s"] == [3.0]
    assert cal["scale"] == pytest.approx(3.0 / cal["sim_fcfs_burst_makespan_s"])
    burst = sim_vs_real.suite_trace(suite, "sharegpt_0.5", burst=True)
    scaled = sim_vs_real._simulate_on("fcfs", burst, engine, step.scaled(cal["scale"]), None)
    assert scaled["makespan_s"] == pytest.approx(3.0)
    assert scaled["num_requests_finished"] == 3
