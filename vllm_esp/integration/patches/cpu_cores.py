"""CPU core reservation for KV connectors that run no thread of their own.

Runtime form of ``patches/0001-cpu-core-reservation-kv-connectors.patch``.

vLLM's CPU executor binds each worker's OpenMP threads to the cores left
after a reservation (``vllm/utils/ompmultiprocessing.py``): one core per
local worker for the EngineCore process, which busy-polls the workers'
replies, plus one more per worker whenever *any* KV connector is
configured ("for nixl_connector under p/d case", whose transfer threads
need a core). ``HostSwapConnector`` (scheduler ``mlfq-swap``) has no
thread: its copies run inline in the worker's main thread. The extra
reservation does it no good and, on a small machine, harm: on 2 cores
vLLM wants 2 reserved, cannot have them, gives up reserving altogether
and binds the worker's OpenMP team to both cores, where the EngineCore's
spinning reader and the front end preempt it. Every OpenMP region then
waits for a descheduled team thread: on this project's 2-core CI machine
``mlfq-swap`` engine steps run ~12% slower than ``mlfq`` steps, enough to
push a 0.95-load replay into overload (mean JCT 1.75x mlfq). With the
reservation vLLM applies to a connector-less engine, the two are level on
that trace (``benchmarks/results/jct_quick_cpu.json``).

The change: a connector class may declare ``requires_reserved_cpu =
False``; vLLM then reserves for it what it reserves without a connector.
Connectors that do not say so (all of vLLM's own) keep vLLM's rule. A user's
``VLLM_CPU_NUM_OF_RESERVED_CPU`` still overrides both (vLLM applies it
after this computation).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig

#: Class attribute a KV connector sets to False when it needs no core of
#: its own (see the module docstring).
REQUIRES_RESERVED_CPU = "requires_reserved_cpu"
_PATCHED = "_vllm_esp_cpu_cores"


def connector_requires_reserved_cpu(kv_transfer_config: KVTransferConfig | None) -> bool:
    """Whether vLLM's extra CPU-core reservation for a connector applies."""
    if kv_transfer_config is None or kv_transfer_config.kv_connector is None:
        return False
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        cls = KVConnectorFactory.get_connector_class(kv_transfer_config)
    except (ImportError, AttributeError, ValueError):
        # Not resolvable here: leave vLLM's rule (and its error, later).
        return True
    return bool(getattr(cls, REQUIRES_RESERVED_CPU, True))


def reservation_view(config: VllmConfig) -> VllmConfig:
    """The config ``OMPProcessManager`` should see: without the connector
    when the connector declares it needs no reserved core."""
    if config.kv_transfer_config is None or connector_requires_reserved_cpu(
        config.kv_transfer_config
    ):
        return config
    view = copy.copy(config)  # shallow: only kv_transfer_config differs
    view.kv_transfer_config = None
    return view


def install() -> bool:
    """Wrap ``OMPProcessManager.__init__`` once per process (CPU only).
    Returns whether the wrapper is in place."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if getattr(OMPProcessManager.__init__, _PATCHED, False):
        return True
    original = OMPProcessManager.__init__

    def __init__(self: Any, config: VllmConfig) -> None:
        original(self, reservation_view(config))

    setattr(__init__, _PATCHED, True)
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    OMPProcessManager.__init__ = __init__
    return True
