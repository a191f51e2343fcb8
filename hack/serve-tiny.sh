#!/usr/bin/env bash
# Install the predictor, build the tiny random-weight Qwen3-VL checkpoint (once) and serve it:
# REST on ${HTTP_PORT:-8080}, gRPC on ${GRPC_PORT:-8081}. Extra arguments go to the predictor.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TINY_MODEL_DIR="${TINY_MODEL_DIR:-${TMPDIR:-/tmp}/qwen-vl-tiny}"
FAMILY="${FAMILY:-qwen3-vl}"

bash hack/setup.sh
if [ ! -f "$TINY_MODEL_DIR/config.json" ]; then
  "$VENV/bin/python" hack/make_tiny_model.py "$TINY_MODEL_DIR" --family "$FAMILY"
fi
exec "$VENV/bin/python" -m predictor --model_dir "$TINY_MODEL_DIR" \
  --http_port "${HTTP_PORT:-8080}" --grpc_port "${GRPC_PORT:-8081}" "$@"
