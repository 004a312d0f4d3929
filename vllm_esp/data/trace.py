"""Seeded request traces: ShareGPT-derived and synthetic long-context ones.

A trace is a list of :class:`TraceRequest` sorted by arrival time. Every
generator takes a ``seed`` and draws from numpy ``Generator`` streams derived
from it, so the same arguments (and the same tokenizer) always give the same
trace.

Length rule of :func:`make_sharegpt_trace` (per ShareGPT conversation, first
human -> gpt exchange, conversations visited in a seeded random order):

1. ``p_raw`` = tokens of the human message *with* the tokenizer's special
   tokens (BOS for our models, as vLLM would tokenize a text prompt);
   ``o_raw`` = tokens of the gpt reply *without* special tokens.
2. Conversations with ``p_raw < min_prompt_len`` or ``o_raw < min_output_len``
   are skipped (vLLM's own ShareGPT benchmark drops these too: a 1-token
   "reply" is not a request).
3. ``p = clamp(round(scale * p_raw), 1, max_prompt_len)`` and
   ``o = clamp(round(scale * o_raw), 1, max_output_len)``, with
   ``0 < scale <= 1`` (round half to even, Python's ``round``).
4. If ``p + o > max_model_len`` the output is cut: ``o = max_model_len - p``
   (``max_prompt_len < max_model_len`` is required, so ``o >= 1``).
5. The prompt is the first ``p`` tokens of the human message's encoding
   (BOS included), i.e. real ShareGPT text, so prefix caching sees realistic
   content; ``prompt_text`` is their decoding without special tokens.

Arrivals form a Poisson process: inter-arrival gaps are i.i.d.
``Exponential(mean = 1 / rate_rps)`` and request ``i`` arrives at the sum of
the first ``i + 1`` gaps. ``rate_rps = inf`` puts every request at t = 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vllm_esp.data.sharegpt import iter_training_text, load_sharegpt_pairs

__all__ = [
    "LONG_CONTEXT_PROFILES",
    "LongContextProfile",
    "TokenizerLike",
    "TraceRequest",
    "load_trace",
    "load_trace_meta",
    "make_heavy_tail_trace",
    "make_long_prompt_trace",
    "make_mixed_trace",
    "make_sharegpt_trace",
    "make_synthetic_long_trace",
    "poisson_arrivals",
    "save_trace",
]

_META_KEY = "__trace_meta__"


class TokenizerLike(Protocol):
    """The subset of the Hugging Face tokenizer API the generators use."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace.

    Attributes:
        request_id: unique within the trace.
        arrival_s: arrival time in seconds from the trace start.
        prompt_len: prompt length in tokens of the trace's tokenizer.
        output_len: number of tokens to generate (use with ``ignore_eos``).
        prompt_token_ids: the exact prompt tokens (``prompt_len`` of them),
            to submit as a token prompt; ``None`` for text-only traces.
        prompt_text: the prompt as text (decoding of ``prompt_token_ids``
            without special tokens), for text/chat endpoints; re-tokenizing
            it may differ from ``prompt_len`` by a token or so at the cut.
        source: where the lengths come from: ``"sharegpt"`` or
            ``"synthetic-<profile>"``; synthetic traces are labelled as such.
    """

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None
    source: str = "sharegpt"

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"{self.request_id}: prompt_len and output_len must be >= 1")
        if not (self.arrival_s >= 0.0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"{self.request_id}: arrival_s must be finite and >= 0")
        if self.prompt_token_ids is None and self.prompt_text is None:
            raise ValueError(f"{self.request_id}: needs prompt_token_ids or prompt_text")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"{self.request_id}: len(prompt_token_ids) != prompt_len")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (token ids as a list)."""
        d = asdict(self)
        if self.prompt_token_ids is not None:
            d["prompt_token_ids"] = list(self.prompt_token_ids)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TraceRequest:
        """Inverse of :meth:`to_json`."""
        ids = d.get("prompt_token_ids")
        return cls(
            request_id=str(d["request_id"]),
            arrival_s=float(d["arrival_s"]),
            prompt_len=int(d["prompt_len"]),
            output_len=int(d["output_len"]),
            prompt_token_ids=tuple(int(t) for t in ids) if ids is not None else None,
            prompt_text=d.get("prompt_text"),
            source=str(d.get("source", "sharegpt")),
        )


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    # Independent child streams: e.g. the arrival process does not shift
    # when the length sampling consumes a different number of draws.
    return [np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(n)]


def poisson_arrivals(num_requests: int, rate_rps: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of a Poisson process of rate ``rate_rps``: cumulative
    sums of i.i.d. exponential gaps of mean ``1 / rate_rps``. ``inf`` gives
    all zeros (a burst)."""
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if not rate_rps > 0:
        raise ValueError("rate_rps must be > 0 (or math.inf for a burst)")
    if math.isinf(rate_rps):
        return np.zeros(num_requests)
    return np.cumsum(rng.exponential(1.0 / rate_rps, size=num_requests))


def make_sharegpt_trace(
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    max_prompt_len: int = 1024,
    max_output_len: int = 1024,
    max_model_len: int = 2048,
    scale: float = 1.0,
    min_prompt_len: int = 4,
    min_output_len: int = 4,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[TraceRequest]:
    """A Poisson-arrival trace whose prompts and output lengths come from
    real ShareGPT conversations, tokenized by ``tokenizer``.

    See the module docstring for the exact length rule.

    Args:
        tokenizer: HF-style tokenizer of the served model.
        num_requests: trace length.
        rate_rps: mean arrival rate (requests/s); ``math.inf`` = burst.
        seed: seeds the conversation order and the arrival process.
        max_prompt_len: prompt clip, must be < ``max_model_len``.
        max_output_len: output clip.
        max_model_len: the engine's context limit; ``p + o`` never exceeds it.
        scale: in ``(0, 1]``; multiplies both raw lengths before clipping
            (< 1 shrinks ShareGPT's lengths for a small machine).
        min_prompt_len: skip conversations with fewer raw prompt tokens.
        min_output_len: skip conversations with fewer raw reply tokens.
        pairs: ``(prompt, completion)`` pairs to draw from; default
            :func:`~vllm_esp.data.sharegpt.load_sharegpt_pairs`.

    Raises:
        ValueError: on inconsistent limits, or if too few conversations
            pass the filters.
    """
    if not 1 <= max_prompt_len < max_model_len:
        raise ValueError("need 1 <= max_prompt_len < max_model_len")
    if max_output_len < 1:
        raise ValueError("need max_output_len >= 1")
    if not 0 < scale <= 1:
        # A scaled-up prompt would need text the conversation does not have.
        raise ValueError("need 0 < scale <= 1")
    source = list(pairs) if pairs is not None else load_sharegpt_pairs()
    order_rng, arrival_rng = _streams(seed, 2)
    arrivals = poisson_arrivals(num_requests, rate_rps, arrival_rng)
    order = order_rng.permutation(len(source))

    out: list[TraceRequest] = []
    for idx in order:
        if len(out) == num_requests:
            break
        prompt, completion = source[int(idx)]
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
        o_raw = len(tokenizer.encode(completion, add_special_tokens=False))
        if len(prompt_ids) < min_prompt_len or o_raw < min_output_len:
            continue
        p = min(max(round(scale * len(prompt_ids)), 1), max_prompt_len)
        o = min(max(round(scale * o_raw), 1), max_output_len)
        o = min(o, max_model_len - p)
        ids = tuple(prompt_ids[:p])
        i = len(out)
        out.append(
            TraceRequest(
                request_id=f"sharegpt-{i:06d}",
                arrival_s=float(arrivals[i]),
                prompt_len=p,
                output_len=o,
                prompt_token_ids=ids,
                prompt_text=tokenizer.decode(ids, skip_special_tokens=True),
                source="sharegpt",
            )
        )
    if len(out) < num_requests:
        raise ValueError(
            f"only {len(out)} conversations pass the filters; asked for {num_requests}"
        )
    return out


def make_mixed_trace(
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    long_fraction: float = 0.1,
    short_output_range: tuple[int, int] = (8, 48),
    long_output_len: int = 400,
    prompt_words_range: tuple[int, int] = (20, 200),
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[TraceRequest]:
    """Short requests mixed with long ones: where short requests wait behind
    long ones under FCFS. SYNTHETIC output lengths, real ShareGPT prompts.

    Every request's prompt is the first ``prompt_words_range`` words (uniform)
    of a ShareGPT prompt; a fraction ``long_fraction`` of the requests are
    *long* (``long_output_len`` output tokens), the others *short* (output
    uniform in ``short_output_range``, inclusive). ``source`` is
    ``"synthetic-mixed-short"`` or ``"synthetic-mixed-long"``.
    """
    if not 0 <= long_fraction <= 1:
        raise ValueError("need 0 <= long_fraction <= 1")
    lo, hi = short_output_range
    if not 1 <= lo <= hi or long_output_len < 1:
        raise ValueError("output lengths must be >= 1 and the short range ordered")
    source = list(pairs) if pairs is not None else load_sharegpt_pairs()
    order_rng, arrival_rng, length_rng = _streams(seed, 3)
    arrivals = poisson_arrivals(num_requests, rate_rps, arrival_rng)
    order = order_rng.permutation(len(source))
    out: list[TraceRequest] = []
    for idx in order:
        if len(out) == num_requests:
            break
        words = source[int(idx)][0].split()
        num_words = int(length_rng.integers(prompt_words_range[0], prompt_words_range[1] + 1))
        if len(words) < num_words:
            continue
        ids = tuple(tokenizer.encode(" ".join(words[:num_words]), add_special_tokens=True))
        is_long = bool(length_rng.random() < long_fraction)
        output_len = long_output_len if is_long else int(length_rng.integers(lo, hi + 1))
        i = len(out)
        out.append(
            TraceRequest(
                request_id=f"mixed-{i:06d}",
                arrival_s=float(arrivals[i]),
                prompt_len=len(ids),
                output_len=output_len,
                prompt_token_ids=ids,
                prompt_text=tokenizer.decode(ids, skip_special_tokens=True),
                source="synthetic-mixed-long" if is_long else "synthetic-mixed-short",
            )
        )
    if len(out) < num_requests:
        raise ValueError(f"only {len(out)} prompts are long enough; asked for {num_requests}")
    return out


def make_heavy_tail_trace(
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    pareto_shape: float = 1.1,
    min_output_len: int = 16,
    max_output_len: int = 1024,
    max_prompt_len: int = 1024,
    max_model_len: int = 2048,
    scale: float = 0.5,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[TraceRequest]:
    """ShareGPT prompts with heavy-tailed output lengths: most replies are
    short, a few are very long (a decreasing hazard rate, where serving the
    least-attended request first pays). SYNTHETIC output lengths, real
    ShareGPT prompts and arrivals as :func:`make_sharegpt_trace` with the same
    arguments.

    Output lengths are Pareto: ``o = round(min_output_len * X)`` with ``X``
    classical Pareto of shape ``pareto_shape`` and minimum 1 (``P(X > x) =
    x ** -pareto_shape``), clipped to ``[min_output_len, min(max_output_len,
    max_model_len - prompt_len)]``. ``source`` is ``"synthetic-heavy-tail"``.
    """
    if pareto_shape <= 0 or not 1 <= min_output_len <= max_output_len:
        raise ValueError("need pareto_shape > 0 and 1 <= min_output_len <= max_output_len")
    base = make_sharegpt_trace(
        tokenizer,
        num_requests,
        rate_rps,
        seed,
        max_prompt_len=max_prompt_len,
        max_output_len=max_output_len,
        max_model_len=max_model_len,
        scale=scale,
        pairs=pairs,
    )
    # Stream 2: streams 0 and 1 are the conversation order and the arrivals.
    length_rng = _streams(seed, 3)[2]
    draws = min_output_len * (length_rng.pareto(pareto_shape, size=len(base)) + 1.0)
    out = []
    for i, (req, x) in enumerate(zip(base, draws)):
        cap = min(max_output_len, max_model_len - req.prompt_len)
        output_len = max(1, min(max(round(float(x)), min_output_len), cap))
        out.append(
            replace(
                req,
                request_id=f"heavytail-{i:06d}",
                output_len=output_len,
                source="synthetic-heavy-tail",
            )
        )
    return out


def make_long_prompt_trace(
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    long_fraction: float = 0.2,
    long_prompt_range: tuple[int, int] = (1000, 1800),
    short_prompt_words_range: tuple[int, int] = (10, 100),
    max_short_prompt_len: int = 256,
    output_range: tuple[int, int] = (16, 96),
    max_model_len: int = 2048,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[TraceRequest]:
    """Long prompts among short ones: where a request's prefill, not its
    output, is what others wait behind (skip-join's case). SYNTHETIC lengths.

    Exactly ``round(long_fraction * num_requests)`` requests, at seeded
    random positions, are *long* (a fixed count keeps both classes populated
    in short traces): a prompt of ``long_prompt_range`` tokens (uniform,
    inclusive; BOS plus a slice of real ShareGPT text at a seeded offset). The
    others are *short*: the first ``short_prompt_words_range`` words (uniform)
    of a ShareGPT prompt, as in :func:`make_mixed_trace`, cut to
    ``max_short_prompt_len`` tokens. Both classes draw their output length uniformly
    from ``output_range`` (inclusive), so they differ only by prompt.
    ``source`` is ``"synthetic-long-prompts-long"`` or
    ``"synthetic-long-prompts-short"``; arrivals are Poisson of rate
    ``rate_rps`` (``math.inf``: a burst).
    """
    p_lo, p_hi = long_prompt_range
    o_lo, o_hi = output_range
    if not 0 <= long_fraction <= 1:
        raise ValueError("need 0 <= long_fraction <= 1")
    if not 1 <= p_lo <= p_hi or not 1 <= o_lo <= o_hi:
        raise ValueError("prompt and output ranges must be ordered and >= 1")
    if not 1 <= max_short_prompt_len < p_lo:
        raise ValueError("need 1 <= max_short_prompt_len < the shortest long prompt")
    if p_hi + o_hi > max_model_len:
        raise ValueError("the longest prompt plus the longest output exceeds max_model_len")
    source = list(pairs) if pairs is not None else load_sharegpt_pairs()
    order_rng, arrival_rng, length_rng, offset_rng = _streams(seed, 4)
    arrivals = poisson_arrivals(num_requests, rate_rps, arrival_rng)
    order = iter(order_rng.permutation(len(source)))
    pool = _token_pool(tokenizer, 8 * p_hi)
    bos = _bos_prefix(tokenizer)
    long_positions = set(
        order_rng.permutation(num_requests)[: round(long_fraction * num_requests)].tolist()
    )
    out: list[TraceRequest] = []
    for i in range(num_requests):
        is_long = i in long_positions
        output_len = int(length_rng.integers(o_lo, o_hi + 1))
        if is_long:
            length = int(length_rng.integers(p_lo, p_hi + 1))
            start = int(offset_rng.integers(0, len(pool)))
            idx: np.ndarray = (start + np.arange(length - len(bos))) % len(pool)
            ids = tuple(bos + [int(t) for t in pool[idx]])
        else:
            ids = _short_prompt(tokenizer, source, order, length_rng, short_prompt_words_range)
            ids = ids[:max_short_prompt_len]
        out.append(
            TraceRequest(
                request_id=f"longprompt-{i:06d}",
                arrival_s=float(arrivals[i]),
                prompt_len=len(ids),
                output_len=output_len,
                prompt_token_ids=ids,
                prompt_text=tokenizer.decode(ids, skip_special_tokens=True),
                source=f"synthetic-long-prompts-{'long' if is_long else 'short'}",
            )
        )
    return out


def _short_prompt(
    tokenizer: TokenizerLike,
    source: Sequence[tuple[str, str]],
    order: Iterator[Any],
    rng: np.random.Generator,
    words_range: tuple[int, int],
) -> tuple[int, ...]:
    """The first ``words_range`` words (uniform) of the next ShareGPT prompt
    in ``order`` that has that many."""
    num_words = int(rng.integers(words_range[0], words_range[1] + 1))
    for idx in order:
        words = source[int(idx)][0].split()
        if len(words) >= num_words:
            return tuple(tokenizer.encode(" ".join(words[:num_words]), add_special_tokens=True))
    raise ValueError(f"ran out of ShareGPT prompts with {num_words} words")


@dataclass(frozen=True, slots=True)
class LongContextProfile:
    """Published input-length range of a long-context benchmark, used to
    shape a *synthetic* trace (we do not ship or read these datasets).

    Attributes:
        name: profile name; the trace's ``source`` is ``"synthetic-<name>"``.
        min_input: smallest input length (tokens) before scaling.
        max_input: largest input length (tokens) before scaling.
        levels: if set, inputs are drawn uniformly from these discrete
            lengths (LV-Eval's length levels); otherwise log-uniformly in
            ``[min_input, max_input]``.
        output_range: inclusive range of answer lengths; both benchmarks
            ask for short answers, so this is not scaled.
    """

    name: str
    min_input: int
    max_input: int
    levels: tuple[int, ...] | None = None
    output_range: tuple[int, int] = (16, 256)


# L-Eval (An et al., 2023): long documents with several queries each,
# inputs of roughly 3K-16K tokens for the bulk of its tasks.
# LV-Eval (Yuan et al., 2024): five length levels 16K/32K/64K/128K/256K.
LONG_CONTEXT_PROFILES: Mapping[str, LongContextProfile] = {
    "leval": LongContextProfile("leval", 3_000, 16_000),
    "lveval": LongContextProfile(
        "lveval", 16_000, 256_000, levels=(16_000, 32_000, 64_000, 128_000, 256_000)
    ),
}


def _token_pool(tokenizer: TokenizerLike, min_tokens: int) -> np.ndarray:
    """At least ``min_tokens`` tokens of real ShareGPT text (no special
    tokens), in file order, so synthetic documents read like real text."""
    pieces: list[list[int]] = []
    total = 0
    # ~4 chars per token; ask for generous text so one pass suffices.
    for text in iter_training_text(max_chars=8 * min_tokens):
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces.append(ids)
        total += len(ids)
        if total >= min_tokens:
            break
    if total < min_tokens:
        raise ValueError(f"ShareGPT text yields only {total} tokens; need {min_tokens}")
    return np.fromiter((t for p in pieces for t in p), dtype=np.int64, count=total)


def make_synthetic_long_trace(
    tokenizer: TokenizerLike,
    num_requests: int,
    rate_rps: float,
    seed: int,
    profile: str | LongContextProfile = "leval",
    scale: float = 1 / 16,
    max_model_len: int = 16384,
    queries_per_document: int = 1,
    question_len: int = 32,
) -> list[TraceRequest]:
    """A **synthetic** long-context trace shaped like L-Eval or LV-Eval.

    Input lengths follow the profile's published range, multiplied by
    ``scale`` (the 2-core dev machine cannot prefill 256K tokens; at
    ``scale=1/16`` LV-Eval spans 1K-16K) and clipped so that
    ``prompt_len + output_len <= max_model_len``. Each prompt is a
    "document" (a slice of real ShareGPT text at a seeded random offset)
    followed by a ``question_len``-token "question" (another slice). With
    ``queries_per_document = k`` consecutive groups of ``k`` requests share
    one document, as L-Eval asks several questions per document, which is
    what prefix caching can exploit. Arrivals are Poisson as in
    :func:`make_sharegpt_trace`. Requests are labelled
    ``source="synthetic-<profile>"``.
    """
    prof = LONG_CONTEXT_PROFILES[profile] if isinstance(profile, str) else profile
    if scale <= 0 or queries_per_document < 1 or question_len < 1:
        raise ValueError("need scale > 0, queries_per_document >= 1, question_len >= 1")
    out_lo, out_hi = prof.output_range
    if max_model_len <= out_hi + question_len + 1:
        raise ValueError("max_model_len too small for the profile's outputs")
    len_rng, doc_rng, out_rng, arrival_rng = _streams(seed, 4)
    arrivals = poisson_arrivals(num_requests, rate_rps, arrival_rng)
    n_docs = -(-num_requests // queries_per_document)
    if prof.levels is not None:
        raw = len_rng.choice(np.asarray(prof.levels, dtype=np.float64), size=n_docs)
    else:
        raw = np.exp(
            len_rng.uniform(math.log(prof.min_input), math.log(prof.max_input), size=n_docs)
        )
    outputs = out_rng.integers(out_lo, out_hi + 1, size=num_requests)
    # Document length leaves room for the question and the longest output.
    doc_cap = max_model_len - question_len - out_hi
    doc_lens = np.clip(np.rint(raw * scale).astype(np.int64), 1, doc_cap)

    # A pool several times the longest document keeps documents from being
    # mere rotations of the same text.
    pool = _token_pool(tokenizer, 4 * int(doc_lens.max()) + 65_536)
    bos = _bos_prefix(tokenizer)

    def slice_at(offset: int, length: int) -> list[int]:
        # Wrap around so any offset in the pool gives a full-length slice.
        idx: np.ndarray = (offset + np.arange(length)) % len(pool)
        return [int(t) for t in pool[idx]]

    doc_offsets = doc_rng.integers(0, len(pool), size=n_docs)
    q_offsets = doc_rng.integers(0, len(pool), size=num_requests)
    out: list[TraceRequest] = []
    for i in range(num_requests):
        d = i // queries_per_document
        ids = tuple(
            bos
            + slice_at(int(doc_offsets[d]), int(doc_lens[d]) - len(bos))
            + slice_at(int(q_offsets[i]), question_len)
        )
        out.append(
            TraceRequest(
                request_id=f"{prof.name}-{i:06d}",
                arrival_s=float(arrivals[i]),
                prompt_len=len(ids),
                output_len=int(outputs[i]),
                prompt_token_ids=ids,
                prompt_text=tokenizer.decode(ids, skip_special_tokens=True),
                source=f"synthetic-{prof.name}",
            )
        )
    return out


def _bos_prefix(tokenizer: TokenizerLike) -> list[int]:
    """The special tokens the tokenizer puts before any text (our BPE: [BOS];
    tokenizers without a BOS: [])."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    k = len(with_special) - len(without)
    if k > 0 and with_special[k:] == without:
        return list(with_special[:k])
    return []


def save_trace(
    requests: Iterable[TraceRequest], path: str | Path, meta: Mapping[str, Any] | None = None
) -> None:
    """Write a trace as JSONL: an optional ``{"__trace_meta__": meta}`` first
    line (generator arguments, tokenizer, ...), then one request per line."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        if meta is not None:
            f.write(json.dumps({_META_KEY: dict(meta)}, ensure_ascii=False) + "\n")
        for r in requests:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


def _iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a trace written by :func:`save_trace` (the meta line is skipped)."""
    return [TraceRequest.from_json(d) for d in _iter_jsonl(path) if _META_KEY not in d]


def load_trace_meta(path: str | Path) -> dict[str, Any] | None:
    """The meta dict of a trace file, or ``None`` if it has none."""
    for d in _iter_jsonl(path):
        return d.get(_META_KEY) if _META_KEY in d else None
    return None
