"""Workload data: the ShareGPT reader and seeded request-trace generators."""

from vllm_esp.data.sharegpt import (
    Conversation,
    Turn,
    iter_conversations,
    iter_training_text,
    load_sharegpt_pairs,
    sharegpt_path,
)
from vllm_esp.data.trace import (
    LONG_CONTEXT_PROFILES,
    LongContextProfile,
    TraceRequest,
    load_trace,
    load_trace_meta,
    make_mixed_trace,
    make_sharegpt_trace,
    make_synthetic_long_trace,
    poisson_arrivals,
    save_trace,
)

__all__ = [
    "LONG_CONTEXT_PROFILES",
    "Conversation",
    "LongContextProfile",
    "TraceRequest",
    "Turn",
    "iter_conversations",
    "iter_training_text",
    "load_sharegpt_pairs",
    "load_trace",
    "load_trace_meta",
    "make_mixed_trace",
    "make_sharegpt_trace",
    "make_synthetic_long_trace",
    "poisson_arrivals",
    "save_trace",
    "sharegpt_path",
]
