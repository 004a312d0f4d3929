"""Plumbing of ``benchmarks.esp`` and ``benchmarks.replicas`` that needs no
engine: the round-robin dispatcher and its refusal rule, the JSON shaping of
per-request records, the paired ratios and the targets."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.common import RequestRecord
from benchmarks.esp import (
    CLASSES,
    LONG_SOURCE,
    PAIRED,
    SYSTEMS,
    TARGETS,
    EngineSettings,
    class_stats,
    long_served_where_refused,
    paired_ratios,
    record_rows,
    spread,
    system_block,
    system_spec,
    targets,
)
from benchmarks.replicas import assign_round_robin, refused_by

REQUIRED = ("mean_jct_s", "p99_jct_s", "mean_ttft_s", "p99_ttft_s", "served", "refused")


# ------------------------------------------------------------- dispatcher
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.integers(1, 8))
def test_round_robin_is_arrival_order_mod_n(num_requests: int, num_replicas: int) -> None:
    got = assign_round_robin(num_requests, num_replicas)
    assert len(got) == num_requests
    # Consecutive arrivals go to consecutive replicas, whatever came before.
    assert all(got[i + 1] == (got[i] + 1) % num_replicas for i in range(num_requests - 1))
    assert not got or got[0] == 0
    counts = [got.count(k) for k in range(num_replicas)]
    assert max(counts) - min(counts) <= 1


def test_round_robin_rejects_no_replicas() -> None:
    with pytest.raises(ValueError):
        assign_round_robin(3, 0)


@given(st.integers(1, 20000), st.integers(2, 20000))
@settings(max_examples=100, deadline=None)
def test_refusal_leaves_room_for_one_output_token(prompt_len: int, max_model_len: int) -> None:
    assert refused_by(prompt_len, max_model_len) == (prompt_len + 1 > max_model_len)


def test_one_replica_refuses_what_the_big_systems_hold() -> None:
    eng = EngineSettings(instance_kv_tokens=4096, block_size=32)
    one, big = system_spec("replicas", eng), system_spec("esp_2", eng)
    assert one.num_engines == 2 and one.kv_tokens == 4096
    long_prompt = 4096 + 500  # more than one instance holds, less than two
    assert refused_by(long_prompt, one.max_model_len)
    assert not refused_by(long_prompt, big.max_model_len)
    for name in ("stock_all", "esp_1", "esp_2_threshold"):
        assert system_spec(name, eng).max_model_len == big.max_model_len
    # stock_all and esp_1 hold all N instances' KV in one; esp_2 one instance's per instance.
    assert system_spec("stock_all", eng).kv_tokens == 2 * big.kv_tokens
    assert {system_spec(s, eng).placement for s in SYSTEMS} == {None, "loong", "threshold"}


# ---------------------------------------------------------------- shaping
def _record(i: int, source: str, prompt: int, jct: float | None, refused: bool) -> RequestRecord:
    rec = RequestRecord(f"r{i}", prompt, 8, arrival_s=float(i), source=source)
    if refused:
        rec.refused = "VLLMValidationError: too long"
    elif jct is not None:
        rec.first_token_s = rec.arrival_s + jct / 4
        rec.finish_s = rec.arrival_s + jct
        rec.num_output_tokens = 8
    return rec


def _rows(round_index: int, jcts: list[float | None], long_every: int = 3) -> list[dict]:
    recs = []
    for i, jct in enumerate(jcts):
        long = i % long_every == long_every - 1
        recs.append(
            _record(i, LONG_SOURCE if long else "sharegpt", 5000 if long else 100, jct, jct is None)
        )
    return record_rows(recs, round_index, assign_round_robin(len(recs), 2))


def test_rows_carry_what_a_simulator_reads() -> None:
    rows = _rows(1, [1.0, 2.0, None, 4.0])
    assert [r["class"] for r in rows] == ["short", "short", "long", "short"]
    assert [r["engine"] for r in rows] == [0, 1, 0, 1]
    refused = rows[2]
    assert refused["refused"] and refused["jct_s"] is None and refused["ttft_s"] is None
    assert refused["num_output_tokens"] == 8 and refused["num_generated_tokens"] == 0
    assert rows[1]["jct_s"] == 2.0 and rows[1]["ttft_s"] == 0.5 and rows[1]["round"] == 1
    keys = ("arrival_s", "num_prompt_tokens", "num_output_tokens", "class", "ttft_s", "jct_s")
    assert all(k in r for r in rows for k in (*keys, "refused"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0.01, 100.0)), min_size=1, max_size=30))
def test_system_block_splits_by_class(jcts: list[float | None]) -> None:
    rows = _rows(0, jcts)
    block = system_block(rows)
    assert set(block) == set(CLASSES)
    for cls in CLASSES:
        assert all(k in block[cls] for k in REQUIRED)
    a, s, lg = block["all"], block["short"], block["long"]
    assert a["served"] == s["served"] + lg["served"]
    assert a["refused"] == s["refused"] + lg["refused"] == sum(j is None for j in jcts)
    served = [j for j in jcts if j is not None]
    if served:
        assert a["mean_jct_s"] == pytest.approx(statistics.fmean(served), rel=1e-3)
        assert a["p99_jct_s"] <= max(served) + 1e-3
        assert a["mean_ttft_s"] == pytest.approx(a["mean_jct_s"] / 4, rel=1e-3)
    else:
        assert a["mean_jct_s"] is None and a["output_tok_s"] is None


def test_rounds_pool_and_tokens_per_second_use_both_spans() -> None:
    rows = _rows(0, [1.0, 1.0]) + _rows(1, [3.0, 3.0])
    stats = class_stats(rows, span_s=10.0)
    assert stats["served"] == 4 and stats["mean_jct_s"] == pytest.approx(2.0)
    block = system_block(rows)
    # Round spans: (1 + 1.0) - 0 = 2 and (1 + 3.0) - 0 = 4 s; 8 tokens per request.
    assert block["all"]["output_tok_s"] == pytest.approx(32 / 6)


# ---------------------------------------------------------- ratios/targets
def _blocks(mean_short: float, mean_all: float) -> dict[str, dict[str, Any]]:
    return {"short": {"mean_jct_s": mean_short}, "all": {"mean_jct_s": mean_all}}


def test_paired_ratios_are_round_by_round() -> None:
    per_round = {
        "esp_2": [_blocks(2.0, 4.0), _blocks(3.0, 9.0), _blocks(1.0, 1.0)],
        "replicas": [_blocks(1.0, 1.0), _blocks(1.0, 1.0), _blocks(2.0, 1.0)],
        "stock_all": [_blocks(1.0, 2.0), _blocks(1.0, 3.0), _blocks(1.0, 0.0)],
    }
    got = paired_ratios(per_round)
    assert set(got) == {k for k, v in PAIRED.items() if v[1] != "esp_2_threshold"}
    short = got["esp_2_over_replicas_short_mean_jct"]
    assert short["per_round"] == [2.0, 3.0, 0.5]
    assert (short["min"], short["median"], short["max"]) == (0.5, 2.0, 3.0)
    overall = got["esp_2_over_stock_all_all_mean_jct"]
    assert overall["per_round"] == [2.0, 3.0, None]  # a zero denominator is no ratio
    assert overall["median"] == 2.5


def test_spread_of_nothing() -> None:
    assert spread([None]) == {"per_round": [None], "min": None, "median": None, "max": None}


def _records(replicas_refuse: list[str], esp_serves: list[str]) -> dict[str, list[dict]]:
    def row(rid: str, refused: bool, jct: float | None) -> dict:
        return {"round": 0, "request_id": rid, "class": "long", "refused": refused, "jct_s": jct}

    return {
        "replicas": [row(r, True, None) for r in replicas_refuse],
        "esp_2": [row(r, False, 1.0) for r in esp_serves],
    }


@pytest.mark.parametrize(
    ("esp_serves", "short_ratio", "expected"),
    [(["a", "b"], 1.05, True), (["a"], 1.05, False), (["a", "b"], 1.2, False)],
)
def test_targets_measured_and_judged(esp_serves: list[str], short_ratio: float, expected: bool):
    records = _records(["a", "b"], esp_serves)
    systems = {
        "esp_2": _blocks(short_ratio, 1.1),
        "replicas": _blocks(1.0, 1.0),
        "stock_all": _blocks(1.0, 1.0),
    }
    ratios = paired_ratios({k: [v] for k, v in systems.items()})
    got = targets(systems, ratios, {"1": 2.0, "2": 1.0}, {"ratio": 1.4}, records)
    assert list(got) == list(TARGETS)
    assert got["lone_long_prompt_prefill_2_over_1"]["measured"] == 0.5
    assert got["lone_long_prompt_prefill_2_over_1"]["pass"] is True
    assert got["kernel_esp_over_vllm"]["pass"] is False
    overall = got["overall_mean_jct_esp_2_over_stock_all"]
    assert math.isclose(overall["measured"], 1.1) and overall["pass"] is True
    short = got["short_mean_jct_esp_2_over_replicas"]
    assert short["long_refused_by_replicas"]["num_long_refused"] == 2
    assert short["pass"] is expected
    assert all(t["limit"] == TARGETS[name] for name, t in got.items())


def test_targets_without_data_are_not_judged() -> None:
    got = targets({}, {}, {"1": None, "2": None}, None, {})
    assert all(t["measured"] is None and t["pass"] is None for t in got.values())


def test_long_served_where_refused_pairs_rounds() -> None:
    records = _records(["a"], ["a"])
    records["esp_2"][0]["round"] = 1  # served, but in another round
    assert long_served_where_refused(records, "replicas", "esp_2")["num_of_them_served"] == 0
