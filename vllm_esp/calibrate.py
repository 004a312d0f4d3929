"""Calibrate the step cost model (or the ESP cluster cost model) on this machine.

    python -m vllm_esp.calibrate --model DIR [--out FILE] [--quick]
    python -m vllm_esp.calibrate --esp OUT.json [--model PRESET_OR_DIR] [--quick]
    python -m vllm_esp.calibrate --esp OUT.json --refit PROFILE.json

Runs the real vLLM engine on ``--model`` and times, one request at a time
(prefix caching off, so nothing is reused between runs):

* prefills of ``q`` tokens (``max_tokens=1``): samples of ``T(q, 0)``;
* decodes after a ``k``-token prompt: the time of ``m`` extra tokens
  divided by ``m`` gives samples of ``T(1, k)``.

It fits ``T(q, k) = alpha + beta*q + gamma*q*(k + (q+1)/2)`` minimising the
*relative* error (short prefills matter as much as long ones for picking a
level) and writes the coefficients, the samples and the fit error to
``--out`` (default: the path the scheduler looks up for that model, see
``vllm_esp.core.costmodel.default_calibration_path``).

``--esp OUT.json`` profiles the ESP cluster cost model instead
(``vllm_esp.core.esp.cost_model``; see :func:`profile_esp`), on the ESP
engine itself (2 instances, so every row carries the lockstep step's own
cost): prefill batches of identical-length requests at DoP 1 and DoP 2,
decode steps of requests whose KV is on one instance and of requests
whose KV is striped over both (every one of them exchanges its query and
partial output at every layer), the instances' point-to-point link; fitted with ``vllm_esp.core.esp.cost_fit``
and written with the fit errors. ``--refit PROFILE.json`` measures nothing:
it fits the samples an earlier ``--esp`` profile stored again, with the
cost model's current terms.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_esp.core.costmodel import StepCostModel, default_calibration_path
from vllm_esp.core.esp.cost_fit import (
    DecodeSample,
    PrefillSample,
    fit_decode_detailed,
    fit_prefill,
    ring_hop_from_rows,
)
from vllm_esp.core.esp.cost_model import DecodeCoeffs, ESPCostModel, MigrationCoeffs


def fit_relative(samples: list[tuple[int, int, float]]) -> tuple[np.ndarray, float]:
    """Non-negative least squares on relative error; returns (coef, MAPE)."""
    q = np.array([s[0] for s in samples], dtype=np.float64)
    k = np.array([s[1] for s in samples], dtype=np.float64)
    t = np.array([s[2] for s in samples], dtype=np.float64)
    features = np.stack([np.ones_like(q), q, q * (k + (q + 1.0) / 2.0)], axis=1)
    weighted = features / t[:, None]
    target = np.ones_like(t)
    active = [0, 1, 2]
    coef = np.zeros(3)
    # Drop any coefficient that comes out negative and refit (a tiny NNLS).
    while active:
        sol, *_ = np.linalg.lstsq(weighted[:, active], target, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active = [a for a, v in zip(active, sol) if v >= 0]
    mape = float(np.mean(np.abs(features @ coef - t) / t))
    return coef, mape


def _timed_generate(llm, prompt_ids: list[int], max_tokens: int, repeats: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: KV cache of the profiling engine: room for the longest profiled request
#: with margin. Sized explicitly because vLLM's default CPU memory fraction
#: fails at start-up when the NUMA node has less memory free than it asks.
DEFAULT_KV_CACHE_BYTES = 256 * 2**20


def profile(
    model: str,
    out: Path | None,
    quick: bool,
    max_model_len: int,
    kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
) -> StepCostModel:
    import vllm
    from vllm import LLM

    from vllm_esp.integration.cost_model import device_kind

    rng = np.random.default_rng(0)
    llm = LLM(
        model=model,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        max_num_seqs=8,
        max_num_batched_tokens=max_model_len,
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=kv_cache_memory_bytes,
    )
    vocab = llm.get_tokenizer().vocab_size if hasattr(llm.get_tokenizer(), "vocab_size") else 1000

    def prompt(n: int) -> list[int]:
        return rng.integers(10, max(vocab - 1, 11), size=n).tolist()

    repeats = 2 if quick else 3
    prefill_lens = [8, 32, 128, 512] if quick else [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    prefill_lens = [n for n in prefill_lens if n < max_model_len - 64]
    decode_ctx = [32, 512] if quick else [32, 256, 1024, 2048]
    decode_ctx = [n for n in decode_ctx if n < max_model_len - 64]
    num_decode = 16 if quick else 32

    _timed_generate(llm, prompt(64), 4, 1)  # warm-up
    samples: list[tuple[int, int, float]] = []
    for n in prefill_lens:
        samples.append((n, 0, _timed_generate(llm, prompt(n), 1, repeats)))
    for k in decode_ctx:
        ids = prompt(k)
        t1 = _timed_generate(llm, ids, 1, repeats)
        tm = _timed_generate(llm, ids, 1 + num_decode, repeats)
        samples.append((1, k, max((tm - t1) / num_decode, 1e-6)))

    coef, mape = fit_relative(samples)
    device = device_kind()
    cost = StepCostModel(
        alpha_s=float(coef[0]),
        beta_s=float(coef[1]),
        gamma_s=float(coef[2]),
        source="calibrated",
        meta={
            "model": model,
            "device": device,
            "machine": platform.processor() or platform.machine(),
            "vllm_version": vllm.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "samples_q_k_seconds": samples,
            "fit_mape": mape,
        },
    )
    path = out or default_calibration_path(model, device)
    cost.save(path)
    print(
        f"calibration written to {path}: alpha={cost.alpha_s:.3e}s beta={cost.beta_s:.3e}s/token "
        f"gamma={cost.gamma_s:.3e}s/pair, relative fit error {mape:.1%}"
    )
    return cost


# ====================================================================== ESP
@dataclass(frozen=True)
class ESPGrid:
    """What ``--esp`` measures (LoongServe's identical-request grid, small)."""

    prefill_lengths: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    #: Largest batch (tokens): one engine step, so a sample is one batch.
    max_batch_tokens: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    num_decode_tokens: int
    repeats: int
    #: Bytes of the point-to-point probe (latency and bandwidth of migration).
    probe_bytes: tuple[int, ...] = (4096, 4 * 2**20, 32 * 2**20)
    #: Lone prompts longer than one step's budget, prefilled in budget-sized
    #: chunks: each chunk attends to the KV of the ones before it, so these
    #: rows reach ``sum_l2`` of the long prompts a trace holds (a quadratic
    #: term fitted on one-step prompts only is extrapolated to them).
    chunked_lengths: tuple[int, ...] = ()

    def prefill_points(self) -> list[tuple[int, int]]:
        """``(batch size, length)`` pairs within ``max_batch_tokens``."""
        return [
            (n, length)
            for length in self.prefill_lengths
            for n in self.prefill_batches
            if n * length <= self.max_batch_tokens
        ]

    def decode_points(self) -> list[tuple[int, int]]:
        return [(n, k) for k in self.decode_contexts for n in self.decode_batches]

    def kv_tokens(self, block_size: int) -> int:
        """KV tokens per instance: the largest batch, prefill or decode, or
        the longest chunked prompt (its KV kept on one instance at DoP 1),
        plus a margin."""
        decode = max(n * (k + self.num_decode_tokens + block_size) for n, k in self.decode_points())
        need = max(self.max_batch_tokens + len(self.prefill_batches) * block_size, decode)
        need = max(need, max(self.chunked_lengths, default=0) + block_size)
        return -(-(need + 4 * block_size) // block_size) * block_size


ESP_QUICK = ESPGrid(
    prefill_lengths=(64, 256, 1024, 2048),
    prefill_batches=(1, 2, 4),
    max_batch_tokens=2048,
    decode_batches=(1, 4, 8),
    decode_contexts=(128, 1024),
    num_decode_tokens=16,
    repeats=2,
    chunked_lengths=(4096, 6144),
)
ESP_FULL = ESPGrid(
    prefill_lengths=(32, 128, 512, 1024, 2048, 4096),
    prefill_batches=(1, 2, 4, 8),
    max_batch_tokens=4096,
    decode_batches=(1, 4, 8, 16),
    decode_contexts=(128, 512, 2048),
    num_decode_tokens=32,
    repeats=3,
    chunked_lengths=(8192, 12288),
)
#: vLLM-CPU attention needs a multiple of 32.
ESP_BLOCK_SIZE = 32
#: Every profiling engine is the ESP engine on this many instances: each row
#: is measured on the engine it models, its lockstep step included.
ESP_NUM_INSTANCES = 2
#: ESP's threshold placement at DoP 2 for every chunk: any estimate exceeds it.
FORCE_DOP_TARGET_MS = 1e-3
#: ... and at DoP 1 for every chunk: no estimate reaches it.
NEVER_SPREAD_TARGET_MS = 1e9


def kv_bytes_per_token(model_dir: str) -> int:
    """K and V bytes per token over all layers (2-byte elements: vLLM-CPU
    computes in bf16 for the presets; the engine's own figure is recorded too)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * 2


def esp_engine_kwargs(
    model_dir: str,
    prefill_dop: int,
    grid: ESPGrid,
    seed: int,
    prefill_storage: str = "fewest",
) -> dict:
    """``LLM(...)`` arguments: the ESP engine on :data:`ESP_NUM_INSTANCES`
    instances with every prefill chunk at ``prefill_dop`` (1 or 2; the
    threshold rules' DoP target forces it), ``prefill_storage``: ESP's, or
    ``stripe`` to spread every request's KV over the instances; the same KV
    cache per instance, prefix caching off."""
    from vllm_esp.integration.engine_args import scheduler_args

    if prefill_dop not in (1, ESP_NUM_INSTANCES):
        raise ValueError(f"prefill_dop must be 1 or {ESP_NUM_INSTANCES}, got {prefill_dop!r}")
    target_ms = FORCE_DOP_TARGET_MS if prefill_dop > 1 else NEVER_SPREAD_TARGET_MS
    esp = {
        "num_instances": ESP_NUM_INSTANCES,
        "placement": "threshold",
        "prefill_target_ms": target_ms,
        "prefill_storage": prefill_storage,
    }
    sched = scheduler_args("esp", esp=esp)
    sched["additional_config"]["mlfq"]["policy"] = "fcfs"  # one batch, no quanta
    kv_tokens = grid.kv_tokens(ESP_BLOCK_SIZE)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    # What the instances hold, within what the model's positions allow (vLLM refuses more).
    max_model_len = ESP_NUM_INSTANCES * kv_tokens - ESP_BLOCK_SIZE
    max_model_len = min(max_model_len, cfg.get("max_position_embeddings", max_model_len))
    return dict(
        model=model_dir,
        max_num_seqs=max(max(grid.prefill_batches), max(grid.decode_batches)),
        max_num_batched_tokens=grid.max_batch_tokens,
        max_model_len=max_model_len,
        block_size=ESP_BLOCK_SIZE,
        kv_cache_memory_bytes=kv_tokens * kv_bytes_per_token(model_dir),
        gpu_memory_utilization=0.3,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=seed,
        **sched,
    )


@dataclass(frozen=True)
class BatchTiming:
    """One batch through ``LLMEngine.step()`` (seconds from the batch's start)."""

    first_s: float  # every request has its first token
    total_s: float  # every request finished
    #: All first tokens came out of the same step(): the prefill was one batch.
    one_step: bool


#: Pacer prompt (tokens) and the pause after adding it: see :func:`_run_batch`.
PACER_TOKENS = 128
PACER_LEAD_S = 5e-3


def _run_batch(
    llm: Any, prompts: list[list[int]], max_tokens: int, pacer: list[int] | None = None
) -> BatchTiming:
    """Run ``prompts`` to completion through ``LLMEngine.step()``.

    The EngineCore runs in its own process and starts a step as soon as the
    first request reaches it, so a batch added request by request would be
    split over two steps. With ``pacer`` (a short prompt, one output token)
    the pacer is added first and the batch ``PACER_LEAD_S`` later, while the
    pacer's step runs: the batch waits in the core's queue and is scheduled
    whole in the next step, and its time starts when the pacer finishes.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine

    def params(n: int) -> Any:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)

    tag = f"cal-{time.perf_counter():.6f}"
    start = time.perf_counter()
    if pacer is not None:
        engine.add_request(f"{tag}-pacer", TokensPrompt(prompt_token_ids=pacer), params(1))
        time.sleep(PACER_LEAD_S)
    pending = set()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=ids), params(max_tokens))
        pending.add(f"{tag}-{i}")
    first_step: dict[str, int] = {}
    first = math.nan
    num_steps = pacer_step = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        num_steps += 1
        now = time.perf_counter()
        for out in outputs:
            if out.request_id == f"{tag}-pacer" and out.finished:
                start = now  # the batch's step starts about now
                pacer_step = num_steps
            elif out.outputs and out.outputs[0].token_ids:
                first_step.setdefault(out.request_id, num_steps)
        if math.isnan(first) and first_step.keys() >= pending:
            first = now - start
    steps = {first_step[r] for r in pending}
    one_step = len(steps) == 1 and min(steps) > pacer_step
    return BatchTiming(first, time.perf_counter() - start, one_step)


def busiest_share(num_requests: int, prefill_dop: int) -> int:
    """Requests of a batch of identical ones on the busiest instance when
    each request's prefill runs at ``prefill_dop`` and its KV stays on one
    instance: at DoP 1 the fewest-free-first placement alternates them over
    the instances; spread over all of them, each instance holds a part of
    every request."""
    if prefill_dop > 1:
        return num_requests
    return -(-num_requests // ESP_NUM_INSTANCES)


def _measure_prefill(
    llm: Any, grid: ESPGrid, prompt: Callable[[int], list[int]], prefill_dop: int
) -> list[dict]:
    """Prefill batches of identical requests; a row is the busiest instance's
    share (:func:`busiest_share`), the one the lockstep step waits for."""
    rows = []
    for n, length in grid.prefill_points():
        times, one_step = [], []
        for _ in range(grid.repeats):
            batch = [prompt(length) for _ in range(n)]
            timing = _run_batch(llm, batch, 1, pacer=prompt(PACER_TOKENS))
            times.append(timing.first_s)
            one_step.append(timing.one_step)
        here = busiest_share(n, prefill_dop)
        rows.append(
            {
                "batch": n,
                "length": length,
                "num_requests_here": here,
                "sum_l": here * length,
                "sum_l2": here * length * length,
                "seconds": statistics.median(times),
                "seconds_all": times,
                "one_step": one_step,
            }
        )
        print(
            f"  prefill {n} x {length} at DoP {prefill_dop}: "
            f"{statistics.median(times) * 1e3:.1f} ms",
            flush=True,
        )
    rows.extend(_measure_chunked_prefill(llm, grid, prompt, prefill_dop))
    return rows


def chunked_row(length: int, max_batch_tokens: int, seconds: list[float]) -> dict:
    """The row of a lone prompt prefilled in budget-sized chunks. Its
    chunks' terms sum to the whole prompt's (``chunk_terms``)::

        sum over chunks of q * q + 2 * q * k  =  length * length

    (``q`` new tokens after ``k`` cached ones), so the row is a one-step
    row of the same length but with ``A`` paid once per chunk; the fit
    counts it once, an error of ``(num_chunks - 1) * A`` (under 1% of these
    rows on CPU)."""
    return {
        "batch": 1,
        "length": length,
        "num_chunks": -(-length // max_batch_tokens),
        "num_requests_here": 1,
        "sum_l": length,
        "sum_l2": length * length,
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "one_step": [False] * len(seconds),
    }


def _measure_chunked_prefill(
    llm: Any, grid: ESPGrid, prompt: Callable[[int], list[int]], prefill_dop: int
) -> list[dict]:
    """Time to the first token of lone prompts longer than one step's
    budget (:func:`chunked_row`)."""
    rows = []
    for length in grid.chunked_lengths:
        times = [
            _run_batch(llm, [prompt(length)], 1, pacer=prompt(PACER_TOKENS)).first_s
            for _ in range(grid.repeats)
        ]
        rows.append(chunked_row(length, grid.max_batch_tokens, times))
        print(
            f"  prefill 1 x {length} in chunks of {grid.max_batch_tokens} at DoP "
            f"{prefill_dop}: {statistics.median(times) * 1e3:.1f} ms",
            flush=True,
        )
    return rows


def _measure_decode(
    llm: Any, grid: ESPGrid, prompt: Callable[[int], list[int]], *, striped: bool
) -> list[dict]:
    """Decode steps of ``n`` identical requests after a ``k``-token prompt.

    Each row is the busiest instance's share, the one the lockstep step
    waits for. Local KV (prefilled at DoP 1): the instances alternate
    requests (:func:`busiest_share`). Striped KV: identical prompts end on
    the same instance, which masters all ``n`` requests and holds ``k /
    ESP_NUM_INSTANCES`` of each prompt plus the new tokens, and every
    request exchanges with the other instances (``num_remote = n``, the
    simulator's count, ``BatchRun``).
    """
    m = grid.num_decode_tokens
    parts = ESP_NUM_INSTANCES if striped else 1
    rows = []
    for n, k in grid.decode_points():
        times = []
        for _ in range(grid.repeats):
            timing = _run_batch(llm, [prompt(k) for _ in range(n)], 1 + m)
            times.append(max((timing.total_s - timing.first_s) / m, 1e-6))
        here = n if striped else busiest_share(n, 1)
        # Mean KV tokens read per step over the m steps.
        kv = here * (k // parts + (m + 1) // 2)
        rows.append(
            {
                "batch": n,
                "context": k,
                "num_kv_instances": parts,
                "num_master": here,
                "num_kv_tokens": kv,
                "num_remote": here if striped else 0,
                # Every request is striped, or none is.
                "num_striped_kv_tokens": kv if striped else 0,
                "seconds": statistics.median(times),
                "seconds_all": times,
            }
        )
        print(
            f"  decode {n} x ctx {k} {'striped' if striped else 'local'}: "
            f"{statistics.median(times) * 1e3:.2f} ms/step",
            flush=True,
        )
    return rows


def _p2p_probe(group: Any, sizes: Sequence[int], repeats: int) -> dict[int, float]:
    """Instance 0 sends ``size`` bytes to instance 1 (the path a migration
    takes between ESP instances); median seconds per size, on instance 1."""
    import torch

    out = {}
    for size in sizes:
        buf = torch.zeros(size, dtype=torch.uint8)
        times = []
        for _ in range(repeats):
            group.barrier()
            start = time.perf_counter()
            if group.instance_id == 0:
                group.exchange([(1, buf)], []).wait()
            elif group.instance_id == 1:
                group.exchange([], [(0, buf)]).wait()
            times.append(time.perf_counter() - start)
        out[size] = statistics.median(times)
    return out


def measure_link(grid: ESPGrid) -> dict[str, Any]:
    """Latency and bandwidth between two ESP instance processes (gloo, as the
    CPU engine's migrations and ring hops)."""
    from vllm_esp.kernels.esp.group import InstanceCluster

    with InstanceCluster(2) as cluster:
        times = cluster.run(_p2p_probe, grid.probe_bytes, 5)[1]
    small, big = min(times), max(times)
    bandwidth = (big - small) / max(times[big] - times[small], 1e-9)
    return {
        "probe_seconds_by_bytes": {str(k): v for k, v in times.items()},
        "latency_s": times[small],
        "bandwidth_bytes_per_s": bandwidth,
        "how": "gloo send/recv between two InstanceCluster processes; latency = the "
        f"{small}-byte message, bandwidth = extra bytes / extra time up to {big} bytes",
    }


def _profile_engine(
    model_dir: str,
    prefill_dop: int,
    grid: ESPGrid,
    seed: int,
    *,
    prefill: bool,
    decode: bool,
    prefill_storage: str = "fewest",
) -> dict[str, Any]:
    """Start one engine, warm it up, measure, shut it down."""
    from vllm import LLM

    rng = np.random.default_rng(seed + prefill_dop)
    vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size", 1000)

    def prompt(n: int) -> list[int]:
        # Fresh random tokens per request: nothing is shared or cached.
        return rng.integers(10, vocab - 1, size=n).tolist()

    kwargs = esp_engine_kwargs(model_dir, prefill_dop, grid, seed, prefill_storage)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        info: dict[str, Any] = {
            "num_instances": ESP_NUM_INSTANCES,
            "prefill_dop": prefill_dop,
            "prefill_storage": prefill_storage,
            "engine_start_s": time.perf_counter() - t0,
            "num_kv_blocks": cache.num_gpu_blocks,
            "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
        }
        _run_batch(llm, [prompt(64)], 4)  # warm-up: first-call allocations
        _run_batch(llm, [prompt(grid.max_batch_tokens // 2) for _ in range(2)], 2, prompt(64))
        load = os.getloadavg()[0]
        print(f"[prefill DoP {prefill_dop}, {prefill_storage} storage] measuring", flush=True)
        if prefill:
            info["prefill"] = _measure_prefill(llm, grid, prompt, prefill_dop)
        if decode:
            info["decode"] = _measure_decode(llm, grid, prompt, striped=prefill_storage == "stripe")
        info["loadavg_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:
            print(f"warning: engine shutdown: {exc!r}", file=sys.stderr)
        del llm
        gc.collect()
    return info


def fit_esp_cost(
    prefill_by_dop: dict[int, list[dict]],
    decode_rows: list[dict],
    link: dict[str, Any],
    bytes_per_token: int,
    exchange_bytes_per_request: int,
    meta: dict[str, Any],
) -> ESPCostModel:
    """Fit the measured samples into an :class:`ESPCostModel` (``source: measured``).

    ``e`` (per remote exchange) is fitted from the decode rows whose KV is
    spread; when none determines it, it is the link's transfer time of one
    request's query and partial over all layers.
    """
    prefill = {
        dop: fit_prefill([PrefillSample(r["sum_l"], r["sum_l2"], r["seconds"]) for r in rows])
        for dop, rows in prefill_by_dop.items()
    }
    samples = [
        DecodeSample(
            r["num_master"],
            r["num_kv_tokens"],
            r["num_remote"],
            r["seconds"],
            # Rows written before the striped term: all of a striped row's KV is.
            r.get("num_striped_kv_tokens", r["num_kv_tokens"] if r["num_remote"] else 0),
        )
        for r in decode_rows
    ]
    dfit = fit_decode_detailed(samples)
    a, b, c, e, f, g = dfit.coeffs
    e_source = "fitted"
    if 3 in dfit.unidentified:
        e = exchange_bytes_per_request / link["bandwidth_bytes_per_s"]
        e_source = "link: exchange bytes per request / measured bandwidth"
    decode = DecodeCoeffs(a_s=a, b_s=b, c_s=c, e_s=e, f_s=f, g_s=g, mean_rel_err=dfit.mean_rel_err)
    migration = MigrationCoeffs(
        latency_s=link["latency_s"],
        bytes_per_token=float(bytes_per_token),
        bandwidth_bytes_per_s=link["bandwidth_bytes_per_s"],
    )
    meta = {
        **meta,
        "fit": {
            "method": "least squares on relative error, rows weighted t**0.1 (prefill) / "
            "t**0.5 (decode), non-negative (vllm_esp.core.esp.cost_fit)",
            "mean_rel_err": {
                **{f"prefill_dop{d}": row.mean_rel_err for d, row in prefill.items()},
                "decode": dfit.mean_rel_err,
            },
            "decode_e_source": e_source,
            "ring_hop_s": "growth of A per instance from DoP 1 to the largest measured DoP",
            "tp_efficiency": "not measured (cost-model default)",
        },
    }
    return ESPCostModel(
        prefill=prefill,
        decode=decode,
        migration=migration,
        ring_hop_s=ring_hop_from_rows(prefill),
        source="measured",
        meta=meta,
    )


def profile_esp(model: str, out: Path, quick: bool, seed: int = 0) -> ESPCostModel:
    """Measure this machine's ESP engine and write the fitted cost model to ``out``."""
    import vllm

    from vllm_esp.integration.cost_model import device_kind
    from vllm_esp.models import PRESETS, build_model

    started = time.perf_counter()
    # vLLM-CPU overwrites kv_cache_memory_bytes with this legacy variable.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    model_dir = str(build_model(model)) if model in PRESETS else model
    grid = ESP_QUICK if quick else ESP_FULL
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    # Query (2 B) out, partial output (4 B) and LSE back, every layer.
    exchange = cfg["num_hidden_layers"] * (heads * head_dim * 2 + heads * head_dim * 4 + heads * 4)
    print(f"ESP profile of {model_dir} ({'quick' if quick else 'full'} grid)", flush=True)
    link = measure_link(grid)
    dop1 = _profile_engine(model_dir, 1, grid, seed, prefill=True, decode=True)
    dop2 = _profile_engine(model_dir, 2, grid, seed, prefill=True, decode=False)
    spread = _profile_engine(
        model_dir, 2, grid, seed, prefill=False, decode=True, prefill_storage="stripe"
    )
    kv_tokens = grid.kv_tokens(ESP_BLOCK_SIZE)
    meta = {
        "model": model,
        "model_dir": model_dir,
        "device": device_kind(),
        "machine": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "vllm_version": vllm.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": quick,
        "grid": asdict(grid),
        "capacity_tokens": kv_tokens,
        "kv_bytes_per_token": kv_bytes_per_token(model_dir),
        "exchange_bytes_per_remote_request": exchange,
        "link": link,
        "engines": {"dop1": dop1, "dop2": dop2, "dop2_striped_decode": spread},
        "notes": [
            f"Every engine: --scheduler esp with {ESP_NUM_INSTANCES} instances, threshold "
            f"placement, fcfs ranking; prefill_target_ms {NEVER_SPREAD_TARGET_MS} (every "
            f"chunk at DoP 1) or {FORCE_DOP_TARGET_MS} (every chunk at DoP 2); the same KV "
            "cache per instance, prefix caching off, fresh random prompts.",
            "Prefill sample = wall time of one batch of identical-length requests "
            "(max_tokens 1) through LLMEngine.step(), timed from the end of a pacer "
            "request's step (the batch queued behind it runs as one step; one_step "
            "checks it); decode sample = time after every "
            "request's first token to the end, per step: with local KV (prefilled at DoP 1), "
            "and with every prompt's KV striped over the instances (prefill_storage stripe, "
            "every request remote). Each row is the busiest instance's share: at DoP 1 the "
            "instances take identical requests in turn.",
            "On CPU each instance is one core; the cores are shared with other work "
            "(loadavg in each engine's entry).",
        ],
    }
    cost = fit_esp_cost(
        {1: dop1["prefill"], 2: dop2["prefill"]},
        dop1["decode"] + spread["decode"],
        link,
        kv_bytes_per_token(model_dir),
        exchange,
        meta,
    )
    cost.meta["wall_time_s"] = time.perf_counter() - started
    cost.save(out)
    errs = cost.meta["fit"]["mean_rel_err"]
    print(
        f"ESP cost model written to {out}: "
        + ", ".join(f"{k} {v:.1%}" for k, v in errs.items())
        + f" mean relative error; {cost.meta['wall_time_s']:.0f}s",
        flush=True,
    )
    return cost


def refit_esp(src: Path, out: Path) -> ESPCostModel:
    """Fit the samples stored in the ``--esp`` profile ``src`` again, into ``out``."""
    meta = dict(ESPCostModel.load(src).meta)
    try:
        engines = meta["engines"]
        decode = engines["dop1"]["decode"] + engines.get("dop2_striped_decode", {}).get(
            "decode", []
        )
        prefill = {1: engines["dop1"]["prefill"], 2: engines["dop2"]["prefill"]}
        link = meta["link"]
        bytes_per_token = meta["kv_bytes_per_token"]
        exchange = meta["exchange_bytes_per_remote_request"]
    except KeyError as e:
        raise ValueError(f"{src} holds no --esp profile's samples (missing {e})") from e
    meta.pop("fit", None)
    meta["refit"] = {"of": str(src), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    cost = fit_esp_cost(prefill, decode, link, bytes_per_token, exchange, meta)
    cost.save(out)
    errs = cost.meta["fit"]["mean_rel_err"]
    print(
        f"ESP cost model refitted from {src} to {out}: "
        + ", ".join(f"{k} {v:.1%}" for k, v in errs.items())
        + " mean relative error",
        flush=True,
    )
    return cost


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model folder (required without --esp); with --esp also a vllm_esp.models preset "
        "(default: 'default')",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--esp",
        type=Path,
        default=None,
        metavar="OUT.json",
        help="profile the ESP cluster cost model and write it here",
    )
    parser.add_argument(
        "--refit",
        type=Path,
        default=None,
        metavar="PROFILE.json",
        help="with --esp: fit this earlier profile's stored samples again (measures nothing)",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=DEFAULT_KV_CACHE_BYTES,
        help="KV cache of the profiling engine (default: 256 MiB; --esp sizes its own)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--esp: prompt tokens' seed")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.refit is not None:
        if args.esp is None:
            parser.error("--refit needs --esp OUT.json")
        refit_esp(args.refit, args.esp)
        return
    if args.esp is not None:
        profile_esp(args.model or "default", args.esp, args.quick, args.seed)
        return
    if args.model is None:
        parser.error("--model is required (unless --esp)")
    profile(args.model, args.out, args.quick, args.max_model_len, args.kv_cache_memory_bytes)


if __name__ == "__main__":
    main()
