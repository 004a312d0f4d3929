"""Benchmarks of vllm-esp: JCT (real and simulated), scheduler overhead, swap, ESP.

Run each as a module from the repository root, e.g.
``python -m benchmarks.jct --quick --out benchmarks/results/jct_quick_cpu.json``.
Shared helpers (run metadata, JSON writing, percentiles) live in
:mod:`benchmarks.common`.
"""
