"""Engines that tests and benchmarks run and then inspect: the heavy-preemption
workload, an in-process EngineCore, and readers of what the scheduler did.

The workload is small enough for CI and preempts constantly: ~1,500 tokens
of KV for 24 requests of up to ~450 tokens, four at a time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from vllm_esp.harness.engine import random_prompts

#: ~1,500 tokens of KV (K+V x 2 layers x 2 KV heads x head_dim 32 x fp32)
#: for 24 requests of up to ~450 tokens, 4 at a time: memory preemption.
KV_BYTES = 2 * 2 * 2 * 32 * 4 * 1536
MAX_NUM_SEQS = 4
BLOCK_SIZE = 32

PROMPTS = random_prompts(24, seed=1)
MAX_TOKENS = [8 + (7 * i) % 40 for i in range(len(PROMPTS))]


@contextlib.contextmanager
def engine_core_in_process() -> Iterator[None]:
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
    manager.stat_loggers.append(
        PerEngineStatLoggerAdapter(
            vllm_config=llm.llm_engine.vllm_config,
            engine_indexes=manager.engine_indexes,
            per_engine_stat_logger_factory=ESPPrometheusStatLogger,
        )
    )


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
    return {
        "aborted_states": sorted(per_state),
        "num_aborted": len(aborted),
        "leaks": leak_report(scheduler),
    }
