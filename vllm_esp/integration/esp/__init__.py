"""Elastic sequence parallelism inside vLLM (``--scheduler esp``).

EngineCore side: ``scheduler.py`` (``ESPScheduler``: placement and the step
plan), ``free_queues.py`` (per-instance free-block queues),
``executor.py`` (``ESPExecutor``: N instances as one worker) and
``instances.py`` (local processes or Ray actors). Instance side:
``worker.py`` (vLLM's workers plus the ESP RPCs), ``runner.py``
(``ESPStepRunner``), ``step_context.py`` (per-layer exchanges and
distributed attention), ``attention_backend.py`` and ``host_swap.py``.

May import: vLLM, torch, Ray (lazily), ``vllm_esp.kernels``,
``vllm_esp.core``, the shared ``integration`` modules and the ``mlfq`` and
``swap`` integration packages (ESP builds on both).
"""
