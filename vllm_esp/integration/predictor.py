"""Output-length predictor for the Gittins policy: prompt token ids -> reply length.

``GittinsPolicy`` learns output-length distributions online; with a
prediction it conditions them on the predicted length instead of the prompt
length (``RequestInfo.predicted_output_tokens``). The predictor sees only
what vLLM's scheduler has at ``add_request``, the prompt's token ids, and
turns each id into what its vocabulary entry says (:class:`TokenTable`):

* a hashed bag of the tokens' normalised texts and of their bigrams,
* the bag of the tokens' character trigrams (fastText's subwords: variants
  of a word share most of them),
* the first and last :data:`NUM_EDGE_TOKENS` tokens on their own
  (instructions such as "in one sentence" or "write an essay" sit at
  either end),
* ``log(1 + n)``, its square, and a one-hot bin of it.

Bags weigh each token ``1/sqrt(n)``, so long prompts do not dominate by
volume. A ridge regression of ``log(reply tokens)`` on these (scikit-learn,
fitted by ``python -m vllm_esp.models.predictor train`` on ShareGPT's
training split) is stored as plain arrays (``.npz``, no pickle): serving
needs numpy only, and a prediction is a few gathers and one dot product
(tens of microseconds for a 1,000-token prompt).

:meth:`OutputLengthPredictor.predict_tokens` maps the regression's score
to the reply length at the same quantile of held-out replies: a regression
to the mean squeezes its outputs around the median, and the policy buckets
by tokens, so matching quantiles spreads requests over the buckets in
proportion to real reply lengths (the order, all the policy needs, is
unchanged).
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.settings import SettingsError

#: Bump when the features or the file layout change (old files are refused).
FORMAT_VERSION = 1
#: Hashed columns of token texts, bigrams and edge tokens.
NUM_WORD_FEATURES = 1 << 14
#: Hashed columns of character trigrams, after the word columns.
NUM_GRAM_FEATURES = 1 << 14
GRAM_OFFSET = NUM_WORD_FEATURES
#: Prompt tokens at each end hashed on their own.
NUM_EDGE_TOKENS = 8
#: Tokens of a prompt that enter the bags: bounds the cost of a huge prompt.
MAX_BAG_TOKENS = 2048
#: One-hot bins of ``log(1 + n)``, ``LENGTH_BIN_WIDTH`` wide (the last is open).
NUM_LENGTH_BINS = 12
LENGTH_BIN_WIDTH = 0.75
LENGTH_OFFSET = GRAM_OFFSET + NUM_GRAM_FEATURES
NUM_FEATURES = LENGTH_OFFSET + 2 + NUM_LENGTH_BINS
#: Ridge penalty (chosen on the validation part of the training split).
DEFAULT_ALPHA = 30.0
#: Quantile levels of the score -> tokens map.
QUANTILES = np.linspace(0.0, 1.0, 101)
#: Files whose bytes identify a tokenizer (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")

# Multiplicative hashes (Knuth) of bigrams and edge tokens, kept apart from
# the texts' columns by different multipliers and offsets.
_BIGRAM_SHIFT, _BIGRAM_MUL, _EDGE_MUL = 8191, 2246822519, 40503


def _hash(text: str, size: int) -> int:
    return zlib.crc32(text.encode("utf-8")) % size


def vocab_pieces(tokenizer: Any) -> list[str]:
    """The text of every token id of an HF tokenizer, ``0 .. len - 1``."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


@dataclass(frozen=True, eq=False)
class TokenTable:
    """The features each token id brings, derived once from the vocabulary.

    Variants of one word (" The", "the", "THE") are different ids, each too
    rare in a few thousand prompts to learn from, so an id enters as its
    normalised text (stripped, lower case) and that text's character
    trigrams, hashed. The last row stands for ids beyond the vocabulary.
    """

    #: Column of each id's normalised text, ``(V + 1,)``.
    word_cols: np.ndarray
    #: Id ``i``'s trigram columns are ``gram_cols[gram_indptr[i]:gram_indptr[i + 1]]``.
    gram_indptr: np.ndarray
    gram_cols: np.ndarray

    @classmethod
    def from_pieces(cls, pieces: Sequence[str]) -> TokenTable:
        word_cols, indptr, grams = [], [0], []
        for piece in [*pieces, ""]:
            text = piece.strip().lower()
            word_cols.append(_hash(text, NUM_WORD_FEATURES))
            marked = f"<{text}>"
            trigrams = {marked[k : k + 3] for k in range(max(len(marked) - 2, 1))}
            grams.extend(sorted(GRAM_OFFSET + _hash(g, NUM_GRAM_FEATURES) for g in trigrams))
            indptr.append(len(grams))
        return cls(
            word_cols=np.array(word_cols, dtype=np.int64),
            gram_indptr=np.array(indptr, dtype=np.int64),
            gram_cols=np.array(grams, dtype=np.int64),
        )

    def _rows(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        return np.clip(ids, 0, len(self.word_cols) - 1)

    def _grams(self, rows: np.ndarray) -> np.ndarray:
        starts = self.gram_indptr[rows]
        counts = self.gram_indptr[rows + 1] - starts
        # Positions starts[k] .. starts[k] + counts[k] - 1 of every row k, flat.
        offsets: np.ndarray = np.repeat(starts - np.cumsum(counts) + counts, counts)
        return self.gram_cols[offsets + np.arange(len(offsets))]

    def featurize(self, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(columns, values)`` of one prompt's sparse feature vector
        (columns may repeat; repeated entries add up)."""
        n = len(token_ids)
        rows = self._rows(token_ids[:MAX_BAG_TOKENS])
        words = self.word_cols[rows]
        grams = self._grams(rows)
        head = words[:NUM_EDGE_TOKENS]
        tail = self.word_cols[self._rows(token_ids[-NUM_EDGE_TOKENS:])]
        weight = 1.0 / math.sqrt(max(len(rows), 1))
        log_n = math.log1p(n)
        length_bin = min(int(log_n / LENGTH_BIN_WIDTH), NUM_LENGTH_BINS - 1)
        columns = [
            words,
            (words[:-1] * _BIGRAM_SHIFT + words[1:]) * _BIGRAM_MUL % NUM_WORD_FEATURES,
            grams,
            (head * _EDGE_MUL + 1) % NUM_WORD_FEATURES,
            (tail * _EDGE_MUL + 7) % NUM_WORD_FEATURES,
            np.array([LENGTH_OFFSET, LENGTH_OFFSET + 1, LENGTH_OFFSET + 2 + length_bin]),
        ]
        values = [
            np.full(len(words), weight),
            np.full(max(len(words) - 1, 0), weight),
            np.full(len(grams), weight),
            np.full(len(head), 0.5),
            np.full(len(tail), 0.5),
            np.array([log_n, log_n * log_n / 10.0, 1.0]),
        ]
        return np.concatenate(columns), np.concatenate(values)

    def feature_matrix(self, prompts: Sequence[Sequence[int]]) -> Any:
        """The prompts' features as a ``scipy.sparse`` CSR matrix (training only)."""
        from scipy import sparse

        rows, columns, values = [], [], []
        for i, token_ids in enumerate(prompts):
            c, v = self.featurize(token_ids)
            rows.append(np.full(len(c), i))
            columns.append(c)
            values.append(v)
        data = (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns)))
        return sparse.csr_matrix(data, shape=(len(prompts), NUM_FEATURES))


@dataclass(frozen=True, eq=False)
class OutputLengthPredictor:
    """A fitted predictor: ridge weights plus the score -> tokens quantile map."""

    table: TokenTable
    coef: np.ndarray
    intercept: float
    #: Scores of held-out prompts, and their reply lengths, at ``QUANTILES``.
    score_quantiles: np.ndarray
    length_quantiles: np.ndarray
    #: :func:`tokenizer_digest` of the tokenizer the features were made with.
    tokenizer_digest: str
    #: Held-out accuracy and training facts (see :func:`evaluate`).
    metrics: dict[str, float] = field(default_factory=dict)

    def predict_log(self, token_ids: Sequence[int]) -> float:
        """Expected ``log(reply tokens)`` of a prompt."""
        columns, values = self.table.featurize(token_ids)
        # An elementwise product, not BLAS: a threaded dot stalls on a busy host.
        return self.intercept + float((self.coef[columns] * values).sum())

    def predict_tokens(self, token_ids: Sequence[int]) -> int:
        """The reply length at the prompt's score quantile (>= 1)."""
        score = self.predict_log(token_ids)
        return max(1, round(float(np.interp(score, self.score_quantiles, self.length_quantiles))))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "num_features": NUM_FEATURES,
            "intercept": self.intercept,
            "tokenizer_digest": self.tokenizer_digest,
            "metrics": self.metrics,
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            word_cols=self.table.word_cols,
            gram_indptr=self.table.gram_indptr,
            gram_cols=self.table.gram_cols,
            coef=self.coef,
            score_quantiles=self.score_quantiles,
            length_quantiles=self.length_quantiles,
            meta=np.array(json.dumps(meta, sort_keys=True)),
        )
        tmp.replace(path)  # readers never see a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path) -> OutputLengthPredictor:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format_version") != FORMAT_VERSION or meta.get("num_features") != (
                NUM_FEATURES
            ):
                raise ValueError(
                    f"{path}: predictor format {meta.get('format_version')}, this vllm-esp "
                    f"reads format {FORMAT_VERSION}; retrain it"
                )
            table = TokenTable(data["word_cols"], data["gram_indptr"], data["gram_cols"])
            return cls(
                table=table,
                coef=data["coef"],
                intercept=float(meta["intercept"]),
                score_quantiles=data["score_quantiles"],
                length_quantiles=data["length_quantiles"],
                tokenizer_digest=str(meta["tokenizer_digest"]),
                metrics=dict(meta["metrics"]),
            )


# ---------------------------------------------------------------- training
def fit_predictor(
    table: TokenTable,
    prompts: Sequence[Sequence[int]],
    output_lens: Sequence[int],
    calibration_prompts: Sequence[Sequence[int]],
    calibration_output_lens: Sequence[int],
    tokenizer_digest: str,
    alpha: float = DEFAULT_ALPHA,
) -> OutputLengthPredictor:
    """Fit the ridge regression on ``prompts`` and the quantile map on the
    held-out ``calibration_*`` pairs (in-sample scores would be too spread
    out). Deterministic: the solver is a conjugate-gradient method."""
    from sklearn.linear_model import Ridge

    if not prompts or not calibration_prompts:
        raise ValueError("need training and calibration pairs")
    target = np.log(np.maximum(np.asarray(output_lens, dtype=np.float64), 1.0))
    features = table.feature_matrix(prompts)
    model = Ridge(alpha=alpha, solver="sparse_cg", tol=1e-6).fit(features, target)
    scores = model.predict(table.feature_matrix(calibration_prompts))
    lengths = np.asarray(calibration_output_lens, dtype=np.float64)
    return OutputLengthPredictor(
        table=table,
        coef=np.asarray(model.coef_, dtype=np.float64),
        intercept=float(model.intercept_),
        score_quantiles=np.asarray(np.quantile(scores, QUANTILES)),
        length_quantiles=np.asarray(np.quantile(lengths, QUANTILES)),
        tokenizer_digest=tokenizer_digest,
        metrics={
            "num_train": float(len(prompts)),
            "median_train_log_len": float(np.median(target)),
        },
    )


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def evaluate(
    predictor: OutputLengthPredictor,
    prompts: Sequence[Sequence[int]],
    output_lens: Sequence[int],
) -> dict[str, float]:
    """Held-out accuracy: Spearman's correlation of predicted and true
    lengths, and the mean absolute error of ``log`` length against the best
    constant predictor's (the training median)."""
    target = np.log(np.maximum(np.asarray(output_lens, dtype=np.float64), 1.0))
    predicted = np.array([predictor.predict_log(p) for p in prompts])
    constant = predictor.metrics.get("median_train_log_len", float(np.median(target)))
    return {
        "num_eval": float(len(prompts)),
        "spearman": spearman(predicted, target),
        "mae_log": float(np.abs(predicted - target).mean()),
        "constant_mae_log": float(np.abs(constant - target).mean()),
    }


# ---------------------------------------------------------------- where it lives
def tokenizer_digest(tokenizer_dir: str | Path) -> str:
    """A digest of the tokenizer files in ``tokenizer_dir``: a predictor's
    features are token ids, so it only fits the tokenizer it was made with.

    Raises:
        FileNotFoundError: if the folder has none of :data:`TOKENIZER_FILES`.
    """
    root = Path(tokenizer_dir)
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    if not found:
        raise FileNotFoundError(f"no tokenizer files {TOKENIZER_FILES} in {root}")
    return h.hexdigest()[:16]


def default_predictor_dir() -> Path:
    from vllm_esp.core.costmodel import default_calibration_dir

    return default_calibration_dir().parent / "predictor"


def default_predictor_path(tokenizer_dir: str | Path) -> Path:
    """Where ``python -m vllm_esp.models.predictor train`` writes, and the
    scheduler looks, for the tokenizer in ``tokenizer_dir`` (keyed by the
    format too, so a new format is retrained rather than refused)."""
    return _default_path(tokenizer_digest(tokenizer_dir))


def _default_path(digest: str) -> Path:
    return default_predictor_dir() / f"{digest}-v{FORMAT_VERSION}.npz"


def _train_hint(tokenizer: str) -> str:
    return f"train one with `python -m vllm_esp.models.predictor train --model {tokenizer}`"


def load_output_predictor(config: MLFQConfig, tokenizer: str) -> OutputLengthPredictor | None:
    """The predictor ``config.output_predictor`` names for an engine serving
    the tokenizer in folder ``tokenizer``, or None when it is off.

    ``"default"`` is the cached one for that tokenizer; anything else is a
    file path. A missing file, or one made for another tokenizer, is a
    :class:`SettingsError` at start-up (a silent fallback would quietly
    change the policy).
    """
    setting = config.output_predictor
    if not setting:
        return None
    bad = f"invalid MLFQ setting output_predictor={setting!r}"
    try:
        digest: str | None = tokenizer_digest(tokenizer)
    except FileNotFoundError:
        digest = None
    if setting == "default":
        if digest is None:
            raise SettingsError(
                f"{bad}: no tokenizer files in {tokenizer!r} to find the default predictor "
                "by; give the predictor's path instead"
            )
        path = _default_path(digest)
    else:
        path = Path(setting).expanduser()
    if not path.is_file():
        raise SettingsError(f"{bad}: no predictor at {path}; {_train_hint(tokenizer)}")
    try:
        predictor = OutputLengthPredictor.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise SettingsError(f"{bad}: cannot read {path} ({e}); {_train_hint(tokenizer)}") from e
    if digest is not None and predictor.tokenizer_digest != digest:
        raise SettingsError(
            f"{bad}: {path} was trained for tokenizer {predictor.tokenizer_digest}, this engine "
            f"serves {digest}; {_train_hint(tokenizer)}"
        )
    return predictor
