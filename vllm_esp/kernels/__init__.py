"""Torch code that moves and attends over KV, without vLLM.

``attention/`` (partial attention with its log-sum-exp over vLLM's paged
layouts, and the exact merge), ``swap_copy.py`` (``SwapCopyEngine``: the
host-swap copies) and ``esp/`` (the ESP process group, ring prefill,
multi-master decode, migration, sampling).

May import: torch (and Triton, lazily) and ``vllm_esp.core``; never vLLM or
Ray: kernels read vLLM's KV layouts from the tensors they are handed.
"""
