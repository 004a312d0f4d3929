"""The output-length predictor: trained on ShareGPT's training split (which
no trace uses), it ranks held-out replies better than a constant, trains
deterministically, round-trips through its file, and the scheduler loads
it at start-up (or says how to train it) and buckets requests by it."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.mlfq.gittins import GittinsPolicy
from vllm_esp.core.settings import SettingsError
from vllm_esp.data import trace as trace_module
from vllm_esp.data.sharegpt import TRAIN_FRACTION, load_sharegpt_pairs, split_of
from vllm_esp.harness.engine import small_model_path
from vllm_esp.harness.scheduler import create_scheduler, make_request
from vllm_esp.integration.predictor import (
    OutputLengthPredictor,
    default_predictor_path,
    load_output_predictor,
    tokenizer_digest,
)
from vllm_esp.models.predictor import load_tokenizer, train

#: Training pairs in the quick tests: a couple of seconds to fit.
NUM_PAIRS = 800


@pytest.fixture(scope="module")
def model() -> str:
    return small_model_path()


@pytest.fixture(scope="module")
def tokenizer(model: str):
    return load_tokenizer(model)


@pytest.fixture(scope="module")
def predictor(model: str, tokenizer) -> OutputLengthPredictor:
    return train(tokenizer, tokenizer_digest(model), load_sharegpt_pairs(NUM_PAIRS, split="train"))


# ---------------------------------------------------------------- the split
def test_splits_partition_the_pairs_by_prompt() -> None:
    serve = load_sharegpt_pairs()
    training = load_sharegpt_pairs(split="train")
    everything = load_sharegpt_pairs(split="all")
    assert len(serve) + len(training) == len(everything)
    assert not {p for p, _ in serve} & {p for p, _ in training}
    assert abs(len(training) / len(everything) - TRAIN_FRACTION) < 0.03
    assert all(split_of(p) == "train" for p, _ in training[:200])
    with pytest.raises(ValueError):
        load_sharegpt_pairs(split="validation")  # type: ignore[arg-type]


def test_trace_generators_draw_only_from_the_serve_split(
    tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[str, str]] = []
    original = trace_module.load_sharegpt_pairs

    def spy(*args, **kwargs):
        pairs = original(*args, **kwargs)
        drawn.extend(pairs)
        return pairs

    monkeypatch.setattr(trace_module, "load_sharegpt_pairs", spy)
    # Prompts uncut, so each request carries its whole prompt.
    uncut = {"max_prompt_len": 1 << 20, "max_model_len": 1 << 21}
    sharegpt = trace_module.make_sharegpt_trace(tokenizer, 60, 1.0, seed=3, **uncut)
    trace_module.make_mixed_trace(tokenizer, 30, 1.0, seed=3)
    assert drawn and all(split_of(prompt) == "serve" for prompt, _ in drawn)

    # And on the requests themselves: no trace prompt is a training prompt
    # (the check does catch one drawn from the training split).
    training = load_sharegpt_pairs(split="train")
    train_ids = set(map(tuple, tokenizer([p for p, _ in training])["input_ids"]))
    assert not any(r.prompt_token_ids in train_ids for r in sharegpt)
    leaked = trace_module.make_sharegpt_trace(tokenizer, 20, 1.0, seed=3, pairs=training, **uncut)
    assert all(r.prompt_token_ids in train_ids for r in leaked)


# ---------------------------------------------------------------- training
def test_prediction_beats_a_constant_on_held_out_pairs(predictor: OutputLengthPredictor) -> None:
    m = predictor.metrics
    assert m["num_eval"] >= 100
    assert m["spearman"] > 0.15
    assert m["mae_log"] < m["constant_mae_log"] - 0.02


def test_training_is_deterministic_and_the_file_round_trips(
    model: str, tokenizer, predictor: OutputLengthPredictor, tmp_path: Path
) -> None:
    again = train(tokenizer, tokenizer_digest(model), load_sharegpt_pairs(NUM_PAIRS, split="train"))
    assert np.array_equal(again.coef, predictor.coef)
    assert again.intercept == predictor.intercept
    assert np.array_equal(again.score_quantiles, predictor.score_quantiles)
    loaded = OutputLengthPredictor.load(predictor.save(tmp_path / "p.npz"))
    prompts = [tokenizer.encode(p) for p, _ in load_sharegpt_pairs(50)]
    assert [loaded.predict_tokens(p) for p in prompts] == [
        predictor.predict_tokens(p) for p in prompts
    ]
    assert loaded.metrics == predictor.metrics


def test_predictions_spread_over_reply_lengths_and_are_cheap(
    tokenizer, predictor: OutputLengthPredictor
) -> None:
    prompts = [tokenizer.encode(p) for p, _ in load_sharegpt_pairs(300)]
    predicted = [predictor.predict_tokens(p) for p in prompts]
    assert min(predicted) >= 1
    # Quantile matching: the predictions span the buckets, not one value.
    assert np.percentile(predicted, 90) > 2 * np.percentile(predicted, 10)
    assert predictor.predict_tokens([]) >= 1
    long_prompt = list(itertools.chain(*prompts))[:2000]
    t0 = time.perf_counter()
    for _ in range(200):
        predictor.predict_tokens(long_prompt)
    assert (time.perf_counter() - t0) / 200 < 1e-3


# ---------------------------------------------------------------- serving
def test_loading_follows_the_setting(
    model: str, predictor: OutputLengthPredictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ESP_CACHE", str(tmp_path))
    assert load_output_predictor(MLFQConfig(policy="gittins"), model) is None
    default = MLFQConfig(policy="gittins", output_predictor="default")
    with pytest.raises(SettingsError, match=r"python -m vllm_esp.models.predictor train"):
        load_output_predictor(default, model)
    predictor.save(default_predictor_path(model))
    assert str(default_predictor_path(model)).startswith(str(tmp_path))
    loaded = load_output_predictor(default, model)
    assert loaded is not None and np.array_equal(loaded.coef, predictor.coef)
    # A predictor made for another tokenizer is refused, not used.
    other = tmp_path / "other.npz"
    OutputLengthPredictor(
        predictor.table,
        predictor.coef,
        0.0,
        predictor.score_quantiles,
        predictor.length_quantiles,
        tokenizer_digest="0" * 16,
    ).save(other)
    with pytest.raises(SettingsError, match="trained for tokenizer"):
        load_output_predictor(MLFQConfig(policy="gittins", output_predictor=str(other)), model)
    with pytest.raises(SettingsError, match="only the gittins policy"):
        MLFQConfig(policy="mlfq", output_predictor="default")


def test_scheduler_buckets_requests_by_the_prediction(
    config_model_dir: str,
    calibration_file: str,
    tokenizer,
    predictor: OutputLengthPredictor,
    tmp_path: Path,
) -> None:
    path = str(predictor.save(tmp_path / "p.npz"))

    def make(output_predictor: str):
        mlfq = {
            "policy": "gittins",
            "calibration_file": calibration_file,
            "output_predictor": output_predictor,
        }
        return create_scheduler(config_model_dir, additional_config={"mlfq": mlfq})

    with pytest.raises(SettingsError, match="no predictor at"):
        make(str(tmp_path / "missing.npz"))
    with_predictor, without = make(path), make("")
    prompts = [tokenizer.encode(p)[:512] for p, _ in load_sharegpt_pairs(40)]
    for i, ids in enumerate(prompts):
        for s in (with_predictor, without):
            s.add_request(make_request(f"r{i}", len(ids), 16, prompt_token_ids=ids))
    expected = [GittinsPolicy._bucket(len(ids), predictor.predict_tokens(ids)) for ids in prompts]
    got = [with_predictor.rank_policy.bucket_of(f"r{i}") for i in range(len(prompts))]
    assert got == expected and len(set(got)) > 1
    assert [without.rank_policy.bucket_of(f"r{i}") for i in range(len(prompts))] == [
        GittinsPolicy._bucket(len(ids)) for ids in prompts
    ]
