"""Everything that touches vLLM: subclasses, wrappers, hooks and runtime patches.

``engine_args.py`` (the plugin's CLI flags, ``scheduler_args``),
``cost_model.py`` (which calibration an engine loads), ``metrics.py`` (the
``/metrics`` stat logger), ``patches/`` (runtime forms of ``patches/*.patch``)
and one package per capability: ``mlfq/`` (``MLFQScheduler``), ``swap/``
(``HostSwapConnector``) and ``esp/`` (scheduler, executor, workers,
attention backend).

May import: vLLM, torch, ``vllm_esp.kernels`` and ``vllm_esp.core``
(``esp`` may use ``mlfq`` and ``swap``, ``mlfq`` may use ``swap``); never
``vllm_esp.harness``, ``vllm_esp.data`` or ``vllm_esp.models``.
"""
