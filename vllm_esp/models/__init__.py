"""Random-weight Llama models (with a locally trained tokenizer) for vLLM runs.

Build one with ``python -m vllm_esp.models build --preset default`` or
:func:`build_model`.
"""

from vllm_esp.models.presets import PRESETS, ModelPreset, get_preset
from vllm_esp.models.tiny import (
    build_model,
    default_cache_root,
    default_model_path,
    model_path,
)

__all__ = [
    "PRESETS",
    "ModelPreset",
    "build_model",
    "default_cache_root",
    "default_model_path",
    "get_preset",
    "model_path",
]
