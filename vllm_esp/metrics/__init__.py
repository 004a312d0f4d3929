"""Prometheus export of the vllm-esp scheduler's queue state."""
