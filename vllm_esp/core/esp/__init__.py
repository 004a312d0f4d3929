"""Elastic sequence parallelism decisions (torch-free).

* the engine's step: ``step_plan.py`` (``ESPStepPlan``, one global block
  space, ``local_batch``: each instance's rows, stores, ships, queries and
  striped rings), ``placement.py`` (elastic placement policies,
  ``ELASTIC_POLICIES``), ``config.py`` (``ESPConfig``);
* LoongServe's scheduler and the cluster model: ``cluster.py``
  (``ClusterView``/``ClusterPlan``), ``loong/`` (the four steps),
  ``baselines.py``, ``cost_model.py`` / ``cost_fit.py`` / ``profiles/``,
  ``registry.py``.

May import: ``vllm_esp.core`` (including ``core.mlfq`` and ``core.swap``);
no torch, no vLLM.
"""
