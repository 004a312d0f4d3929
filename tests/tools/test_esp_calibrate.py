"""``python -m vllm_esp.calibrate --esp``: argument parsing, the profiling grid,
the engine settings and the fit of measured rows (no engine is started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_esp import calibrate
from vllm_esp.core.esp.cost_model import DecodeCoeffs, ESPCostModel, chunk_terms


def test_parser_esp_and_classic(tmp_path):
    args = calibrate.build_parser().parse_args(["--esp", str(tmp_path / "o.json"), "--quick"])
    assert args.esp == tmp_path / "o.json" and args.quick and args.model is None
    args = calibrate.build_parser().parse_args(["--model", "m"])
    assert args.esp is None and args.model == "m"
    with pytest.raises(SystemExit):  # the classic path still needs --model
        calibrate.main([])


@pytest.mark.parametrize("grid", [calibrate.ESP_QUICK, calibrate.ESP_FULL])
def test_grid_fits_the_engine(grid):
    points = grid.prefill_points()
    assert len(points) >= 8  # enough to determine A, B, C with room to spare
    assert len({length for _, length in points}) >= 3  # B and C separable
    assert all(n * length <= grid.max_batch_tokens for n, length in points)
    kv = grid.kv_tokens(calibrate.ESP_BLOCK_SIZE)
    assert kv % calibrate.ESP_BLOCK_SIZE == 0
    assert kv >= grid.max_batch_tokens
    assert all(n * (k + grid.num_decode_tokens) <= kv for n, k in grid.decode_points())
    # Chunked rows: longer than a step's budget, their KV held by one instance.
    assert grid.chunked_lengths and min(grid.chunked_lengths) > grid.max_batch_tokens
    assert max(grid.chunked_lengths) < kv


@pytest.mark.parametrize("length", [4096, 6144, 5000])
def test_a_chunked_row_is_the_sum_of_its_chunks(length):
    """The engine prefills a long prompt in budget-sized chunks, each
    attending to the ones before it; the row's length sums are what the
    cost model charges those chunks (``chunk_terms``), so the fit and the
    simulator price a chunked prefill alike."""
    budget = 2048
    chunks = [(min(budget, length - k), k) for k in range(0, length, budget)]
    row = calibrate.chunked_row(length, budget, [0.5, 0.7])
    assert (row["sum_l"], row["sum_l2"]) == chunk_terms(chunks)
    assert row["num_chunks"] == len(chunks)
    assert row["seconds"] == pytest.approx(0.6)


def test_engine_kwargs(config_model_dir):
    grid = calibrate.ESP_QUICK
    one = calibrate.esp_engine_kwargs(config_model_dir, 1, grid, seed=0)
    two = calibrate.esp_engine_kwargs(config_model_dir, 2, grid, seed=0)
    assert one["kv_cache_memory_bytes"] == two["kv_cache_memory_bytes"]  # per instance
    assert not one["enable_prefix_caching"] and not two["enable_prefix_caching"]
    assert one["max_num_batched_tokens"] == grid.max_batch_tokens
    # Both are the ESP engine on 2 instances; the DoP target decides every chunk's DoP.
    for kwargs in (one, two):
        assert kwargs["additional_config"]["esp"]["num_instances"] == 2
    assert two["additional_config"]["esp"]["prefill_target_ms"] == calibrate.FORCE_DOP_TARGET_MS
    one_target = one["additional_config"]["esp"]["prefill_target_ms"]
    assert one_target == calibrate.NEVER_SPREAD_TARGET_MS
    # What the instances hold, capped by the model's positions (vLLM refuses more).
    max_pos = json.loads((Path(config_model_dir) / "config.json").read_text()).get(
        "max_position_embeddings", 10**9
    )
    kv = grid.kv_tokens(calibrate.ESP_BLOCK_SIZE)
    for kwargs in (one, two):
        assert kwargs["max_model_len"] == min(2 * kv - calibrate.ESP_BLOCK_SIZE, max_pos)
    with pytest.raises(ValueError, match="prefill_dop"):
        calibrate.esp_engine_kwargs(config_model_dir, 3, grid, seed=0)


def test_threshold_placement_forces_the_calibration_dops():
    """The two DoP targets force DoP 1 and DoP 2 whatever the chunk."""
    from vllm_esp.core.esp.placement import ThresholdElasticPolicy

    def policy(target_ms: float) -> ThresholdElasticPolicy:
        return ThresholdElasticPolicy(
            2, prefill_time=lambda q, k: 1e-4 * q, prefill_target_s=target_ms / 1e3
        )

    for num_new in (1, 64, 4096, 100_000):
        assert policy(calibrate.NEVER_SPREAD_TARGET_MS).prefill_dop(num_new, 0) == 1
        assert policy(calibrate.FORCE_DOP_TARGET_MS).prefill_dop(num_new, 0) == min(2, num_new)


def rows(a: float, b: float, c: float, points) -> list[dict]:
    return [
        {"sum_l": n * k, "sum_l2": n * k * k, "seconds": a + b * n * k + c * n * k * k}
        for n, k in points
    ]


def decode_rows(coeffs: tuple[float, ...], grid: calibrate.ESPGrid) -> tuple[list, list]:
    """``(local, striped)`` decode rows of ``grid`` timed by the decode terms
    ``(a, b, c, e, f, g)``: striped rows hold half of each prompt, every request remote."""
    a, b, c, e, f, g = coeffs

    def row(n: int, kv: int, remote: int) -> dict:
        seconds = a + b * n + c * kv + (e * remote + f + g * kv if remote else 0.0)
        return {"num_master": n, "num_kv_tokens": kv, "num_remote": remote, "seconds": seconds}

    local = [row(n, n * k, 0) for n, k in grid.decode_points()]
    striped = [row(n, n * (k // 2), n) for n, k in grid.decode_points()]
    return local, striped


def test_fit_esp_cost_writes_a_loadable_model(tmp_path):
    grid = calibrate.ESP_QUICK
    points = grid.prefill_points()
    decode = [
        {
            "num_master": n,
            "num_kv_tokens": n * k,
            "num_remote": 0,
            "seconds": 5e-3 + 1e-4 * n + 1e-7 * n * k,
        }
        for n, k in grid.decode_points()
    ]
    link = {"latency_s": 2e-4, "bandwidth_bytes_per_s": 2e9}
    cost = calibrate.fit_esp_cost(
        {1: rows(0.01, 1e-4, 1e-8, points), 2: rows(0.012, 5e-5, 5e-9, points)},
        decode,
        link,
        bytes_per_token=6144,
        exchange_bytes_per_request=40_000,
        meta={"capacity_tokens": 4096},
    )
    assert cost.source == "measured"
    assert cost.prefill[2].B_s == pytest.approx(5e-5, rel=1e-6)
    assert cost.ring_hop_s == pytest.approx(2e-3, rel=1e-6)
    assert cost.decode.c_s == pytest.approx(1e-7, rel=1e-6)
    # No remote samples: e comes from the link.
    assert cost.decode.e_s == pytest.approx(40_000 / 2e9)
    assert cost.meta["fit"]["decode_e_source"].startswith("link")
    assert cost.meta["fit"]["mean_rel_err"]["prefill_dop1"] < 1e-9
    path = tmp_path / "esp.json"
    cost.save(path)
    assert ESPCostModel.load(path) == cost
    assert json.loads(Path(path).read_text())["meta"]["capacity_tokens"] == 4096


@pytest.mark.parametrize(
    "coeffs",
    [(5e-3, 1e-4, 1e-7, 2e-3, 0.0, 0.0), (5e-3, 1e-4, 1e-7, 2e-4, 3e-3, 4e-7)],
    ids=["per-request-exchange", "exchange-round-and-striped-kv"],
)
def test_striped_decode_rows_measure_the_exchange(coeffs):
    """Rows of requests striped over 2 instances (every one remote) give the
    fit its exchange terms, the per-request one told apart from the per-step
    one and the per-striped-token one (the partial kernel's); the local rows
    alone leave them to the link (see above)."""
    grid = calibrate.ESP_QUICK
    local, striped = decode_rows(coeffs, grid)
    points = grid.prefill_points()
    cost = calibrate.fit_esp_cost(
        {1: rows(0.01, 1e-4, 1e-8, points), 2: rows(0.012, 5e-5, 5e-9, points)},
        local + striped,
        {"latency_s": 2e-4, "bandwidth_bytes_per_s": 2e9},
        bytes_per_token=6144,
        exchange_bytes_per_request=40_000,
        meta={},
    )
    assert cost.meta["fit"]["decode_e_source"] == "fitted"
    d = cost.decode
    assert (d.a_s, d.b_s, d.c_s, d.e_s, d.f_s, d.g_s) == pytest.approx(coeffs, rel=1e-4, abs=1e-12)
    assert d.mean_rel_err < 1e-6


def test_rows_are_the_busiest_instance(monkeypatch):
    """On 2 instances a row counts the busiest instance's share. Striped:
    the master holds all n requests, half of each prompt plus the new
    tokens, every request remote. Local (DoP 1): the instances take the
    requests in turn, so the busier one holds ceil(n / 2)."""
    grid = calibrate.ESPGrid(
        prefill_lengths=(64,),
        prefill_batches=(1, 2, 3),
        max_batch_tokens=192,
        decode_batches=(4,),
        decode_contexts=(128,),
        num_decode_tokens=16,
        repeats=1,
    )
    timing = calibrate.BatchTiming(first_s=0.1, total_s=0.1 + 16 * 0.02, one_step=True)
    monkeypatch.setattr(calibrate, "_run_batch", lambda *args, **kwargs: timing)
    (two,) = calibrate._measure_decode(None, grid, lambda n: [1] * n, striped=True)
    assert (two["num_master"], two["num_remote"]) == (4, 4)
    assert two["num_kv_tokens"] == 4 * (64 + 8) == two["num_striped_kv_tokens"]
    assert two["seconds"] == pytest.approx(0.02)
    (one,) = calibrate._measure_decode(None, grid, lambda n: [1] * n, striped=False)
    assert (one["num_master"], one["num_remote"], one["num_kv_tokens"]) == (2, 0, 2 * (128 + 8))
    assert one["num_striped_kv_tokens"] == 0
    at_dop1 = calibrate._measure_prefill(None, grid, lambda n: [1] * n, 1)
    assert [(r["batch"], r["num_requests_here"]) for r in at_dop1] == [(1, 1), (2, 1), (3, 2)]
    assert [r["sum_l"] for r in at_dop1] == [64, 64, 128]
    at_dop2 = calibrate._measure_prefill(None, grid, lambda n: [1] * n, 2)
    assert [r["sum_l2"] for r in at_dop2] == [n * 64 * 64 for n in (1, 2, 3)]


def test_striped_engine_kwargs(config_model_dir):
    two = calibrate.esp_engine_kwargs(config_model_dir, 2, calibrate.ESP_QUICK, 0, "stripe")
    assert two["additional_config"]["esp"]["prefill_storage"] == "stripe"


def test_refit_fits_a_stored_profile_again(tmp_path):
    """``--refit`` reads the samples a profile stored and fits them with the
    current terms; the striped rows' per-step cost, which a profile fitted
    without ``f`` spread over the other terms, comes back."""
    grid = calibrate.ESP_QUICK
    a, b, c, e, f, g = 5e-3, 1e-4, 1e-7, 2e-4, 3e-3, 4e-7
    local, striped = decode_rows((a, b, c, e, f, g), grid)
    points = grid.prefill_points()
    engines = {
        "dop1": {"prefill": rows(0.01, 1e-4, 1e-8, points), "decode": local},
        "dop2": {"prefill": rows(0.012, 5e-5, 5e-9, points)},
        "dop2_striped_decode": {"decode": striped},
    }
    meta = {
        "engines": engines,
        "link": {"latency_s": 2e-4, "bandwidth_bytes_per_s": 2e9},
        "kv_bytes_per_token": 6144,
        "exchange_bytes_per_remote_request": 40_000,
        "capacity_tokens": 4096,
    }
    stored = calibrate.fit_esp_cost(
        {1: engines["dop1"]["prefill"], 2: engines["dop2"]["prefill"]},
        engines["dop1"]["decode"] + engines["dop2_striped_decode"]["decode"],
        meta["link"],
        6144,
        40_000,
        meta,
    )
    # What an older fit (no step terms) would have written.
    old = ESPCostModel(
        prefill=stored.prefill,
        decode=DecodeCoeffs(a, b, c, e + 1e-3),
        migration=stored.migration,
        ring_hop_s=stored.ring_hop_s,
        source="measured",
        meta=stored.meta,
    )
    src, out = tmp_path / "old.json", tmp_path / "new.json"
    old.save(src)
    calibrate.main(["--esp", str(out), "--refit", str(src)])
    new = ESPCostModel.load(out)
    d = new.decode
    assert (d.a_s, d.b_s, d.c_s, d.e_s, d.f_s, d.g_s) == pytest.approx((a, b, c, e, f, g), rel=1e-4)
    assert new.prefill == stored.prefill
    assert new.meta["refit"]["of"] == str(src)
    assert new.meta["capacity_tokens"] == 4096
    # A file without samples is refused by name.
    bare = ESPCostModel(
        prefill=stored.prefill,
        decode=stored.decode,
        migration=stored.migration,
        source="derived",
    )
    bare.save(src)
    with pytest.raises(ValueError, match="no --esp profile"):
        calibrate.refit_esp(src, out)
    with pytest.raises(SystemExit):  # --refit writes to --esp
        calibrate.main(["--refit", str(src)])
