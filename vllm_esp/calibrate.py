"""Calibrate the step cost model on this machine.

    python -m vllm_esp.calibrate --model DIR [--out FILE] [--quick]

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
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from vllm_esp.core.costmodel import StepCostModel, default_calibration_path


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=DEFAULT_KV_CACHE_BYTES,
        help="KV cache of the profiling engine (default: 256 MiB)",
    )
    args = parser.parse_args()
    profile(args.model, args.out, args.quick, args.max_model_len, args.kv_cache_memory_bytes)


if __name__ == "__main__":
    main()
