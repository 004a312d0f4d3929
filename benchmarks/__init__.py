"""Benchmarks of vllm-esp: JCT on a replayed ShareGPT trace and scheduler overhead.

Run each as a module from the repository root, e.g.
``python -m benchmarks.jct --quick --out benchmarks/results/jct_quick_cpu.json``.
Shared helpers (run metadata, JSON writing, percentiles) live in
:mod:`benchmarks.common`.
"""
