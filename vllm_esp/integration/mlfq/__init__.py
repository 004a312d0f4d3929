"""The MLFQ schedulers inside vLLM: ``scheduler.py`` (``MLFQScheduler`` and
``MLFQAsyncScheduler``, subclasses of vLLM's schedulers that narrow each
step to the admission plan) and ``queue.py`` (``IndexedRequestQueue``).

May import: vLLM, ``vllm_esp.core``, the shared ``integration`` modules
(``cost_model``, ``metrics``) and ``vllm_esp.integration.swap`` (the
host-swap connector it drives); never ``vllm_esp.integration.esp``.
"""
