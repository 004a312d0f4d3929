"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def config_model_dir(tmp_path_factory) -> str:
    """A model folder with only config.json (enough for scheduler tests)."""
    from vllm_esp.harness.scheduler import config_only_model

    return config_only_model(tmp_path_factory.mktemp("config_model"))


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> str:
    """A cost model where every chunk costs 1 ms plus 0.01 ms per token, so
    quanta translate into whole steps in the tests."""
    from vllm_esp.core.costmodel import StepCostModel

    path = tmp_path_factory.mktemp("calib") / "unit.json"
    StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=0.0, source="calibrated").save(path)
    return str(path)
