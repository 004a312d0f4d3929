"""Elastic sequence parallelism decisions (torch-free).

* served by the engine: ``step_plan.py`` (``ESPStepPlan``, one global block
  space, ``local_batch``), ``placement.py`` (elastic placement policies,
  ``ELASTIC_POLICIES``), ``config.py`` (``ESPConfig``);
* library plans, executed by ``vllm_esp.kernels.esp`` in the multi-process
  tests and ``benchmarks/esp_core.py``: ``directory.py`` (which instance
  holds which blocks), ``ring_plan.py`` (striped ring prefill),
  ``decode_plan.py`` (multi-master decode), ``migration_plan.py``.

May import: ``vllm_esp.core`` (including ``core.mlfq`` and ``core.swap``);
no torch, no vLLM.
"""
