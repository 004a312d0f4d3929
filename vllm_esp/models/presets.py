"""Size presets for the random-weight Llama models used in tests and benchmarks.

A preset fully determines the built folder: every field feeds
:meth:`ModelPreset.digest`, which the builder stores and compares to decide
whether a cached build is still valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["BUILD_FORMAT_VERSION", "CPU_ATTN_HEAD_SIZES", "PRESETS", "ModelPreset", "get_preset"]

# Bump when the builder's output changes for an unchanged preset (weight
# recipe, tokenizer recipe, file layout) so stale caches are rebuilt.
BUILD_FORMAT_VERSION = 1

# vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes) only runs these head sizes.
CPU_ATTN_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True, slots=True)
class ModelPreset:
    """Architecture, tokenizer and seed of one random-weight Llama model.

    Attributes:
        name: preset name, also the cache sub-folder.
        hidden_size: model width; ``num_heads * head_dim``.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA when < ``num_heads``).
        intermediate_size: SwiGLU MLP width.
        max_position_embeddings: longest context vLLM will accept.
        vocab_size: target BPE vocabulary, special tokens included.
        tokenizer_train_chars: characters of ShareGPT text the BPE is
            trained on (the file's first ones, in order).
        dtype: ``"float32"`` or ``"bfloat16"``: stored weight dtype, which
            vLLM also uses as the compute dtype (``dtype="auto"``).
        initializer_range: std of the normal init of every matrix except
            ``lm_head``; ``None`` means ``1/sqrt(hidden_size)`` (LeCun
            normal), see :attr:`init_std`.
        logit_std: target std of the output logits. The final RMSNorm makes
            the last hidden state unit-RMS, so ``lm_head`` is drawn with std
            ``logit_std / sqrt(hidden_size)``. With 0.02 (HF's default) the
            logits would have std ~0.45 at hidden 512, i.e. a nearly flat
            softmax; 3.0 gives top-token probabilities of a few to ~10%.
        seed: base seed of the weight generator.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    tokenizer_train_chars: int
    dtype: Literal["float32", "bfloat16"] = "float32"
    initializer_range: float | None = None
    logit_std: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim not in CPU_ATTN_HEAD_SIZES:
            raise ValueError(
                f"head_dim {self.head_dim} is not supported by vLLM's CPU attention "
                f"(supported: {CPU_ATTN_HEAD_SIZES})"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")

    @property
    def init_std(self) -> float:
        """Std of the weight matrices. The default ``1/sqrt(hidden_size)``
        keeps each projection's output at the scale of its input, so every
        layer visibly moves the residual stream. With HF's 0.02 the
        ``default`` preset's greedy outputs fell into 2-token cycles (8 of 64
        tokens distinct on average); with ``1/sqrt(512)`` ~62 of 64 are."""
        if self.initializer_range is not None:
            return self.initializer_range
        return 1.0 / math.sqrt(self.hidden_size)

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads

    def digest(self) -> str:
        """Stable hex digest of every field plus :data:`BUILD_FORMAT_VERSION`."""
        payload = {"format": BUILD_FORMAT_VERSION, **dataclasses.asdict(self)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# `small` is for unit tests (builds in ~2 s, float32 so transformers runs it
# at full precision); `default` is the benchmark model; `medium`/`large`
# give heavier steps for cost-model sweeps. Sizing target: one vLLM decode
# step at batch 16 costs ~10 ms, so vLLM's own per-step overhead (~2.5 ms,
# i.e. the `small` preset's step) is a minority of it.
#
# Measured with `python -m vllm_esp.models.measure` (eager, prompts of 128
# tokens, 64 output tokens, bf16, vLLM's auto thread binding = 1 compute
# core + 1 reserved) on the shared 2-core dev VM (Xeon, AVX-512 + AMX),
# median ms per decode step at batch 1 / 16 / 32:
#   small    2.2 /  2.8 /  3.4      default  9.3 / 12.8 / 17.0
#   medium  17.5 / 22.7 / 29.1      large   35.9 / 47.4 / 64.1
# Engine start-up: 14-17 s on a quiet machine, up to ~60 s under load.
#
# dtype: for `default`, float32 took 24.2 ms/step at batch 16 and 0.71 s to
# prefill 16x128 tokens, bfloat16 12.8 ms and 0.22 s (AMX / AVX512-BF16);
# and vLLM-CPU's dtype="auto" downcasts float32 checkpoints to bfloat16 on
# x86 anyway. On an AVX2-only host bf16 has no fast kernels: pass
# dtype="float32" to vLLM there.
#
# All but `small` share the tokenizer recipe, so their tokenizer.json files
# are identical and a trace built with one is valid for the others.
PRESETS: MappingProxyType[str, ModelPreset] = MappingProxyType(
    {
        "small": ModelPreset(
            name="small",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=352,
            max_position_embeddings=4096,
            vocab_size=2048,
            tokenizer_train_chars=1_000_000,
        ),
        "default": ModelPreset(
            name="default",
            hidden_size=512,
            num_layers=6,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=1408,
            max_position_embeddings=16384,
            vocab_size=8192,
            tokenizer_train_chars=4_000_000,
            dtype="bfloat16",
        ),
        "medium": ModelPreset(
            name="medium",
            hidden_size=768,
            num_layers=8,
            num_heads=12,
            num_kv_heads=4,
            intermediate_size=2048,
            max_position_embeddings=16384,
            vocab_size=8192,
            tokenizer_train_chars=4_000_000,
            dtype="bfloat16",
        ),
        "large": ModelPreset(
            name="large",
            hidden_size=1024,
            num_layers=12,
            num_heads=16,
            num_kv_heads=8,
            intermediate_size=2816,
            max_position_embeddings=16384,
            vocab_size=8192,
            tokenizer_train_chars=4_000_000,
            dtype="bfloat16",
        ),
    }
)


def get_preset(name: str) -> ModelPreset:
    """Look up a preset by name.

    Raises:
        KeyError: with the list of valid names.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
