"""Pick the cost model an engine uses: calibration file, else analytic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm_esp.core.costmodel import StepCostModel, default_calibration_path
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.settings import SettingsError

logger = init_logger(f"vllm.{__name__}")  # under vLLM's handlers


def device_kind() -> str:
    from vllm.platforms import current_platform

    return "cuda" if current_platform.is_cuda_alike() else "cpu"


def load_cost_model(config: MLFQConfig, vllm_config: Any) -> StepCostModel:
    """The calibrated model for this engine's model and device.

    Order: ``config.calibration_file`` (must exist), then the default path
    written by ``python -m vllm_esp.calibrate``, then the analytic
    fallback (logged: skip-join placements are then only approximate).
    """
    model = vllm_config.model_config.model
    device = device_kind()
    if config.calibration_file is not None:
        path = Path(config.calibration_file)
        if not path.is_file():
            raise SettingsError(
                f"invalid MLFQ setting calibration_file={config.calibration_file!r}: "
                "no such file (run `python -m vllm_esp.calibrate` to make one)"
            )
        return StepCostModel.load(path)
    path = default_calibration_path(model, device)
    if path.is_file():
        return StepCostModel.load(path)
    hf = vllm_config.model_config.hf_text_config
    logger.warning(
        "vllm-esp: no calibration for %s on %s (looked for %s); using the analytic "
        "cost model. Run `python -m vllm_esp.calibrate --model %s` for "
        "accurate skip-join placement.",
        model,
        device,
        path,
        model,
    )
    return StepCostModel.analytic(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        intermediate_size=getattr(hf, "intermediate_size", 4 * hf.hidden_size),
        vocab_size=hf.vocab_size,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        device=device,
    )
