"""Torch-free ranking policies, chosen by name from one registry.

The vLLM scheduler wrapper, the tests and the simulator all build policies
through :func:`make_policy`, so a policy name means the same code
everywhere. To add one, subclass :class:`RankingPolicy` and add it to
``POLICIES`` (``CONTRIBUTING.md`` walks through an example).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.mlfq.gittins import GittinsPolicy
from vllm_esp.core.mlfq.policy import PolicyStats, RankingPolicy, RequestInfo
from vllm_esp.core.mlfq.reference import FCFSPolicy, SRPTOraclePolicy
from vllm_esp.core.mlfq.skip_join import MLFQPolicy

POLICIES: dict[str, type[RankingPolicy]] = {
    FCFSPolicy.name: FCFSPolicy,
    GittinsPolicy.name: GittinsPolicy,
    MLFQPolicy.name: MLFQPolicy,
    SRPTOraclePolicy.name: SRPTOraclePolicy,
}

if TYPE_CHECKING:  # config.py imports POLICIES from here
    from vllm_esp.core.mlfq.config import MLFQConfig


def make_policy(settings: MLFQConfig, cost_model: StepCostModel) -> RankingPolicy:
    """Build the policy named by ``settings.policy``."""
    return POLICIES[settings.policy].from_settings(settings, cost_model)


__all__ = [
    "POLICIES",
    "FCFSPolicy",
    "GittinsPolicy",
    "MLFQPolicy",
    "PolicyStats",
    "RankingPolicy",
    "RequestInfo",
    "SRPTOraclePolicy",
    "make_policy",
]
