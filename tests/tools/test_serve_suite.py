"""The HTTP workload suite without a server: its trace generators, the
aggregation into the result JSON, the paired ratios and the round order."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from benchmarks import serve_suite as suite
from benchmarks.common import write_json
from vllm_esp.data.sharegpt import load_sharegpt_pairs
from vllm_esp.data.trace import (
    TraceRequest,
    make_heavy_tail_trace,
    make_long_prompt_trace,
    make_sharegpt_trace,
)
from vllm_esp.models.tokenizer import train_bpe

STAT_KEYS = {"mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s", "n"}


class _Tok:
    """``tokenizers.Tokenizer`` behind the HF-style encode/decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok() -> _Tok:
    return _Tok(train_bpe(vocab_size=1024, train_chars=300_000))


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return load_sharegpt_pairs(max_pairs=2000)


def _lengths(trace: list[TraceRequest]) -> list[tuple[int, int, str, tuple[int, ...] | None]]:
    return [(r.prompt_len, r.output_len, r.source, r.prompt_token_ids) for r in trace]


# ------------------------------------------------------------------- traces
def test_heavy_tail_is_seeded_and_keeps_sharegpt_prompts_and_arrivals(tok: _Tok, pairs) -> None:
    a = make_heavy_tail_trace(tok, 60, 3.0, seed=5, pairs=pairs)
    assert a == make_heavy_tail_trace(tok, 60, 3.0, seed=5, pairs=pairs)
    assert _lengths(a) != _lengths(make_heavy_tail_trace(tok, 60, 3.0, seed=6, pairs=pairs))
    base = make_sharegpt_trace(tok, 60, 3.0, seed=5, scale=0.5, pairs=pairs)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in base]
    assert [r.arrival_s for r in a] == [r.arrival_s for r in base]
    assert {r.source for r in a} == {"synthetic-heavy-tail"}
    assert suite.request_class(a[0]) is None


def test_heavy_tail_lengths_are_clipped_and_heavy(tok: _Tok, pairs) -> None:
    trace = make_heavy_tail_trace(
        tok, 1000, math.inf, seed=0, max_output_len=1024, max_model_len=1200, pairs=pairs
    )
    outputs = np.array([r.output_len for r in trace])
    for r in trace:
        assert 1 <= r.output_len <= min(1024, 1200 - r.prompt_len)
        assert r.output_len >= min(16, 1200 - r.prompt_len)
    # Pareto(1.1) from 16: P(o > 8 * 16) = 8 ** -1.1 ~ 0.10, far above a
    # light tail's; the median stays near 16 * 2 ** (1 / 1.1) ~ 30.
    assert 0.06 < np.mean(outputs > 128) < 0.15
    assert 24 <= np.median(outputs) <= 38
    assert outputs.max() >= 900


def test_long_prompt_trace_classes_and_lengths(tok: _Tok, pairs) -> None:
    trace = make_long_prompt_trace(tok, 50, 4.0, seed=3, pairs=pairs)
    assert trace == make_long_prompt_trace(tok, 50, 4.0, seed=3, pairs=pairs)
    assert _lengths(trace) != _lengths(make_long_prompt_trace(tok, 50, 4.0, seed=4, pairs=pairs))
    classes = [suite.request_class(r) for r in trace]
    assert classes.count("long") == 10 and classes.count("short") == 40
    for r, c in zip(trace, classes):
        assert r.source == f"synthetic-long-prompts-{c}"
        assert 16 <= r.output_len <= 96
        assert r.prompt_len + r.output_len <= 2048
        if c == "long":
            assert 1000 <= r.prompt_len <= 1800
        else:
            assert 1 <= r.prompt_len <= 256
        assert r.prompt_token_ids is not None and len(r.prompt_token_ids) == r.prompt_len
    with pytest.raises(ValueError):
        make_long_prompt_trace(tok, 5, 1.0, seed=0, long_prompt_range=(1000, 2000), pairs=pairs)


@pytest.mark.parametrize("family", ["sharegpt", "mixed", "heavy_tail", "long_prompts"])
def test_families_are_the_same_requests_at_every_rate(tok: _Tok, family: str) -> None:
    burst = suite.build_family(family, tok, 40, math.inf, seed=1, scale=0.5)
    slow = suite.build_family(family, tok, 40, 2.0, seed=1, scale=0.5)
    fast = suite.build_family(family, tok, 40, 8.0, seed=1, scale=0.5)
    assert _lengths(burst) == _lengths(slow) == _lengths(fast)
    assert all(r.arrival_s == 0.0 for r in burst)
    gaps = np.diff([0.0] + [r.arrival_s for r in slow])
    assert np.all(gaps >= 0)
    np.testing.assert_allclose([4 * r.arrival_s for r in fast], [r.arrival_s for r in slow])
    classes = {suite.request_class(r) for r in burst}
    assert classes == ({None} if family in ("sharegpt", "heavy_tail") else {"short", "long"})


def test_suite_trace_names() -> None:
    names = [s.name for s in suite.trace_specs()]
    assert names[0] == "sharegpt_burst"
    assert {"sharegpt_0.5", "sharegpt_0.8", "sharegpt_0.95", "heavy_tail", "long_prompts"} <= set(
        names
    )
    assert [n for n in names if n.startswith("mixed")] == ["mixed_0.9"]
    loads = {s.name: s.load for s in suite.trace_specs()}
    assert loads["sharegpt_burst"] is None and loads["sharegpt_0.95"] == 0.95


# -------------------------------------------------------------- aggregation
def _replay(
    trace: str,
    policy: str,
    rnd: int,
    e2e: list[float],
    ttft: list[float] | None = None,
    classes: list[str | None] | None = None,
) -> suite.Replay:
    return suite.Replay(
        trace=trace,
        policy=policy,
        round=rnd,
        classes=classes or [None] * len(e2e),
        ttft_s=ttft or [e / 10 for e in e2e],
        e2e_s=e2e,
        speed_probe_s=0.2,
        wall_s=10.0,
    )


MIXED: list[str | None] = ["short", "short", "long", "short"]


def test_class_stats_have_all_and_the_classes_present() -> None:
    stats = suite.class_stats(MIXED, [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 9.0, 3.0])
    assert set(stats) == {"all", "short", "long"}
    assert all(set(s) == STAT_KEYS for s in stats.values())
    assert stats["all"]["n"] == 4 and stats["short"]["n"] == 3 and stats["long"]["n"] == 1
    assert stats["short"]["mean_e2e_s"] == pytest.approx(2.0)
    assert stats["short"]["mean_ttft_s"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert stats["long"]["p99_e2e_s"] == 9.0
    # Linear interpolation between the two largest of four: 3 + 0.97 * 6.
    assert stats["all"]["p99_e2e_s"] == pytest.approx(3.0 + 0.97 * 6.0)
    assert set(suite.class_stats([None, None], [0.1, 0.2], [1.0, 2.0])) == {"all"}


def test_pooled_stats_pool_the_rounds() -> None:
    replays = [
        _replay("mixed_0.9", "fcfs", 0, [1.0, 2.0, 9.0, 3.0], classes=MIXED),
        _replay("mixed_0.9", "fcfs", 1, [3.0, 4.0, 11.0, 5.0], classes=MIXED),
        _replay("sharegpt_0.5", "fcfs", 0, [1.0, 3.0]),
    ]
    pooled = suite.pooled_stats(replays)
    mixed = pooled["mixed_0.9"]["fcfs"]
    assert mixed["all"]["n"] == 8 and mixed["short"]["n"] == 6 and mixed["long"]["n"] == 2
    assert mixed["short"]["mean_e2e_s"] == pytest.approx(3.0)
    assert mixed["long"]["mean_e2e_s"] == pytest.approx(10.0)
    assert set(pooled["sharegpt_0.5"]["fcfs"]) == {"all"}


def test_paired_ratios_per_round_with_spread() -> None:
    replays = [
        _replay("t", "fcfs", 0, [2.0, 2.0]),
        _replay("t", "mlfq", 0, [1.0, 1.0]),
        _replay("t", "fcfs", 1, [4.0, 4.0]),
        _replay("t", "mlfq", 1, [4.0, 4.0]),
        _replay("t", "fcfs", 2, [1.0, 1.0]),
        _replay("t", "mlfq", 2, [0.9, 0.9]),
        # A round without its fcfs replay is not paired.
        _replay("t", "mlfq", 3, [100.0, 100.0]),
    ]
    ratios = suite.paired_ratios(replays)
    assert set(ratios["t"]) == {"mlfq"}
    mean = ratios["t"]["mlfq"]["all"]["mean_e2e"]
    assert mean["per_round"] == pytest.approx([0.5, 1.0, 0.9])
    assert (mean["min"], mean["median"], mean["max"]) == pytest.approx((0.5, 0.9, 1.0))
    assert ratios["t"]["mlfq"]["all"]["mean_ttft"]["per_round"] == pytest.approx([0.5, 1.0, 0.9])
    assert set(ratios["t"]["mlfq"]["all"]) == {"mean_e2e", "p99_e2e", "mean_ttft"}


def test_paired_ratios_per_class() -> None:
    replays = [
        _replay("mixed_0.9", "fcfs", 0, [2.0, 2.0, 10.0, 2.0], classes=MIXED),
        _replay("mixed_0.9", "mlfq", 0, [0.5, 0.5, 12.0, 0.5], classes=MIXED),
    ]
    r = suite.paired_ratios(replays)["mixed_0.9"]["mlfq"]
    assert set(r) == {"all", "short", "long"}
    assert r["short"]["mean_e2e"]["median"] == pytest.approx(0.25)
    assert r["long"]["mean_e2e"]["median"] == pytest.approx(1.2)
    t = suite.targets(replays)
    assert t["mixed_short_vs_fcfs"]["mixed_0.9/mlfq"]["mean_e2e"]["met"] is True
    # Mean E2E 3.375 s against 4 s, but the long request's p99 is 1.2x.
    assert t["mlfq_vs_fcfs"]["mixed_0.9"]["mean_e2e"]["met"] is True
    assert t["mlfq_vs_fcfs"]["mixed_0.9"]["p99_e2e"]["met"] is False
    assert t["gittins_vs_fcfs"]["mixed_0.9"]["met"] is None  # not run


def test_capacity_of_a_uniform_burst_is_its_completion_rate() -> None:
    # 16 requests of 10 tokens, 8 at a time, 1 s per wave: 8 requests/s.
    first = [0.1] * 8 + [1.1] * 8
    finish = [1.0] * 8 + [2.0] * 8
    cap = suite.capacity_from_burst(first, finish, [10] * 16, max_num_seqs=8)
    assert cap["capacity_rps"] == pytest.approx(8.0)
    assert cap["saturated_window_s"] == 2.0
    assert cap["completions_per_s"] == pytest.approx(8.0)


def test_capacity_counts_the_long_requests_left_to_the_drain() -> None:
    # 2 slots: 18 short requests (10 tokens) run through one slot at 10 a
    # second while one long request (400 tokens, 40 tokens/s) holds the
    # other from 0 to 10 s. Completions come fast (18 in 1.8 s), but the
    # server makes 140 tokens/s, 140 / mean output (30.5) = 4.6 requests/s.
    first = [0.1 * i for i in range(18)] + [0.0]
    finish = [0.1 * (i + 1) for i in range(18)] + [10.0]
    outputs = [10] * 18 + [400]
    cap = suite.capacity_from_burst(first, finish, outputs, max_num_seqs=2)
    assert cap["saturated_window_s"] == pytest.approx(1.8)
    assert cap["output_tok_s"] == pytest.approx((180 + 400 * 1.8 / 10) / 1.8)
    assert cap["capacity_rps"] == pytest.approx(cap["output_tok_s"] / (580 / 19))
    assert cap["capacity_rps"] < 18 / 1.8 / 2
    with pytest.raises(ValueError):
        suite.capacity_from_burst([], [], [], max_num_seqs=2)


def _fake_run() -> tuple[suite.SuiteRun, list[suite.TraceSpec]]:
    specs = [suite.TraceSpec("sharegpt_burst", "sharegpt", None)]
    specs += [suite.TraceSpec("mixed_0.9", "mixed", 0.9)]
    req = TraceRequest("r", 0.0, 3, 4, prompt_token_ids=(1, 2, 3))
    run = suite.SuiteRun(capacity={"mixed": {"capacity_rps": 2.0}})
    run.traces["sharegpt_burst"] = [req, req]
    run.traces["mixed_0.9"] = [
        TraceRequest(f"m{i}", 0.0, 3, 4, prompt_token_ids=(1, 2, 3), source=f"x-{c}")
        for i, c in enumerate(MIXED)
    ]
    for rnd in range(2):
        for policy in ("fcfs", "mlfq"):
            run.replays.append(_replay("sharegpt_burst", policy, rnd, [1.0 + rnd, 2.0]))
            run.replays.append(_replay("mixed_0.9", policy, rnd, [1.0, 2.0, 5.0, 1.0], None, MIXED))
    return run, specs


def test_traces_json_has_the_documented_shape(tmp_path: Path) -> None:
    run, specs = _fake_run()
    traces = suite.traces_json(run, specs)
    path = write_json(tmp_path / "out.json", {"traces": traces})
    loaded = json.loads(path.read_text())["traces"]
    assert set(loaded) == {"sharegpt_burst", "mixed_0.9"}
    for name, t in loaded.items():
        assert set(t["policies"]) == {"fcfs", "mlfq"}
        for per_class in t["policies"].values():
            assert set(per_class) == ({"all", "short", "long"} if name == "mixed_0.9" else {"all"})
            assert all(set(s) == STAT_KEYS for s in per_class.values())
        assert set(t["ratios_vs_fcfs"]) == {"mlfq"}
        assert len(t["replays"]) == 4
    assert loaded["mixed_0.9"]["policies"]["fcfs"]["short"]["n"] == 6
    assert loaded["mixed_0.9"]["rate_rps"] == pytest.approx(1.8)
    assert loaded["sharegpt_burst"]["rate_rps"] is None
    assert loaded["mixed_0.9"]["class_counts"] == {"short": 3, "long": 1}


def test_print_tables_show_each_policy_and_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    run, specs = _fake_run()
    suite.print_tables(suite.traces_json(run, specs), ["fcfs", "mlfq"])
    out = capsys.readouterr().out
    assert "== sharegpt_burst" in out and "== mixed_0.9" in out
    # mlfq / fcfs mean E2E on the burst: 1.5 / 1.5 and 2.5 / 2.5 per round.
    assert "1.00 [1.00-1.00]" in out


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run, specs = _fake_run()
    assert suite.plot(tmp_path / "p.png", run.replays, specs, ["fcfs", "mlfq"])
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cdf_panels_show_the_mixed_classes_else_whole_traces() -> None:
    burst = suite.TraceSpec("sharegpt_burst", "sharegpt", None)
    low = suite.TraceSpec("sharegpt_0.5", "sharegpt", 0.5)
    mixed = suite.TraceSpec("mixed_0.9", "mixed", 0.9)
    heavy = suite.TraceSpec("heavy_tail", "heavy_tail", 0.9)
    assert suite.cdf_panels([burst, mixed, heavy], 3) == [
        ("mixed_0.9", "short"),
        ("mixed_0.9", "long"),
        ("sharegpt_burst", None),
    ]
    assert suite.cdf_panels([burst, low], 2) == [("sharegpt_burst", None), ("sharegpt_0.5", None)]


def test_replot_redraws_the_png_from_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run, specs = _fake_run()
    path = write_json(
        tmp_path / "out.json",
        {"schedulers": ["fcfs", "mlfq"], "traces": suite.traces_json(run, specs)},
    )
    replays = suite.replays_from_json(json.loads(path.read_text()))
    key = lambda r: (r.trace, r.policy, r.round)
    assert sorted((key(r), r.e2e_s, r.classes) for r in replays) == sorted(
        (key(r), r.e2e_s, r.classes) for r in run.replays
    )
    assert suite.main(["--replot", "--out", str(path)]) == 0
    assert (tmp_path / "out.png").stat().st_size > 0


# ----------------------------------------------------------- round driving
def test_rounds_alternate_and_fcfs_measures_capacity_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[str] = []
    replayed: list[tuple[str, str, int]] = []

    @contextlib.contextmanager
    def fake_serving(model: str, policy: str, log_path: Path, warmup: list[int]) -> Iterator[Any]:
        started.append(policy)
        log_path.write_text("CPU KV cache size: 1,024 tokens")
        yield suite.Server("http://x", model, policy, log_path, 1.0)

    def fake_replay(server: Any, name: str, rnd: int, trace: list[TraceRequest]) -> suite.Replay:
        replayed.append((server.policy, name, rnd))
        rep = _replay(name, server.policy, rnd, [1.0] * len(trace))
        rep.extra["first_token_s"] = [float(i) for i in range(len(trace))]
        rep.extra["finish_s"] = [float(i + 1) for i in range(len(trace))]
        return rep

    monkeypatch.setattr(suite, "serving", fake_serving)
    monkeypatch.setattr(suite, "replay_on", fake_replay)
    specs = [
        suite.TraceSpec("sharegpt_burst", "sharegpt", None),
        suite.TraceSpec("sharegpt_0.5", "sharegpt", 0.5),
        suite.TraceSpec("mixed_0.9", "mixed", 0.9),
    ]
    rates: dict[str, list[float]] = {}

    def build(family: str, rate: float) -> list[TraceRequest]:
        rates.setdefault(family, []).append(rate)
        return [TraceRequest(f"{family}{i}", 0.0, 2, 2, prompt_token_ids=(1, 2)) for i in range(11)]

    run = suite.run_suite("m", ["fcfs", "mlfq", "gittins"], specs, 3, build, tmp_path)
    # Every server once, all up together.
    assert started == ["fcfs", "mlfq", "gittins"]
    # The fcfs server first measures: the ShareGPT burst (doubling as its
    # capacity, round 0's fcfs replay of it) and the mixed capacity burst.
    assert replayed[:2] == [("fcfs", "sharegpt_burst", 0), ("fcfs", "capacity_mixed", 0)]
    # Then per trace, per round, every policy back to back, reversed on
    # odd rounds (A B C, C B A, A B C).
    assert replayed[2:10] == [
        ("mlfq", "sharegpt_burst", 0),
        ("gittins", "sharegpt_burst", 0),
        ("gittins", "sharegpt_burst", 1),
        ("mlfq", "sharegpt_burst", 1),
        ("fcfs", "sharegpt_burst", 1),
        ("fcfs", "sharegpt_burst", 2),
        ("mlfq", "sharegpt_burst", 2),
        ("gittins", "sharegpt_burst", 2),
    ]
    assert replayed[10:13] == [
        ("fcfs", "sharegpt_0.5", 0),
        ("mlfq", "sharegpt_0.5", 0),
        ("gittins", "sharegpt_0.5", 0),
    ]
    assert {(r.trace, r.policy, r.round) for r in run.replays} == {
        (s.name, p, k) for s in specs for p in ("fcfs", "mlfq", "gittins") for k in range(3)
    }
    assert len(run.replays) == 27  # the capacity-only burst is not a result
    # One request at a time, a second each: 1 request/s.
    assert run.capacity["mixed"]["capacity_rps"] == pytest.approx(1.0)
    assert rates["sharegpt"] == [math.inf, pytest.approx(0.5)]
    assert rates["mixed"] == [math.inf, pytest.approx(0.9)]
    assert all(s["kv_cache_tokens"] == 1024 for s in run.sessions)
    assert statistics.mean(s["startup_s"] for s in run.sessions) == 1.0


def test_fresh_servers_start_anew_for_every_round_after_closing_the_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    events: list[tuple[str, str, int]] = []
    starts = itertools.count()

    @contextlib.contextmanager
    def fake_serving(model: str, policy: str, log_path: Path, warmup: list[int]) -> Iterator[Any]:
        n = next(starts)
        events.append(("start", policy, n))
        log_path.write_text("CPU KV cache size: 1,024 tokens")
        try:
            yield suite.Server(f"http://x/{n}", model, policy, log_path, 1.0)
        finally:
            events.append(("stop", policy, n))

    def fake_replay(server: Any, name: str, rnd: int, trace: list[TraceRequest]) -> suite.Replay:
        events.append(("replay", server.policy, int(server.base.rsplit("/", 1)[1])))
        return _replay(name, server.policy, rnd, [1.0] * len(trace))

    monkeypatch.setattr(suite, "serving", fake_serving)
    monkeypatch.setattr(suite, "replay_on", fake_replay)
    specs = [suite.TraceSpec("sharegpt_burst", "sharegpt", None)]

    def build(family: str, rate: float) -> list[TraceRequest]:
        return [TraceRequest(f"{family}{i}", 0.0, 2, 2, prompt_token_ids=(1, 2)) for i in range(3)]

    run = suite.run_suite("m", ["fcfs", "mlfq"], specs, 3, build, tmp_path, fresh_servers=True)
    assert len(run.sessions) == 6 and len(run.replays) == 6
    # Round r's replays run on round r's servers, which start only after
    # the previous round's have stopped.
    for rnd in range(3):
        mine = {2 * rnd, 2 * rnd + 1}
        replays = [e for e in events if e[0] == "replay" and e[2] in mine]
        assert [p for _, p, _ in replays] == (
            ["fcfs", "mlfq"] if rnd % 2 == 0 else ["mlfq", "fcfs"]
        )
        if rnd:
            first_start = events.index(("start", "fcfs", 2 * rnd))
            assert {("stop", "fcfs", 2 * rnd - 2), ("stop", "mlfq", 2 * rnd - 1)} <= set(
                events[:first_start]
            )
    assert sum(1 for e in events if e[0] == "stop") == 6


def test_cli_requires_fcfs_and_puts_it_first(tmp_path: Path) -> None:
    args = suite.parse_args(["--out", str(tmp_path / "x.json"), "--schedulers", "mlfq,fcfs"])
    assert args.schedulers == ["fcfs", "mlfq"]
    assert [s.name for s in args.specs] == [s.name for s in suite.trace_specs()]
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x.json", "--schedulers", "mlfq"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x.json", "--traces", "nope"])
