"""Token sampling on the instance that computed a request's last token.

Greedy when ``temperature == 0`` (bit-for-bit vLLM's argmax); otherwise
temperature, top-k, top-p and min-p filtering and a draw. A seeded request
draws from a generator seeded with ``seed + num_output_tokens``, so the
token does not depend on which instance samples it.
"""

from __future__ import annotations

import torch

from vllm_esp.core.esp.step_plan import SamplingSpec

_GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy


def sample_one(logits: torch.Tensor, spec: SamplingSpec, num_output_tokens: int) -> int:
    """One token id from ``logits [vocab]``."""
    logits = logits.float()
    if spec.temperature < _GREEDY_EPS:
        return int(torch.argmax(logits))
    logits = logits / spec.temperature
    if spec.top_k and 0 < spec.top_k < logits.shape[0]:
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.min_p > 0:
        probs = probs.masked_fill(probs < spec.min_p * probs.max(), 0.0)
    if spec.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > spec.top_p  # keep the first token past top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    generator = None
    if spec.seed is not None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(spec.seed + num_output_tokens)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
