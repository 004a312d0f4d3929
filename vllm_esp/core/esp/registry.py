"""Elastic placement policies by name (``ESPConfig.placement``).

* ``threshold``: per-request rules (``placement.ThresholdElasticPolicy``);
* ``loong``: LoongServe's four-step scheduler (``loong/elastic.py``), the
  same :class:`~vllm_esp.core.esp.loong.policy.LoongPolicy` the cluster
  simulator runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.elastic import LoongElasticPolicy
from vllm_esp.core.esp.placement import ElasticPolicy, PrefillTime, ThresholdElasticPolicy

if TYPE_CHECKING:
    from vllm_esp.core.esp.config import ESPConfig

__all__ = ["ELASTIC_POLICIES", "make_elastic_policy"]

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
