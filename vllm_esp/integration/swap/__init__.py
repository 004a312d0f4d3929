"""Host-memory KV swap for preemption (scheduler ``mlfq-swap``) inside vLLM.

``connector.py`` holds ``HostSwapConnector``, an out-of-tree vLLM KV
connector: its scheduler half keeps the torch-free
:class:`~vllm_esp.core.swap.book.SwapBook`, its worker half runs the
copies with :class:`~vllm_esp.kernels.swap_copy.SwapCopyEngine`.

May import: vLLM, ``vllm_esp.kernels`` and ``vllm_esp.core``; not the
``mlfq`` or ``esp`` integration packages (they build on it).
"""
