"""``mlfq-swap`` on the real engine: preemption by host KV swap.

The same prompts and engine settings as ``test_offline_equality.py`` (a KV
cache of ~1,500 tokens for 24 requests of up to ~450, four at a time), so
the MLFQ scheduler preempts constantly. Two engines (the only two this
file starts): a roomy host pool, where every preempted request must come
back without recomputing a token, and a tiny one, where most preemptions
fall back to recompute. Both must produce stock vLLM's greedy tokens.

EngineCore runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
the worker is still its own process) so the tests can read the scheduler:
its counters, its block pools, and what it scheduled for every resumed
request.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
from conftest import BLOCK_SIZE, KV_BYTES, MAX_NUM_SEQS, MAX_TOKENS, PROMPTS

import vllm_esp
from vllm_esp.harness.engine import ENGINE_KWARGS, small_model_path

pytestmark = pytest.mark.engine


@contextlib.contextmanager
def engine_core_in_process():
    import vllm.envs as envs

    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    envs.disable_envs_cache()  # an in-process EngineCore freezes the env cache
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old
        envs.disable_envs_cache()


class ResumeRecorder:
    """Wraps ``scheduler.schedule``: for every request that resumes after a
    preemption, how many of its tokens had been computed at most before
    (observed after each step, independently of the scheduler's own
    counter) and how many it starts from."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.inner = scheduler.schedule
        self.high_water: dict[str, int] = {}
        self.resumes: list[tuple[str, int, int]] = []  # (id, computed before, computed at resume)
        scheduler.schedule = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        resumed = set(out.scheduled_cached_reqs.resumed_req_ids)
        resumed |= {r.req_id for r in out.scheduled_new_reqs if r.req_id in self.high_water}
        for rid, n in out.num_scheduled_tokens.items():
            request = self.scheduler.requests[rid]
            start = request.num_computed_tokens - n
            if rid in resumed:
                self.resumes.append((rid, self.high_water.get(rid, 0), start))
            self.high_water[rid] = max(self.high_water.get(rid, 0), request.num_computed_tokens)
        return out


def leak_report(scheduler) -> dict:
    pool = scheduler.kv_cache_manager.block_pool
    book = scheduler.swap.book
    book.take_step()  # recycle what the last step released
    return {
        "device_free": pool.get_num_free_blocks(),
        "device_total": pool.num_gpu_blocks - 1,  # minus vLLM's null block
        "host_free": book.pool.num_free,
        "host_total": scheduler.swap.num_host_blocks,
        "copies": len(book),
        "requests": len(scheduler.requests),
    }


def exported_counters() -> dict[str, float]:
    """``vllm_esp:`` counters in this process's Prometheus registry (vLLM's
    own metrics reader only returns ``vllm:`` series)."""
    import prometheus_client as prom

    out: dict[str, float] = {}
    for metric in prom.REGISTRY.collect():
        if metric.name.startswith("vllm_esp:") and metric.type == "counter":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def attach_esp_logger(llm) -> None:
    """What ``vllm serve`` does through the stat-logger entry point; the
    offline ``LLM`` takes no plugin loggers, so add ours by hand."""
    from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter

    from vllm_esp.integration.metrics import ESPPrometheusStatLogger

    manager = llm.llm_engine.logger_manager
    manager.stat_loggers.append(PerEngineStatLoggerAdapter(
        vllm_config=llm.llm_engine.vllm_config, engine_indexes=manager.engine_indexes,
        per_engine_stat_logger_factory=ESPPrometheusStatLogger))


def run_swap(swap: dict, with_aborts: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=small_model_path(),
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=512,
        kv_cache_memory_bytes=KV_BYTES,
        block_size=BLOCK_SIZE,
        **ENGINE_KWARGS,
        # FastServe's depth (8 levels): more rank changes, more preemption.
        **vllm_esp.scheduler_args("mlfq-swap", swap=swap, num_levels=8),
    )
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        recorder = ResumeRecorder(scheduler)
        attach_esp_logger(llm)
        exported_before = exported_counters()
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        scheduler.check_invariants()
        exported = exported_counters()
        result = {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "preemptions": sum(o.metrics.num_preemptions for o in outs),
            "stats": {k.removeprefix("vllm_esp:"): v for k, v in scheduler.plugin_stats().items()},
            "exported": {k: v - exported_before.get(k, 0.0) for k, v in exported.items()},
            "resumes": list(recorder.resumes),
            "leaks": leak_report(scheduler),
        }
        if with_aborts:
            result["aborts"] = abort_while_swapped(llm, scheduler, params)
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def abort_while_swapped(llm, scheduler, params) -> dict:
    """Replay the prompts and abort requests the moment they are swapped
    out, being prefetched or prefetched (up to three in each state);
    nothing may leak."""
    from collections import Counter

    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    ids = {  # EngineCore's (internal) request ids
        engine.add_request(f"abort-{i}", TokensPrompt(prompt_token_ids=prompt), p)
        for i, (prompt, p) in enumerate(zip(PROMPTS, params))
    }
    aborted: dict[str, str] = {}
    per_state: Counter[str] = Counter()
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        for rid in ids & set(scheduler.requests):
            state = scheduler.swap.state(rid)
            if state is None or rid in aborted or per_state[state.value] >= 3:
                continue
            aborted[rid] = state.value
            per_state[state.value] += 1
            engine.abort_request([rid], internal=True)  # between two steps, as a client would
        scheduler.check_invariants()
    else:
        raise AssertionError("abort replay did not drain")
    return {"aborted_states": sorted(per_state), "num_aborted": len(aborted),
            "leaks": leak_report(scheduler)}


@pytest.fixture(scope="module")
def swap_runs() -> dict[str, dict]:
    with engine_core_in_process():
        return {
            # ~11 MiB of host pool: room for every request's KV.
            "roomy": run_swap({"host_pool_blocks": 512}, with_aborts=True),
            # 8 blocks (256 tokens): most victims do not fit.
            "tiny": run_swap({"host_pool_blocks": 8}, with_aborts=False),
        }


def test_stock_run_is_unpreempted(offline_outputs):
    assert offline_outputs["fcfs"]["preemptions"] == 0


@pytest.mark.parametrize("run", ["roomy", "tiny"])
def test_greedy_outputs_equal_stock_vllm(swap_runs, offline_outputs, run):
    assert swap_runs[run]["tokens"] == offline_outputs["fcfs"]["tokens"]


def test_preemption_was_heavy_and_went_through_the_host(swap_runs):
    r = swap_runs["roomy"]
    assert r["preemptions"] >= 10
    stats = r["stats"]
    assert stats["swap_out_blocks_total"] > 50 and stats["swap_in_blocks_total"] > 50
    assert stats["swap_out_bytes_total"] == stats["swap_out_blocks_total"] * 32 * 1024  # small model: 32 KiB/block
    assert stats["swap_out_time_us_total"] > 0 and stats["swap_in_time_us_total"] > 0
    assert stats["swap_recompute_fallbacks_total"] == 0


def test_swap_counters_reach_prometheus(swap_runs):
    r = swap_runs["roomy"]
    stats, exported = r["stats"], r["exported"]
    for key in ("swap_out_bytes_total", "swap_in_bytes_total", "swap_out_blocks_total",
                "swap_recompute_fallbacks_total", "recomputed_tokens_total"):
        assert exported[f"vllm_esp:{key}"] == stats[key], key
    assert exported["vllm_esp:swap_out_seconds_total"] == pytest.approx(stats["swap_out_time_us_total"] / 1e6)
    assert swap_runs["tiny"]["exported"]["vllm_esp:swap_recompute_fallbacks_total"] > 0


def test_swapped_requests_are_not_recomputed(swap_runs):
    r = swap_runs["roomy"]
    assert len(r["resumes"]) >= 10
    # Every resume starts at (at least) the most tokens it ever had computed.
    assert [x for x in r["resumes"] if x[2] < x[1]] == []
    assert r["stats"]["recomputed_tokens_total"] == 0


def test_full_host_pool_falls_back_to_recompute_and_completes(swap_runs):
    r = swap_runs["tiny"]
    assert r["stats"]["swap_recompute_fallbacks_total"] > 0
    recomputed = [x for x in r["resumes"] if x[2] < x[1]]
    assert recomputed, "the tiny pool should have forced some recompute"
    assert r["stats"]["recomputed_tokens_total"] >= sum(before - start for _, before, start in recomputed)


@pytest.mark.parametrize("run", ["roomy", "tiny"])
def test_no_device_or_host_block_leaks(swap_runs, run):
    leaks = swap_runs[run]["leaks"]
    assert leaks["device_free"] == leaks["device_total"]
    assert leaks["host_free"] == leaks["host_total"]
    assert leaks["copies"] == 0 and leaks["requests"] == 0


def test_aborts_of_swapped_requests_leak_nothing(swap_runs):
    aborts = swap_runs["roomy"]["aborts"]
    assert aborts["num_aborted"] >= 3
    assert "swapped" in aborts["aborted_states"]
    leaks = aborts["leaks"]
    assert leaks["device_free"] == leaks["device_total"]
    assert leaks["host_free"] == leaks["host_total"]
    assert leaks["copies"] == 0 and leaks["requests"] == 0
