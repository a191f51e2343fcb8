#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU benchmark figures (random weights with the real
# Qwen3-VL shapes, bf16 and 4-bit) and the GPU-only tests, in one run of under 10 minutes.
# Installs the package with its quant extra first. Writes ${OUT:-gpu-check}/bench-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
SHAPES="${SHAPES:-qwen3-vl-2b qwen3-vl-8b}"
mkdir -p "$OUT"

EXTRA_PIP_ARGS="${EXTRA_PIP_ARGS:-}" bash hack/setup.sh
.venv/bin/python -m pip install --quiet -e ".[quant]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

for shape in $SHAPES; do
  echo "== $shape"
  timeout 240 .venv/bin/python hack/bench.py --shape "$shape" --json "$OUT/bench-$shape.json"
done

echo "== GPU-only tests"
.venv/bin/python -m pytest -m gpu -q tests
