"""Fast checks of the benchmark helpers (no engine, no torch, no vLLM)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import (
    finish_metadata,
    git_revision,
    machine_info,
    percentile,
    ratio,
    run_metadata,
    software_versions,
    summarize,
    write_json,
)


@pytest.mark.parametrize("q", [0, 1, 10, 25, 50, 73.5, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    data = np.random.default_rng(1).exponential(2.0, size=37).tolist()
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_percentile_edge_cases() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([3, 1, 2], 50) == 2.0  # order of the input is irrelevant
    assert percentile([0.0, 10.0], 25) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_keys_and_values() -> None:
    s = summarize([1, 2, 3, 4], prefix="jct_", suffix="_s")
    assert s["jct_count"] == 4
    assert s["jct_mean_s"] == 2.5
    assert s["jct_p50_s"] == 2.5
    assert s["jct_max_s"] == 4.0
    assert s["jct_p99_s"] == pytest.approx(float(np.percentile([1, 2, 3, 4], 99)))
    empty = summarize([])
    assert empty["count"] == 0 and empty["mean"] is None and empty["p99"] is None


def test_ratio_refuses_missing_data() -> None:
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_metadata_fields() -> None:
    meta = run_metadata(seed=7, argv=["x", "--quick"])
    assert meta["seed"] == 7 and meta["argv"] == ["x", "--quick"]
    assert meta["started_utc"].endswith("Z")
    m = meta["machine"]
    assert m["cpu_count"] >= 1 and m["cpu_model"]
    assert m["memory_bytes"] is None or m["memory_bytes"] > 0
    v = meta["versions"]
    assert v["python"].count(".") == 2
    # This repository is a git checkout: a 40-hex commit and a dirty flag.
    g = meta["git"]
    assert g["commit"] is None or len(g["commit"]) == 40
    assert g["dirty"] in (True, False, None)
    finish_metadata(meta)
    assert "_t0" not in meta and meta["wall_time_s"] >= 0
    assert meta["finished_utc"].endswith("Z")
    assert "loadavg_end" in meta and "loadavg_start" in meta
    json.dumps(meta)  # plain JSON types only


def test_helpers_standalone() -> None:
    assert machine_info()["cpu_count_usable"] >= 1
    assert set(software_versions()) >= {"python", "torch", "vllm", "vllm_esp"}
    g = git_revision(Path("/"))  # not a repository: no crash, no commit
    assert g["commit"] is None


def test_write_json_atomic_and_strict(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "r.json"
    data = {
        "a": np.float64(1.5),
        "b": np.arange(3),
        "c": math.nan,
        "d": [math.inf],
        "p": Path("/x"),
    }
    write_json(out, data)
    assert not (tmp_path / "sub" / "r.json.tmp").exists()
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [None], "p": "/x"}


# ------------------------------------------------------ jct --repeats pooling
def _records(jcts: list[float], makespan: float):
    from benchmarks.common import RequestRecord

    recs = []
    for i, jct in enumerate(jcts):
        arrival = makespan - jct - i * 1e-3
        recs.append(
            RequestRecord(
                request_id=str(i),
                prompt_len=10,
                output_len=5,
                arrival_s=arrival,
                added_s=arrival,
                first_token_s=arrival + 0.1,
                finish_s=arrival + jct,
                num_output_tokens=5,
                num_preemptions=i % 2,
            )
        )
    return recs


def test_pooled_metrics_pool_distributions_and_average_rates() -> None:
    from benchmarks.jct import pooled_metrics

    a, b = _records([1.0, 3.0], 10.0), _records([2.0, 6.0], 20.0)
    m = pooled_metrics([a, b])
    assert m["num_repeats"] == 2 and m["num_requests"] == 4
    assert m["mean_jct_s"] == pytest.approx(3.0)  # (1 + 3 + 2 + 6) / 4
    assert [r["mean_jct_s"] for r in m["repeats"]] == pytest.approx([2.0, 4.0])
    # Rates are per replay: averaged, not pooled over one makespan.
    per = [pooled_metrics([x])["throughput_tok_s"] for x in (a, b)]
    assert m["throughput_tok_s"] == pytest.approx(sum(per) / 2)
    assert m["num_preemptions"] == 2
    # One repeat: exactly policy_metrics, no repeat block.
    assert "repeats" not in pooled_metrics([a])


def test_merge_runs_sums_totals_and_weights_means() -> None:
    from benchmarks.jct import merge_runs

    def run(steps: int, wall: float, waiting: float, counter: int) -> dict:
        return {
            "num_engine_steps_seen": steps,
            "wall_s": wall,
            "prometheus_counter_deltas": {"vllm:num_preemptions": float(counter)},
            "loadavg_1min_before_after": [1.0, 2.0],
            "scheduler_stats": {
                "num_steps": steps,
                "mean_waiting_reqs": waiting,
                "max_waiting_reqs": counter,
                "mlfq_counters_delta": {"vllm_esp:rank_preemptions_total": counter},
            },
        }

    merged = merge_runs([run(100, 1.0, 2.0, 3), run(300, 2.0, 6.0, 5)])
    assert merged["num_engine_steps_seen"] == 400 and merged["wall_s"] == pytest.approx(3.0)
    assert merged["prometheus_counter_deltas"]["vllm:num_preemptions"] == 8.0
    st = merged["scheduler_stats"]
    assert st["mean_waiting_reqs"] == pytest.approx((2.0 * 100 + 6.0 * 300) / 400)
    assert st["max_waiting_reqs"] == 5
    assert st["mlfq_counters_delta"]["vllm_esp:rank_preemptions_total"] == 8
    assert [r["mean_step_ms"] for r in merged["replays"]] == pytest.approx([10.0, 2000 / 300])


def test_request_record_folds_delta_outputs() -> None:
    from types import SimpleNamespace

    from benchmarks.common import RequestRecord

    rec = RequestRecord(request_id="a", prompt_len=3, output_len=3, arrival_s=0.0)

    def out(n: int, finished: bool):
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=[7] * n)],
            finished=finished,
            num_cached_tokens=2,
            metrics=SimpleNamespace(num_preemptions=1),
        )

    assert not rec.see(out(0, False), 0.5)  # a prefill chunk: no token yet
    assert math.isnan(rec.first_token_s)
    assert not rec.see(out(1, False), 1.0)
    assert rec.see(out(2, True), 2.0)
    assert (rec.first_token_s, rec.finish_s, rec.num_output_tokens) == (1.0, 2.0, 3)
    assert (rec.num_cached_tokens, rec.num_preemptions) == (2, 1)
