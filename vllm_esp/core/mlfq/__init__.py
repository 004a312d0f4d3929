"""Torch-free ranking policies, chosen by name from one registry.

The vLLM scheduler wrapper, the tests and the simulator all build policies
through :func:`make_policy`, so a policy name means the same code
everywhere. To add one, subclass :class:`RankingPolicy` and add it to
``POLICIES`` (``CONTRIBUTING.md`` walks through an example).
"""

from __future__ import annotations

from vllm_esp.core.mlfq.policy import PolicyStats, RankingPolicy, RequestInfo
from vllm_esp.core.mlfq.reference import FCFSPolicy, SRPTOraclePolicy
from vllm_esp.core.mlfq.skip_join import MLFQPolicy

POLICIES: dict[str, type[RankingPolicy]] = {
    FCFSPolicy.name: FCFSPolicy,
    MLFQPolicy.name: MLFQPolicy,
    SRPTOraclePolicy.name: SRPTOraclePolicy,
}


def make_policy(config: "MLFQConfig", cost_model: "StepCostModel") -> RankingPolicy:  # noqa: F821
    """Build the policy named by ``config.policy``."""
    if config.policy == MLFQPolicy.name:
        if config.base_quantum_ms is not None:
            base_quantum_s = config.base_quantum_ms / 1000.0
        else:
            base_quantum_s = config.auto_quantum_decode_steps * cost_model.decode_time(512)
        return MLFQPolicy(
            num_levels=config.num_levels,
            base_quantum_s=base_quantum_s,
            quantum_ratio=config.quantum_ratio,
            cost_model=cost_model,
            skip_join=config.skip_join,
            starvation_threshold_s=config.starvation_threshold_s,
        )
    return POLICIES[config.policy](cost_model=cost_model)


__all__ = [
    "POLICIES",
    "FCFSPolicy",
    "MLFQPolicy",
    "PolicyStats",
    "RankingPolicy",
    "RequestInfo",
    "SRPTOraclePolicy",
    "make_policy",
]
