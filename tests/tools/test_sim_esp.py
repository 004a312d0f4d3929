"""benchmarks.sim_esp plumbing: the rate search, the ratios, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import sim_esp
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.data.long_context import make_lengths
from vllm_esp.sim.cluster import simulate
from vllm_esp.sim.metrics import max_rate_under_slo


@pytest.mark.parametrize("start", [0.3, 5.0, 40.0])
def test_search_brackets_and_bisects_a_monotone_curve(start):
    seen: dict[float, float] = {}

    def value(rate: float) -> float:
        seen[rate] = rate / 5.0  # crosses 1 at rate 5
        return seen[rate]

    sim_esp.search_crossing(value, 1.0, start, num_bisections=3, max_expansions=8)
    rates = sorted(seen)
    assert any(r <= 5 for r in rates) and any(r > 5 for r in rates)
    # A linear curve: the interpolated crossing is exact.
    bound = max_rate_under_slo([(r, v) for r, v in seen.items()])
    assert bound.rate_rps == pytest.approx(5.0) and not bound.lower_bound


def test_search_gives_up_after_the_expansions():
    seen: list[float] = []

    def never_good(rate: float) -> float:
        seen.append(rate)
        return math.inf

    sim_esp.search_crossing(never_good, 1.0, 1.0, num_bisections=3, max_expansions=4)
    assert seen == [1.0, 0.5, 0.25, 0.125, 0.0625]


def _res(rate, lower_bound=False):
    return {"max_rate_rps": rate, "max_rate_is_lower_bound": lower_bound}


def test_ratios_take_the_best_workload_and_keep_bounds_out():
    table = {
        "leval": {8: {"esp": _res(4.0), "static_sp": _res(1.0), "replicas_chunked": _res(2.0)}},
        "mixed": {
            8: {
                "esp": _res(1.0),
                "static_sp": _res(0.5),
                "replicas_chunked": _res(None),  # never under the SLO
                "pd_disaggregation": _res(2.0),
            },
            16: {"esp": _res(9.0, lower_bound=True), "static_sp": _res(1.0)},
        },
    }
    s = sim_esp.summarize_ratios(table)
    assert set(s["ratios"]) == {"vs_chunked_prefill", "vs_pd_disaggregation", "vs_static_sp"}
    assert s["ratios"]["vs_static_sp"] == pytest.approx(4.0)  # leval, not mixed's 2.0
    assert s["ratios"]["vs_chunked_prefill"] == pytest.approx(2.0)
    assert s["ratios"]["vs_pd_disaggregation"] == pytest.approx(0.5)
    assert s["worst_ratio"] == pytest.approx(0.5)
    assert s["worst_ratio_detail"]["workload"] == "mixed"
    assert [b["bound"] for b in s["ratios_bounded"]] == ["at_least"]
    assert s["ratios_undefined"][0]["baseline"] == "replicas_chunked"


def test_pd_variants_split_into_whole_groups():
    for n in (2, 8, 16, 64):
        for v in sim_esp.pd_variants(n, (0.25, 0.5, 0.75)):
            assert 1 <= v["num_prefill"] < n
            assert v["num_prefill"] % v["prefill_dop"] == 0 and v["prefill_dop"] <= 8
    assert sim_esp.pd_variants(8, (0.5, 0.5)) == [{"num_prefill": 4, "prefill_dop": 4}]


def test_every_system_gets_the_same_running_cap_per_instance_at_every_size():
    # LoongServe's knob is for 4 instances; a fixed cap would starve a
    # 64-instance cluster while every replica keeps its own.
    cost = ESPCostModel.load(sim_esp.DEFAULT_PROFILE)
    for n in (2, 8, 64):
        expected = 1024 * n // 4
        esp = sim_esp.make_policy("esp", {}, "sharegpt", n, cost)
        static = sim_esp.make_policy("static_sp", {}, "sharegpt", n, cost)
        assert esp.settings.max_running_requests == expected  # type: ignore[attr-defined]
        assert static.max_running_requests == expected  # type: ignore[attr-defined]
    assert sim_esp.max_running_requests("leval", 16) == 256 * 4
    replicas = sim_esp.make_policy("replicas_chunked", {}, "sharegpt", 64, cost)
    pd = sim_esp.make_policy(
        "pd_disaggregation", sim_esp.pd_variants(64, (0.5,))[0], "sharegpt", 64, cost
    )
    # Per replica / per decode instance.
    assert replicas.max_running_requests == pd.max_running_requests == 256  # type: ignore[attr-defined]


def test_request_count_grows_with_rate_within_bounds():
    sweep = sim_esp.QUICK
    n = 8
    lo, hi = sweep.min_requests_per_instance * n, sweep.max_requests_per_instance * n
    assert sweep.num_requests(1e-3, n) == lo
    assert sweep.num_requests(1e6, n) == hi
    assert sweep.num_requests(4.0, n) == max(lo, min(hi, math.ceil(4.0 * sweep.target_span_s)))


def _validation_file(tmp_path) -> str:
    """A 'real' run that is the simulator itself: the errors must be 0."""
    cost = ESPCostModel.load(sim_esp.DEFAULT_PROFILE)
    sample = make_lengths("leval", 12, 1)
    reqs = [
        sim_esp.SimRequest(r.req_id, r.arrival_s, r.num_prompt_tokens, r.num_output_tokens)
        for r in sample.at_rate(0.5).requests
    ]
    policy = sim_esp.make_policy("esp", {}, "leval", 2, cost)
    res = simulate(policy, reqs, num_instances=2, capacity_tokens=210_000, truth=cost)
    path = tmp_path / "real.json"
    records = [
        {
            "arrival_s": r.arrival_s,
            "num_prompt_tokens": r.num_prompt_tokens,
            "num_output_tokens": r.num_output_tokens,
            "first_token_s": r.first_token_s,
            "finish_s": r.finish_s,
        }
        for r in res.records
    ]
    path.write_text(json.dumps({"num_instances": 2, "workload": "leval", "requests": records}))
    return str(path)


def test_tiny_end_to_end_run_writes_the_promised_json(tmp_path):
    out = tmp_path / "sim_esp.json"
    argv = [
        "--quick",
        "--out",
        str(out),
        "--workloads",
        "leval,zipf1.2",
        "--instances",
        "2",
        "--num-requests",
        "24",
        "--jobs",
        "1",
        "--length-unit",
        "words",
        "--validation",
        _validation_file(tmp_path),
    ]
    sim_esp.main(argv)
    data = json.loads(out.read_text())
    assert data["label"] == "SIMULATED"
    assert set(data["ratios"]) == {"vs_chunked_prefill", "vs_pd_disaggregation", "vs_static_sp"}
    assert "worst_ratio" in data
    assert data["validation"]["ttft_rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert data["validation"]["jct_rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert set(data["cost_model"]) >= {"path", "sha256", "source"}
    assert data["cost_model"]["source"] == "derived"
    assert data["metadata"]["git"] and data["metadata"]["seed"] == 0
    assert data["workloads"]["leval"]["label"] == "SYNTHETIC"
    systems = set(data["results"]["leval"]["2"])
    assert systems == set(sim_esp.SYSTEMS)
    for curve in data["curves"]["zipf1.2"]["2"].values():
        assert curve and all(p["num_requests"] == 24 for p in curve)
    assert "p90_goodput_rps" in data["results"]["zipf1.2"]["2"]["esp"]
    for png in data["plots"]:
        assert png.endswith(".png") and (tmp_path / png.rsplit("/", 1)[-1]).stat().st_size > 0


def test_a_sim_validate_result_is_taken_as_it_is():
    """``--validation`` with ``benchmarks.sim_validate``'s comparison of the
    simulator and the real engine at N = 2 reports its errors unchanged."""
    root = Path(__file__).resolve().parents[2]
    path = str(root / "benchmarks/results/validation_chunked/sim_validate_bracketed_cpu.json")
    stored = json.loads(Path(path).read_text())
    cost = ESPCostModel.load(sim_esp.DEFAULT_PROFILE)
    got = sim_esp.validate(path, cost, cost, 4096)
    assert got["source"] == "benchmarks.sim_validate"
    assert (got["ttft_rel_err"], got["jct_rel_err"]) == (
        stored["ttft_rel_err"],
        stored["jct_rel_err"],
    )
    assert got["engine_result"] == stored["engine_result"]
