"""Train the output-length predictor of ``--scheduler gittins``.

    python -m vllm_esp.models.predictor train [--model PATH] [--out PATH] [--max-pairs N]

The predictor itself (features, model, file format, where the scheduler
looks) is :mod:`vllm_esp.integration.predictor`; this is the tool that
fits it, kept out of the serving path because it reads the ShareGPT data.

Pairs come from ShareGPT's ``"train"`` split
(:func:`vllm_esp.data.sharegpt.split_of`), which traces and benchmarks
never draw from, tokenized as the trace generators tokenize (the prompt
with special tokens, the reply without) by the model's tokenizer (default:
the embedded ``default`` model). A stable hash of the prompt holds out
:data:`VALIDATION_FRACTION` of them: the score -> tokens quantile map is
fitted there and the accuracy reported on it. Deterministic; about 15 s on
2 cores. Writes ``~/.cache/vllm-esp/predictor/<tokenizer digest>.npz`` (or
``--out``), prints the held-out accuracy as JSON on stderr and the file's
path as the last line on stdout. Exits 1 when the predictor does not beat a
constant on held-out pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_esp.data.sharegpt import load_sharegpt_pairs
from vllm_esp.integration.predictor import (
    OutputLengthPredictor,
    TokenTable,
    default_predictor_path,
    evaluate,
    fit_predictor,
    tokenizer_digest,
    vocab_pieces,
)

#: Share of the training split held out for validation and the quantile map.
VALIDATION_FRACTION = 0.2


def is_validation(prompt: str) -> bool:
    """Whether a training-split prompt is held out (a hash independent of
    the split's own)."""
    digest = hashlib.sha256(b"validation\0" + prompt.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < VALIDATION_FRACTION * 2**64


@dataclass(frozen=True)
class Examples:
    """Tokenized pairs: prompt token ids and reply lengths in tokens."""

    prompts: list[list[int]]
    output_lens: list[int]


def tokenize_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> Examples:
    """Prompts with special tokens and replies without, as the traces count them."""
    if not pairs:
        return Examples([], [])
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    replies = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    return Examples([list(p) for p in prompts], [max(1, len(r)) for r in replies])


def split_examples(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[Examples, Examples]:
    """``(fit, validation)`` examples of ``pairs``, split by :func:`is_validation`."""
    fit = [pair for pair in pairs if not is_validation(pair[0])]
    held_out = [pair for pair in pairs if is_validation(pair[0])]
    return tokenize_pairs(tokenizer, fit), tokenize_pairs(tokenizer, held_out)


def train(
    tokenizer: Any,
    digest: str,
    pairs: Sequence[tuple[str, str]],
) -> OutputLengthPredictor:
    """Fit on ``pairs`` less the validation part; the returned predictor's
    ``metrics`` hold its accuracy on that part (:func:`evaluate`)."""
    fit, held_out = split_examples(tokenizer, pairs)
    table = TokenTable.from_pieces(vocab_pieces(tokenizer))
    predictor = fit_predictor(
        table, fit.prompts, fit.output_lens, held_out.prompts, held_out.output_lens, digest
    )
    predictor.metrics.update(evaluate(predictor, held_out.prompts, held_out.output_lens))
    return predictor


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # Only lengths are counted, nothing is run: no "longer than the model"
    # warnings for long ShareGPT texts.
    tokenizer.model_max_length = 1 << 40
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_esp.models.predictor")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the output-length predictor for a tokenizer")
    t.add_argument("--model", default=None, help="model or tokenizer folder (default: default)")
    t.add_argument("--out", default=None, help="file to write (default: the scheduler's cache)")
    t.add_argument("--max-pairs", type=int, default=None, help="first N training pairs only")
    args = parser.parse_args(argv)

    if args.model is None:
        from vllm_esp.models import build_model

        args.model = str(build_model("default"))
    t0 = time.perf_counter()
    digest = tokenizer_digest(args.model)
    pairs = load_sharegpt_pairs(args.max_pairs, split="train")
    predictor = train(load_tokenizer(args.model), digest, pairs)
    out = Path(args.out) if args.out else default_predictor_path(args.model)
    predictor.save(out)
    m = predictor.metrics
    report = {**m, "tokenizer_digest": digest, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(report, sort_keys=True), file=sys.stderr)
    print(
        f"held-out ({int(m['num_eval'])} pairs): Spearman {m['spearman']:.3f}, "
        f"MAE of log length {m['mae_log']:.3f} (constant {m['constant_mae_log']:.3f})",
        file=sys.stderr,
    )
    if not m["mae_log"] < m["constant_mae_log"]:
        print("predictor: no better than a constant on held-out pairs", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
