"""Policies by name.

``ELASTIC_POLICIES`` (``ESPConfig.placement``, the engine):

* ``threshold``: per-request rules (``placement.ThresholdElasticPolicy``);
* ``loong``: LoongServe's four-step scheduler (``loong/elastic.py``), the
  same :class:`~vllm_esp.core.esp.loong.policy.LoongPolicy` the cluster
  simulator runs.

``CLUSTER_POLICIES`` (the cluster simulator): ``loong`` and the baselines
of ``baselines.py``; :func:`make_cluster_policy` passes each its own
constructor arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_esp.core.esp.baselines import (
    PDDisaggregationPolicy,
    ReplicasChunkedPolicy,
    StaticSPPolicy,
    TensorParallelPolicy,
)
from vllm_esp.core.esp.cluster import ClusterPolicy
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.elastic import LoongElasticPolicy
from vllm_esp.core.esp.loong.policy import LoongPolicy
from vllm_esp.core.esp.placement import ElasticPolicy, PrefillTime, ThresholdElasticPolicy

if TYPE_CHECKING:
    from vllm_esp.core.esp.config import ESPConfig

__all__ = ["CLUSTER_POLICIES", "ELASTIC_POLICIES", "make_cluster_policy", "make_elastic_policy"]

ELASTIC_POLICIES: dict[str, type[ElasticPolicy]] = {
    ThresholdElasticPolicy.name: ThresholdElasticPolicy,
    LoongElasticPolicy.name: LoongElasticPolicy,
}


def make_elastic_policy(
    settings: ESPConfig, *, num_instances: int, prefill_time: PrefillTime, esp_cost: ESPCostModel
) -> ElasticPolicy:
    """Build the policy named by ``settings.placement``."""
    return ELASTIC_POLICIES[settings.placement].from_settings(
        settings, num_instances=num_instances, prefill_time=prefill_time, esp_cost=esp_cost
    )


CLUSTER_POLICIES: dict[str, type[ClusterPolicy]] = {
    LoongPolicy.name: LoongPolicy,
    StaticSPPolicy.name: StaticSPPolicy,
    TensorParallelPolicy.name: TensorParallelPolicy,
    ReplicasChunkedPolicy.name: ReplicasChunkedPolicy,
    PDDisaggregationPolicy.name: PDDisaggregationPolicy,
}


def make_cluster_policy(name: str, *args: Any, **options: Any) -> ClusterPolicy:
    """Build the cluster policy registered as ``name`` with its own arguments."""
    try:
        cls = CLUSTER_POLICIES[name]
    except KeyError:
        raise ValueError(f"no cluster policy {name!r}; known: {sorted(CLUSTER_POLICIES)}") from None
    return cls(*args, **options)
