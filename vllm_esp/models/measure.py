"""Measure vLLM start-up and per-step cost of a built preset.

Usage::

    python -m vllm_esp.models.measure --preset default [--batch 16] [--output-len 64]

Starts an offline ``vllm.LLM`` (eager mode), then for each batch size
submits that many ShareGPT prompts at once (``max_tokens=output_len``,
``ignore_eos``) and times every ``LLMEngine.step()``. The last
``output_len - 1`` steps are decode steps of the whole batch; their median
(and 10th percentile, the least perturbed value on a shared machine) is the
per-step cost. Also reports start-up time and the load average. Prints one
JSON object. Starts a real engine: tens of seconds, not for unit tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from typing import Any


def _prompts(tokenizer: Any, n: int, prompt_len: int) -> list[list[int]]:
    from vllm_esp.data.sharegpt import load_sharegpt_pairs

    out: list[list[int]] = []
    for prompt, _ in load_sharegpt_pairs():
        ids = tokenizer.encode(prompt)
        if len(ids) >= prompt_len:
            out.append(ids[:prompt_len])
            if len(out) == n:
                return out
    raise RuntimeError(f"not enough ShareGPT prompts of {prompt_len} tokens")


def measure(
    model: str,
    batches: list[int],
    prompt_len: int,
    output_len: int,
    max_model_len: int,
    repeats: int,
    dtype: str,
) -> dict[str, Any]:
    """Start an engine on ``model`` and time prefill/decode per batch size."""
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        model=model,
        max_model_len=max_model_len,
        max_num_seqs=max(batches),
        enforce_eager=True,
        dtype=dtype,  # validated by vLLM
        seed=0,
    )
    startup_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    all_prompts = _prompts(tok, max(batches), prompt_len)
    engine = llm.llm_engine
    batch_ids = itertools.count()

    def run(
        prompts: list[list[int]], sp: SamplingParams
    ) -> tuple[list[float], list[tuple[int, ...]]]:
        """Submit all prompts at once and time every engine step."""
        tag = next(batch_ids)
        for i, p in enumerate(prompts):
            engine.add_request(f"m{tag}-{i:04d}", TokensPrompt(prompt_token_ids=p), sp)
        step_s: list[float] = []
        outs: dict[str, tuple[int, ...]] = {}
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            for o in engine.step():
                if isinstance(o, RequestOutput) and o.finished:
                    outs[o.request_id] = tuple(o.outputs[0].token_ids)
            step_s.append(time.perf_counter() - t)
        return step_s, [outs[k] for k in sorted(outs)]

    greedy = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    run(all_prompts[:2], greedy)  # warm-up: first-call allocations
    results: dict[str, Any] = {}
    for b in batches:
        decode: list[float] = []
        prefill: list[float] = []
        walls: list[float] = []
        outs: list[tuple[int, ...]] = []
        for _ in range(repeats):
            steps, outs = run(all_prompts[:b], greedy)
            walls.append(sum(steps))
            # The first steps prefill (the whole batch fits one step's token
            # budget here); once every request has its first token, each
            # step is one decode step of the full batch. Interval timing on
            # the front end equals the core's step time in steady state.
            decode.extend(steps[-(output_len - 1) :])
            prefill.append(sum(steps[: -(output_len - 1)]))
        decode.sort()
        results[str(b)] = {
            "decode_ms_per_step_median": round(1e3 * statistics.median(decode), 3),
            "decode_ms_per_step_p10": round(1e3 * decode[len(decode) // 10], 3),
            "decode_tok_per_s": round(b / statistics.median(decode), 1),
            "prefill_s_median": round(statistics.median(prefill), 4),
            "wall_s_median": round(statistics.median(walls), 3),
            "distinct_outputs": len(set(outs)),
            "mean_distinct_tokens_per_output": round(statistics.mean(len(set(t)) for t in outs), 1),
        }
    return {
        "model": model,
        "loadavg_1min_end": os.getloadavg()[0],
        "startup_s": round(startup_s, 2),
        "prompt_len": prompt_len,
        "output_len": output_len,
        "batches": results,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from vllm_esp.models.presets import PRESETS
    from vllm_esp.models.tiny import build_model

    ap = argparse.ArgumentParser(prog="python -m vllm_esp.models.measure")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--model", default=None, help="model folder (overrides --preset)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    # Bound the KV cache: vLLM-CPU otherwise sizes it from free RAM, and the
    # machine is shared.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = args.model or str(build_model(args.preset, args.cache_dir))
    res = measure(
        model,
        args.batch,
        args.prompt_len,
        args.output_len,
        args.max_model_len,
        args.repeats,
        args.dtype,
    )
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
