#!/usr/bin/env bash
# Static checks CI runs before the tests: lint, format, types, import layering.
#   bash scripts/lint.sh        (inside the venv that scripts/setup.sh made)
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check vllm_esp tests benchmarks examples
ruff format --check vllm_esp tests benchmarks examples
mypy
lint-imports --no-logo
