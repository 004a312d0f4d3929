#!/usr/bin/env bash
# Serve a model on two ESP instances (model replicas, one KV cache each)
# behind vLLM's OpenAI-compatible API.
#
#   bash examples/serve_esp.sh [MODEL]
#
# Add --esp-config '{"backend": "ray", "ray_address": "auto"}' to place the
# instances on a running Ray cluster instead of local processes.
set -euo pipefail
MODEL=${1:-$(python -m vllm_esp.models build --preset default | tail -n 1)}
exec vllm-esp serve "$MODEL" \
  --scheduler esp --esp-instances 2 \
  --esp-config '{"prefill_target_ms": 250, "migrate_blocks_per_step": 4}' \
  --max-num-seqs 16 --max-model-len 3072 --block-size 32 \
  --gpu-memory-utilization 0.3 --kv-cache-memory-bytes $((12 << 20)) \
  --port 8000
# Then:
#   curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
#        -d '{"model": "'"$MODEL"'", "prompt": "Hello", "max_tokens": 16}'
#   curl -s localhost:8000/metrics | grep vllm_esp:esp_
