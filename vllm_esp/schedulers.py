"""The scheduler names users type, and what each one expands to.

``--scheduler NAME`` on the CLI, :func:`scheduler_args` in Python and the
benchmarks all read this one table, so a name means the same engine
settings everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_esp.config import ADDITIONAL_CONFIG_KEY, ESPConfigError, MLFQConfig

MLFQ_SCHEDULER_CLS = "vllm_esp.sched.mlfq_scheduler.MLFQScheduler"


@dataclass(frozen=True)
class SchedulerSpec:
    """One ``--scheduler`` choice."""

    name: str
    description: str
    #: ``scheduler_cls`` qualname; None = vLLM's stock scheduler.
    scheduler_cls: str | None
    #: Ranking policy inside ``MLFQScheduler`` (None for stock).
    policy: str | None


SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.name: spec
    for spec in (
        SchedulerSpec("fcfs", "vLLM's stock first-come-first-served scheduler", None, None),
        SchedulerSpec("mlfq", "skip-join multi-level feedback queue (FastServe)", MLFQ_SCHEDULER_CLS, "mlfq"),
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


def scheduler_args(
    name: str = "mlfq",
    additional_config: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Engine keyword arguments that select scheduler ``name``.

    >>> from vllm import LLM
    >>> llm = LLM(model=path, **scheduler_args("mlfq", base_quantum_ms=20))

    ``settings`` are :class:`~vllm_esp.config.MLFQConfig` fields; they are
    validated here, so a typo fails before the engine starts.
    """
    spec = get_scheduler_spec(name)
    merged = dict(additional_config or {})
    if spec.scheduler_cls is None:
        if settings:
            raise ESPConfigError(f"scheduler {name!r} takes no MLFQ settings, got {sorted(settings)}")
        return {"additional_config": merged} if merged else {}
    mlfq = dict(merged.get(ADDITIONAL_CONFIG_KEY) or {})
    mlfq.update(settings)
    mlfq["policy"] = spec.policy
    MLFQConfig.from_dict(mlfq)  # validate now
    merged[ADDITIONAL_CONFIG_KEY] = mlfq
    return {"scheduler_cls": spec.scheduler_cls, "additional_config": merged}
