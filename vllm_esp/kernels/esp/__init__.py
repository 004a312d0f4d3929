"""Torch pieces of the engine's ESP step, one per instance.

``group.py`` (``InstanceGroup``: batched point-to-point exchanges in one
process group; ``InstanceCluster``: local gloo processes for the
multi-process tests and the ring-hop profiler of ``vllm_esp.calibrate``)
and ``sampler.py`` (one request's next token, seeded so that any instance
draws the same). The step itself is ``vllm_esp.integration.esp``'s.

May import: torch, ``vllm_esp.core`` and ``vllm_esp.kernels.attention``;
never vLLM.
"""
