"""The scheduler names users type, and what each one expands to.

``--scheduler NAME`` on the CLI, :func:`scheduler_args` in Python and the
benchmarks all read this one table, so a name means the same engine
settings everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_esp.config import (
    ADDITIONAL_CONFIG_KEY,
    SWAP_CONFIG_KEY,
    ESPConfigError,
    MLFQConfig,
    SwapConfig,
)

MLFQ_SCHEDULER_CLS = "vllm_esp.sched.mlfq_scheduler.MLFQScheduler"
ESP_SCHEDULER_CLS = "vllm_esp.engine.scheduler.ESPScheduler"
ESP_EXECUTOR_CLS = "vllm_esp.engine.executor.ESPExecutor"
#: The host-swap connector (``kv_transfer_config``) of ``mlfq-swap``.
SWAP_CONNECTOR = "ESPSwapConnector"
SWAP_CONNECTOR_MODULE = "vllm_esp.kv.swap_connector"


@dataclass(frozen=True)
class SchedulerSpec:
    """One ``--scheduler`` choice."""

    name: str
    description: str
    #: ``scheduler_cls`` qualname; None = vLLM's stock scheduler.
    scheduler_cls: str | None
    #: Ranking policy inside ``MLFQScheduler`` (None for stock).
    policy: str | None
    #: Preempt by host-memory KV swap (the ``ESPSwapConnector``) instead of
    #: recompute; takes :class:`~vllm_esp.config.SwapConfig` settings.
    host_swap: bool = False
    #: Elastic sequence parallelism over N instances; takes
    #: :class:`~vllm_esp.engine.config.ESPConfig` settings.
    esp: bool = False


SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in (
        SchedulerSpec("fcfs", "vLLM's stock first-come-first-served scheduler", None, None),
        SchedulerSpec("mlfq", "skip-join multi-level feedback queue (FastServe)", MLFQ_SCHEDULER_CLS, "mlfq"),
        SchedulerSpec("mlfq-swap", "mlfq that preempts by swapping KV to host memory, with "
                      "proactive offload and prefetch (FastServe)", MLFQ_SCHEDULER_CLS, "mlfq",
                      host_swap=True),
        SchedulerSpec("esp", "elastic sequence parallelism over --esp-instances model "
                      "replicas (LoongServe), requests ordered by mlfq", ESP_SCHEDULER_CLS,
                      "mlfq", esp=True),
        SchedulerSpec("srpt", "shortest-remaining-time ORACLE (needs true output "
                      "lengths via max_tokens + ignore_eos; benchmarks only)", MLFQ_SCHEDULER_CLS, "srpt"),
    )
}


def get_scheduler_spec(name: str) -> SchedulerSpec:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ESPConfigError(
            f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}"
        ) from None


def swap_kv_transfer_config():
    """vLLM's ``KVTransferConfig`` selecting the host-swap connector.

    An object, not a dict: ``LLM(...)`` would convert a dict, but
    ``EngineArgs(...)`` and the CLI path (``EngineArgs.from_cli_args``)
    take the field as is.
    """
    from vllm.config.kv_transfer import KVTransferConfig

    return KVTransferConfig(
        kv_connector=SWAP_CONNECTOR,
        kv_connector_module_path=SWAP_CONNECTOR_MODULE,
        # Both directions (save on preemption, load on resume); the
        # connector overrides requires_kv_delivery, which kv_both implies.
        kv_role="kv_both",
    )


def scheduler_args(
    name: str = "mlfq",
    additional_config: dict[str, Any] | None = None,
    swap: dict[str, Any] | None = None,
    esp: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Engine keyword arguments that select scheduler ``name``.

    >>> from vllm import LLM
    >>> llm = LLM(model=path, **scheduler_args("mlfq", base_quantum_ms=20))
    >>> llm = LLM(model=path, **scheduler_args("mlfq-swap", swap={"host_pool_gib": 8}))

    ``settings`` are :class:`~vllm_esp.config.MLFQConfig` fields and
    ``swap`` holds :class:`~vllm_esp.config.SwapConfig` fields (``mlfq-swap``
    only) and ``esp`` :class:`~vllm_esp.engine.config.ESPConfig` fields
    (``esp`` only, e.g. ``{"num_instances": 2}``); all are validated here, so
    a typo fails before the engine starts.

    >>> llm = LLM(model=path, enforce_eager=True,
    ...           **scheduler_args("esp", esp={"num_instances": 2}))
    """
    spec = get_scheduler_spec(name)
    merged = dict(additional_config or {})
    if swap is not None and not (spec.host_swap or spec.esp):
        raise ESPConfigError(f"scheduler {name!r} takes no swap settings (use 'mlfq-swap' "
                             "or 'esp')")
    if esp is not None and not spec.esp:
        raise ESPConfigError(f"scheduler {name!r} takes no ESP settings (use 'esp')")
    if spec.scheduler_cls is None:
        if settings:
            raise ESPConfigError(f"scheduler {name!r} takes no MLFQ settings, got {sorted(settings)}")
        return {"additional_config": merged} if merged else {}
    mlfq = dict(merged.get(ADDITIONAL_CONFIG_KEY) or {})
    mlfq.update(settings)
    mlfq["policy"] = spec.policy
    MLFQConfig.from_dict(mlfq)  # validate now
    merged[ADDITIONAL_CONFIG_KEY] = mlfq
    out: dict[str, Any] = {"scheduler_cls": spec.scheduler_cls, "additional_config": merged}
    if spec.host_swap or (spec.esp and swap is not None):
        swap_settings = dict(merged.get(SWAP_CONFIG_KEY) or {})
        swap_settings.update(swap or {})
        SwapConfig.from_dict(swap_settings)  # validate now
        merged[SWAP_CONFIG_KEY] = swap_settings
        out["kv_transfer_config"] = swap_kv_transfer_config()
    if spec.esp:
        from vllm_esp.engine.config import ESP_CONFIG_KEY, ESPConfig

        esp_settings = dict(merged.get(ESP_CONFIG_KEY) or {})
        esp_settings.update(esp or {})
        esp_config = ESPConfig.from_dict(esp_settings)  # validate now
        merged[ESP_CONFIG_KEY] = esp_config.to_dict()
        if esp_config.num_instances == 1:
            # One instance is the stock engine: same executor, plain MLFQ.
            out["scheduler_cls"] = MLFQ_SCHEDULER_CLS
        else:
            out["distributed_executor_backend"] = ESP_EXECUTOR_CLS
            # Instances also need enforce_eager=True (the ESP step is not a
            # captured graph); the executor refuses to start without it.
    return out
