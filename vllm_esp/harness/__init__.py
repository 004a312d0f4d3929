"""Drivers shared by the tests and the benchmarks; not part of the serving path.

``scheduler.py`` (real vLLM schedulers fed fabricated model-runner
outputs: ``create_scheduler``, ``make_request``, ``fake_output``, ``step``,
``SwapWorker``), ``engine.py`` (settings and the small model of real-engine
runs), ``offline.py`` (the heavy-preemption workload, an in-process
EngineCore) and ``serve.py`` (the OpenAI server started and awaited).

May import: every layer below it (``integration``, ``kernels``, ``core``)
and ``vllm_esp.data`` / ``vllm_esp.models``; only the entry points
(``cli``, ``demo``, ``calibrate``), tests and benchmarks import it.
"""
