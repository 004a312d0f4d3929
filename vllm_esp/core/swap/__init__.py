"""Host KV swap decisions (torch-free): ``book.py`` (``SwapBook``: host slots,
each request's copy state, the step's copies) and ``config.py``
(``SwapConfig``).

May import: ``vllm_esp.core.settings`` and the standard library; not
``core.mlfq`` or ``core.esp`` (they build on it), no torch, no vLLM.
"""
