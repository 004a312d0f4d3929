"""Torch executors of elastic sequence parallelism, one per instance.

``group.py`` (``InstanceGroup``: point-to-point exchanges in one process
group; ``InstanceCluster``: local gloo processes for tests and benchmarks)
and ``sampler.py`` serve the engine's ESP step as well. ``ring_prefill.py``,
``decode.py`` and ``migrate.py`` execute the library plans of
``vllm_esp.core.esp`` (``ring_plan``, ``decode_plan``, ``migration_plan``);
the multi-process tests and ``benchmarks/esp_core.py`` run them.

May import: torch, ``vllm_esp.core`` and ``vllm_esp.kernels.attention``;
never vLLM.
"""
