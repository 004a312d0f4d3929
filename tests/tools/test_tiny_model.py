"""Random-weight Llama builder (``small`` preset into a tmp dir; no vLLM engine)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_esp.models import (
    PRESETS,
    ModelPreset,
    build_model,
    default_model_path,
    get_preset,
)
from vllm_esp.models.__main__ import main as cli_main
from vllm_esp.models.presets import CPU_ATTN_HEAD_SIZES
from vllm_esp.models.tiny import BUILD_MANIFEST, is_built, model_path
from vllm_esp.models.tokenizer import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The ``small`` preset built twice, into two independent caches."""
    a = build_model("small", tmp_path_factory.mktemp("cache_a"))
    b = build_model("small", tmp_path_factory.mktemp("cache_b"))
    return a, b


def test_build_layout(built: tuple[Path, Path]) -> None:
    path = built[0]
    assert path.name == "small"
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        BUILD_MANIFEST,
    ):
        assert (path / f).is_file(), f
    cfg = json.loads((path / "config.json").read_text())
    p = PRESETS["small"]
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == p.hidden_size and cfg["num_hidden_layers"] == p.num_layers
    assert cfg["num_key_value_heads"] == p.num_kv_heads and cfg["head_dim"] == p.head_dim
    assert cfg["vocab_size"] == p.vocab_size
    assert cfg["tie_word_embeddings"] is False
    assert json.loads((path / BUILD_MANIFEST).read_text())["digest"] == p.digest()


def test_build_is_deterministic(built: tuple[Path, Path]) -> None:
    a, b = built
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_build_is_idempotent_and_cli_prints_path(
    built: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = built[0]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_model("small", path.parent) == path
    assert cli_main(["build", "--preset", "small", "--cache-dir", str(path.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert is_built(path, PRESETS["small"])
    assert not is_built(path, dataclasses.replace(PRESETS["small"], seed=1))


def test_transformers_loads_model_and_tokenizer(built: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = built[0]
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == PRESETS["small"].vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == SPECIAL_TOKENS[:3]
    ids = tok("Hello world, how are you?").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world, how are you?"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"

    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    prompts = [
        "Write a poem about the sea.",
        "How do I sort a list in Python?",
        "Explain TCP.",
        "Hi!",
    ]
    outputs = []
    with torch.no_grad():
        for text in prompts:
            inp = torch.tensor([tok.encode(text)])
            logits = model(inp).logits[0, -1]
            # Not flat: the top token clearly beats the median one.
            assert (logits.max() - logits.median()).item() > 3.0
            gen = model.generate(inp, max_new_tokens=24, do_sample=False)
            gen = gen[0, inp.shape[1] :].tolist()
            outputs.append(tuple(gen))
    assert len(set(outputs)) == len(prompts)  # no collapse across prompts
    assert all(len(set(o)) >= 4 for o in outputs)  # no single-token loop
    special_ids = {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert not special_ids & {t for o in outputs for t in o}  # never emits EOS/pad/roles


def test_presets_are_valid_for_vllm_cpu() -> None:
    for name, p in PRESETS.items():
        assert p.name == name
        assert p.head_dim in CPU_ATTN_HEAD_SIZES
        assert p.max_position_embeddings >= 4096
    # Our copy of the supported head sizes must match the installed vLLM's,
    # read from source so the test does not pay for importing vllm.
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None, "vllm must be installed"
    src = Path(spec.origin).parent / "v1" / "attention" / "backends" / "cpu_attn.py"
    m = re.search(
        r"def get_supported_head_sizes\(cls\) -> list\[int\]:\s*return \[([\d,\s]+)\]",
        src.read_text(),
    )
    assert m is not None
    assert tuple(int(x) for x in m.group(1).split(",")) == CPU_ATTN_HEAD_SIZES


def test_preset_validation_and_digest() -> None:
    base = get_preset("small")
    with pytest.raises(ValueError):
        dataclasses.replace(base, hidden_size=120, num_heads=4)  # head_dim 30
    with pytest.raises(ValueError):
        dataclasses.replace(base, num_kv_heads=3)
    with pytest.raises(KeyError):
        get_preset("huge")
    assert base.digest() == get_preset("small").digest()
    assert base.digest() != dataclasses.replace(base, seed=1).digest()
    assert get_preset("small") is PRESETS["small"]  # the registry's preset, not a copy
    assert ModelPreset(**dataclasses.asdict(base)).digest() == base.digest()
    assert base.head_dim == base.hidden_size // base.num_heads
    assert base.init_std == pytest.approx(base.hidden_size**-0.5)
    assert dataclasses.replace(base, initializer_range=0.02).init_std == 0.02
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.seed = 3  # type: ignore[misc]


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_ESP_CACHE", str(tmp_path))
    assert default_model_path() == tmp_path / "models" / "default"
    assert model_path("small", tmp_path / "x") == tmp_path / "x" / "small"
    monkeypatch.delenv("VLLM_ESP_CACHE")
    assert default_model_path() == Path.home() / ".cache" / "vllm-esp" / "models" / "default"
