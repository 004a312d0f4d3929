#!/usr/bin/env bash
# Run the vllm-esp checks and test suite (sets the environment up first if needed).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-demo
# shellcheck disable=SC1091
. "${VLLM_ESP_VENV:-.venv}/bin/activate"
bash scripts/lint.sh
exec python -m pytest -q -p no:cacheprovider "$@"
