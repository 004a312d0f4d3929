"""The scheduler names users type (``--scheduler NAME``), and what each one means.

The CLI flags, :func:`vllm_esp.scheduler_args` and the benchmarks all read
this one table, so a name means the same engine settings everywhere. Class
names are qualnames (strings): vLLM imports them itself in EngineCore, and
this module stays free of vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_esp.core.settings import SettingsError

MLFQ_SCHEDULER_CLS = "vllm_esp.integration.mlfq.scheduler.MLFQScheduler"
ESP_SCHEDULER_CLS = "vllm_esp.integration.esp.scheduler.ESPScheduler"
ESP_EXECUTOR_CLS = "vllm_esp.integration.esp.executor.ESPExecutor"
#: The host-swap connector (``kv_transfer_config``) of ``mlfq-swap``.
SWAP_CONNECTOR = "HostSwapConnector"
SWAP_CONNECTOR_MODULE = "vllm_esp.integration.swap.connector"


@dataclass(frozen=True)
class SchedulerChoice:
    """One ``--scheduler`` choice."""

    name: str
    description: str
    #: ``scheduler_cls`` qualname; None = vLLM's stock scheduler.
    scheduler_cls: str | None
    #: Ranking policy inside ``MLFQScheduler`` (None for stock).
    policy: str | None
    #: Preempt by host-memory KV swap (the ``HostSwapConnector``) instead of
    #: recompute; takes :class:`~vllm_esp.core.swap.config.SwapConfig` settings.
    host_swap: bool = False
    #: Elastic sequence parallelism over N instances; takes
    #: :class:`~vllm_esp.core.esp.config.ESPConfig` settings.
    esp: bool = False


SCHEDULER_CHOICES: dict[str, SchedulerChoice] = {
    spec.name: spec
    for spec in (
        SchedulerChoice("fcfs", "vLLM's stock first-come-first-served scheduler", None, None),
        SchedulerChoice(
            "mlfq", "skip-join multi-level feedback queue (FastServe)", MLFQ_SCHEDULER_CLS, "mlfq"
        ),
        SchedulerChoice(
            "gittins",
            "Gittins-index order learned online from finished requests' output "
            "lengths (optimal non-clairvoyant order for mean latency), with "
            "mlfq's preemption and starvation bound",
            MLFQ_SCHEDULER_CLS,
            "gittins",
        ),
        SchedulerChoice(
            "mlfq-swap",
            "mlfq that preempts by swapping KV to host memory, with "
            "proactive offload and prefetch (FastServe)",
            MLFQ_SCHEDULER_CLS,
            "mlfq",
            host_swap=True,
        ),
        SchedulerChoice(
            "esp",
            "elastic sequence parallelism over --esp-instances model "
            "replicas (LoongServe), requests ordered by mlfq",
            ESP_SCHEDULER_CLS,
            "mlfq",
            esp=True,
        ),
        SchedulerChoice(
            "srpt",
            "shortest-remaining-time ORACLE (needs true output "
            "lengths via max_tokens + ignore_eos; benchmarks only)",
            MLFQ_SCHEDULER_CLS,
            "srpt",
        ),
    )
}


#: What ``vllm_esp.scheduler_args()`` and the demo use when no name is given.
DEFAULT_SCHEDULER = "gittins"


def get_scheduler_choice(name: str) -> SchedulerChoice:
    try:
        return SCHEDULER_CHOICES[name]
    except KeyError:
        raise SettingsError(
            f"unknown scheduler {name!r}; choose from {sorted(SCHEDULER_CHOICES)}"
        ) from None
