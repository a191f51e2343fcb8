#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in ${VENV:-.venv} and install the
# predictor with its test extra. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torchvision must be the build that matches torch (transformers 5 needs it for Qwen-VL's
# image processors); installing both in one resolver run keeps them paired.
"$VENV/bin/python" -m pip install --quiet -e ".[test]" ${EXTRA_PIP_ARGS:-}
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version

print("installed:", ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "kserve")))
PY
