"""CPU core reservation with the host-swap connector (patch 0001).

vLLM's CPU executor reserves an extra core per worker for any KV connector;
``HostSwapConnector`` declares it needs none. These tests check the runtime
form (``vllm_esp/integration/patches/cpu_cores.py``) on vLLM's real ``OMPProcessManager``,
and that ``patches/0001-...patch`` still applies to the installed vLLM and,
applied, computes the same reservation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vllm
from vllm.config import KVTransferConfig, VllmConfig
from vllm.platforms import current_platform

import vllm_esp
from vllm_esp.integration.engine_args import swap_kv_transfer_config
from vllm_esp.integration.patches import cpu_cores

pytestmark = pytest.mark.skipif(not current_platform.is_cpu(), reason="CPU executor only")

PATCH = (
    Path(__file__).resolve().parents[2]
    / "patches"
    / "0001-cpu-core-reservation-kv-connectors.patch"
)
VLLM_ROOT = Path(vllm.__file__).resolve().parent.parent  # site-packages


def _config(kv_transfer_config: KVTransferConfig | None) -> VllmConfig:
    return VllmConfig(kv_transfer_config=kv_transfer_config)


def _swap() -> KVTransferConfig:
    return swap_kv_transfer_config()


def _nixl_like() -> KVTransferConfig:
    # Any vLLM connector: none of them declares requires_reserved_cpu.
    return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")


def _reserve(manager_cls, config: VllmConfig) -> int:
    return manager_cls(config).reserve_cpu_num


@pytest.fixture
def omp_manager(monkeypatch):
    # A user's VLLM_CPU_NUM_OF_RESERVED_CPU overrides every rule: not here.
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert cpu_cores.install()
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    return OMPProcessManager


def test_register_installs_the_wrapper():
    vllm_esp.register()
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    assert getattr(OMPProcessManager.__init__, cpu_cores._PATCHED, False)
    assert cpu_cores.install()  # idempotent
    assert not getattr(OMPProcessManager.__init__.__wrapped__, cpu_cores._PATCHED, False)


def test_swap_connector_reserves_like_no_connector(omp_manager):
    plain = _reserve(omp_manager, _config(None))
    assert plain >= 1
    assert _reserve(omp_manager, _config(_swap())) == plain
    # vLLM's rule is kept for connectors that do not opt out...
    assert _reserve(omp_manager, _config(_nixl_like())) == plain + 1
    # ...and the unwrapped vLLM class reserves the extra core for ours too
    # (this is the behaviour the wrapper exists to change).
    original = omp_manager.__init__.__wrapped__

    class Unwrapped(omp_manager):
        __init__ = original

    assert _reserve(Unwrapped, _config(_swap())) == plain + 1


def test_the_engine_config_is_not_modified(omp_manager):
    config = _config(_swap())
    omp_manager(config)
    assert config.kv_transfer_config is not None
    assert config.kv_transfer_config.kv_connector == "HostSwapConnector"


def test_user_override_still_wins(omp_manager, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    assert _reserve(omp_manager, _config(_swap())) == 0


def test_unresolvable_connector_keeps_vllms_rule():
    bad = KVTransferConfig(
        kv_connector="NoSuchConnector",
        kv_connector_module_path="vllm_esp.integration.swap.connector",
        kv_role="kv_both",
    )
    assert cpu_cores.connector_requires_reserved_cpu(bad)
    assert not cpu_cores.connector_requires_reserved_cpu(None)
    assert not cpu_cores.connector_requires_reserved_cpu(_swap())


def test_patch_file_applies_and_matches_the_runtime_form(omp_manager, tmp_path, monkeypatch):
    rel = [
        "vllm/utils/ompmultiprocessing.py",
        "vllm/distributed/kv_transfer/kv_connector/v1/base.py",
    ]
    for r in rel:
        (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VLLM_ROOT / r, tmp_path / r)
    # git (which every checkout has) applies a unified diff outside a repository too.
    # The ceiling keeps git from finding an enclosing repository (it would
    # then apply relative to that repository's root).
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    proc = subprocess.run(
        ["git", "apply", "-p1", str(PATCH)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, (
        f"patch no longer applies to vLLM {vllm.__version__}:\n{proc.stdout}{proc.stderr}"
    )
    # Load the patched module beside the real one (its imports are vLLM's).
    spec = importlib.util.spec_from_file_location("_patched_omp", tmp_path / rel[0])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_patched_omp", module)
    spec.loader.exec_module(module)
    for kv in (None, _swap(), _nixl_like()):
        assert _reserve(module.OMPProcessManager, _config(kv)) == _reserve(
            omp_manager, _config(kv)
        ), kv
