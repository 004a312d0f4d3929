"""Deterministic builder of small random-weight Llama models for vLLM.

``build_model("default")`` writes, into ``<cache>/models/<preset>/``:

* ``config.json`` / ``generation_config.json`` -- a ``LlamaConfig``;
* ``model.safetensors`` -- ``LlamaForCausalLM`` weights drawn from a seeded
  normal distribution;
* ``tokenizer.json``, ``tokenizer_config.json``, chat template -- a
  byte-level BPE trained locally on ShareGPT text (see ``tokenizer.py``);
* ``esp_build.json`` -- the preset, its digest and library versions.

Determinism: every tensor is drawn from its own numpy ``PCG64`` stream,
seeded by ``(preset.seed, sha256(parameter name))``, so the weights depend
neither on torch's RNG nor on parameter iteration order; the tokenizer is
trained on a fixed text prefix. Building twice gives byte-identical
``tokenizer.json`` and identical tensors.

Idempotence: a folder whose ``esp_build.json`` carries the preset's digest is
reused as is. Builds go to a temporary sibling folder that is renamed into
place, so an interrupted build never leaves a half-written model behind and
concurrent builders do not clobber each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vllm_esp.models.presets import PRESETS, ModelPreset, get_preset
from vllm_esp.models.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    save_tokenizer,
    train_bpe,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUILD_MANIFEST",
    "PRESETS",
    "build_model",
    "default_cache_root",
    "default_model_path",
    "is_built",
    "model_path",
]

BUILD_MANIFEST = "esp_build.json"
CACHE_ENV = "VLLM_ESP_CACHE"


def default_cache_root() -> Path:
    """``$VLLM_ESP_CACHE`` if set, else ``~/.cache/vllm-esp``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-esp"


def model_path(preset: str | ModelPreset = "default", cache_dir: str | Path | None = None) -> Path:
    """Folder a preset is (or would be) built into: ``<cache_dir>/<name>``,
    where ``cache_dir`` defaults to ``default_cache_root() / "models"``."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    root = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "models"
    )
    return root / p.name


def default_model_path() -> Path:
    """Folder of the ``default`` preset in the default cache (may not exist yet;
    call :func:`build_model` to create it)."""
    return model_path("default")


def is_built(path: Path, preset: ModelPreset) -> bool:
    """True if ``path`` holds a complete build of exactly ``preset``."""
    manifest = path / BUILD_MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("digest") == preset.digest()


def _tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    # Seeding from the name makes each tensor independent of which other
    # tensors exist and of their order.
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.SeedSequence([seed, name_key])


def _random_state_dict(
    preset: ModelPreset, shapes: dict[str, tuple[int, ...]], special_ids: list[int]
) -> dict[str, torch.Tensor]:
    """Draw every parameter: matrices ~ N(0, init_std), ``lm_head``
    ~ N(0, logit_std / sqrt(hidden)), RMSNorm weights = 1.

    The ``lm_head`` rows of special tokens are zeroed: their logits are then
    0 while a normal token's max logit is several std above 0, so greedy
    decoding never emits EOS/pad/role markers and generations run to
    ``max_tokens`` instead of stopping at random."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            arr: np.ndarray = np.ones(shape, dtype=np.float32)
        else:
            rng = np.random.Generator(np.random.PCG64(_tensor_seed(preset.seed, name)))
            arr = rng.standard_normal(shape, dtype=np.float32)
            if name == "lm_head.weight":
                arr *= np.float32(preset.logit_std / np.sqrt(preset.hidden_size))
                arr[special_ids] = 0.0
            else:
                arr *= np.float32(preset.init_std)
        out[name] = torch.from_numpy(arr).to(getattr(torch, preset.dtype))
    return out


def _write_model(
    preset: ModelPreset, out_dir: Path, vocab_size: int, special: dict[str, int]
) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=preset.init_std,
        tie_word_embeddings=False,
        bos_token_id=special[BOS_TOKEN],
        eos_token_id=special[EOS_TOKEN],
        pad_token_id=special[PAD_TOKEN],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype=preset.dtype,
        architectures=["LlamaForCausalLM"],
    )
    # Build on the meta device (no init cost, no torch RNG use), then attach
    # the numpy-drawn tensors.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _random_state_dict(preset, shapes, sorted(special.values()))
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are still on meta: recompute.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.generation_config = GenerationConfig(
        bos_token_id=special[BOS_TOKEN],
        eos_token_id=special[EOS_TOKEN],
        pad_token_id=special[PAD_TOKEN],
    )
    from transformers.utils import logging as hf_logging

    # The shard-writing progress bar is noise in build logs.
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out_dir))
    finally:
        hf_logging.enable_progress_bar()


def _build_into(preset: ModelPreset, out_dir: Path) -> None:
    tok = train_bpe(preset.vocab_size, preset.tokenizer_train_chars)
    save_tokenizer(tok, out_dir, preset.max_position_embeddings)
    special: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        tid = tok.token_to_id(t)
        if tid is None:
            raise RuntimeError(f"special token {t!r} missing from the trained vocabulary")
        special[t] = tid
    _write_model(preset, out_dir, tok.get_vocab_size(), special)

    import tokenizers
    import torch
    import transformers

    manifest = {
        "preset": preset.name,
        "digest": preset.digest(),
        "fields": dataclasses.asdict(preset),
        "vocab_size": tok.get_vocab_size(),
        "versions": {
            "numpy": np.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    # save_pretrained writes the weights 0600; models are shared read-only.
    for f in out_dir.iterdir():
        os.chmod(f, 0o644)
    # Written last: its presence marks the build complete.
    (out_dir / BUILD_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_model(
    preset: str | ModelPreset = "default",
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the random-weight Llama model of ``preset``.

    Args:
        preset: a name from :data:`PRESETS` or a :class:`ModelPreset`.
        cache_dir: parent folder; the model goes to ``<cache_dir>/<name>``.
            Defaults to ``$VLLM_ESP_CACHE/models`` or
            ``~/.cache/vllm-esp/models``.
        force: rebuild even if a matching build exists.

    Returns:
        The model folder, loadable by ``vllm.LLM(model=...)`` and by
        transformers' ``AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    final = model_path(p, cache_dir)
    if not force and is_built(final, p):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.build-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        _build_into(p, tmp)
        if final.exists():
            # A stale or foreign build: move aside before swapping in.
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.old-", dir=final.parent))
            os.replace(final, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # A concurrent builder won the rename; its result is equivalent.
            if not is_built(final, p):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
