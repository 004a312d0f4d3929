"""``ESPConfig`` validation and ``scheduler_args("esp", ...)``."""

from __future__ import annotations

import pytest

from vllm_esp.core.choices import (
    ESP_EXECUTOR_CLS,
    ESP_SCHEDULER_CLS,
    MLFQ_SCHEDULER_CLS,
)
from vllm_esp.core.esp.config import ESP_CONFIG_KEY, ESPConfig
from vllm_esp.core.mlfq.config import MLFQ_CONFIG_KEY, MLFQConfig
from vllm_esp.core.settings import SettingsError
from vllm_esp.integration.engine_args import scheduler_args


def test_defaults_are_valid_and_round_trip():
    cfg = ESPConfig()
    assert cfg.num_instances == 1 and cfg.backend == "mp" and cfg.placement == "loong"
    assert ESPConfig.from_dict(cfg.to_dict()) == cfg
    assert ESPConfig.from_dict(None) == cfg
    assert ESPConfig.from_additional_config({"esp": {"num_instances": 3}}).num_instances == 3
    assert ESPConfig.from_additional_config({}) == cfg


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"num_instances": 0}, "num_instances"),
        ({"num_instances": 257}, "num_instances"),
        ({"num_instances": 2.0}, "num_instances"),
        ({"num_instances": True}, "num_instances"),
        ({"backend": "x"}, "backend"),
        ({"ray_address": 5}, "ray_address"),
        ({"placement": "nope"}, "placement"),
        ({"prefill_target_ms": 0}, "prefill_target_ms"),
        ({"cpu_kv_mirror_fraction": 1.5}, "cpu_kv_mirror_fraction"),
        ({"cpu_kv_mirror_fraction": -0.1}, "cpu_kv_mirror_fraction"),
        ({"cpu_kv_mirror_fraction": "1"}, "cpu_kv_mirror_fraction"),
        ({"prefill_target_ms": float("nan")}, "prefill_target_ms"),
        ({"prefill_target_ms": "5"}, "prefill_target_ms"),
        ({"max_prefill_instances": 0}, "max_prefill_instances"),
        ({"prefill_storage": "x"}, "prefill_storage"),
        ({"decode_scale_up_batch": -1}, "decode_scale_up_batch"),
        ({"migrate_blocks_per_step": -1}, "migrate_blocks_per_step"),
        ({"migrate_blocks_per_step": 1.5}, "migrate_blocks_per_step"),
        ({"num_instances": 2, "cpu_binds": ["0"]}, "cpu_binds"),
        ({"num_instances": 2, "cpu_binds": ["0", 1]}, "cpu_binds"),
        ({"num_instances": 1, "cpu_binds": "0"}, "cpu_binds"),
    ],
)
def test_invalid_settings_name_the_setting(settings, name):
    with pytest.raises(SettingsError, match=f"invalid ESP setting {name}="):
        ESPConfig.from_dict(settings)


def test_cpu_binds_wrong_length_says_how_many():
    with pytest.raises(SettingsError, match=r"cpu_binds.*one entry per instance \(3\)"):
        ESPConfig(num_instances=3, cpu_binds=("0", "1"))


def test_unknown_key_is_refused_by_name():
    with pytest.raises(SettingsError, match=r"unknown ESP setting\(s\) \['num_instance'\]"):
        ESPConfig.from_dict({"num_instance": 2})


def test_cpu_binds_list_becomes_a_tuple_and_back():
    cfg = ESPConfig.from_dict({"num_instances": 2, "cpu_binds": ["0-3", "4-7"]})
    assert cfg.cpu_binds == ("0-3", "4-7")
    assert hash(cfg)  # frozen and hashable, even from a list
    assert cfg.to_dict()["cpu_binds"] == ["0-3", "4-7"]
    assert ESPConfig.from_dict(cfg.to_dict()) == cfg


def test_scheduler_args_esp_selects_the_esp_scheduler_and_executor():
    kwargs = scheduler_args("esp", esp={"num_instances": 2, "migrate_blocks_per_step": 0})
    assert kwargs["scheduler_cls"] == ESP_SCHEDULER_CLS
    assert kwargs["distributed_executor_backend"] == ESP_EXECUTOR_CLS
    extra = kwargs["additional_config"]
    assert extra[ESP_CONFIG_KEY] == ESPConfig(num_instances=2, migrate_blocks_per_step=0).to_dict()
    assert extra[MLFQ_CONFIG_KEY]["policy"] == "mlfq"
    # The dict the engine gets rebuilds the same configs (scheduler and executor).
    assert ESPConfig.from_additional_config(extra).num_instances == 2
    MLFQConfig.from_additional_config(extra)
    assert "kv_transfer_config" not in kwargs


def test_scheduler_args_esp_merges_additional_config_and_mlfq_settings():
    kwargs = scheduler_args(
        "esp",
        additional_config={"esp": {"num_instances": 4}, "other": 1},
        esp={"prefill_storage": "stripe"},
        num_levels=3,
    )
    extra = kwargs["additional_config"]
    assert extra["esp"]["num_instances"] == 4 and extra["esp"]["prefill_storage"] == "stripe"
    assert extra["other"] == 1
    assert extra[MLFQ_CONFIG_KEY]["num_levels"] == 3


def test_one_instance_falls_back_to_plain_mlfq():
    for esp in (None, {}, {"num_instances": 1}):
        kwargs = scheduler_args("esp", esp=esp)
        assert kwargs["scheduler_cls"] == MLFQ_SCHEDULER_CLS
        assert "distributed_executor_backend" not in kwargs
        assert kwargs["additional_config"][ESP_CONFIG_KEY]["num_instances"] == 1


def test_scheduler_args_validates_esp_settings_and_where_they_go():
    with pytest.raises(SettingsError, match="takes no ESP settings"):
        scheduler_args("mlfq", esp={"num_instances": 2})
    with pytest.raises(SettingsError, match="takes no ESP settings"):
        scheduler_args("fcfs", esp={})
    with pytest.raises(SettingsError, match="num_instances"):
        scheduler_args("esp", esp={"num_instances": 0})
    with pytest.raises(SettingsError, match="unknown ESP setting"):
        scheduler_args("esp", esp={"instances": 2})
