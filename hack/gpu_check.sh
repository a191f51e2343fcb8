#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU benchmark figures (random weights with the real
# Qwen3-VL shapes, bf16 and 4-bit) and the GPU-only tests, in one run of under 10 minutes.
# Writes ${OUT:-gpu-check}/bench-*.json.
#
# Where the dependencies come from:
# - by default, hack/setup.sh's .venv from the package registry, plus the quant extra;
# - with PYTHON=/path/to/python (a Python that already has torch, and no registry in reach):
#   the wheels in ${WHEELS:-gpu-wheels} (made by hack/gpu_wheels.sh on a machine with one)
#   are installed with `pip install --no-index --target ${SITE:-.gpu-site}`, which comes first
#   on PYTHONPATH, so its packages (transformers among them) win over the Python's own. No
#   venv, nothing fetched; the project runs from this working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
SHAPES="${SHAPES:-qwen3-vl-2b qwen3-vl-8b}"
mkdir -p "$OUT"

if [ -n "${PYTHON:-}" ]; then
  WHEELS="${WHEELS:-gpu-wheels}"
  SITE="${SITE:-.gpu-site}"
  "$PYTHON" -c "import torch" || { echo "$PYTHON cannot import torch" >&2; exit 2; }
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run hack/gpu_wheels.sh" >&2; exit 2; }
  stamp="$(ls "$WHEELS"/*.whl | sort | sha256sum | cut -c1-16)"
  if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$stamp" ]; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no index)"
    rm -rf "$SITE"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
      --target "$SITE" "$WHEELS"/*.whl
    echo "$stamp" >"$SITE/.wheels"
  fi
  export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$PWD/$SITE/bin:$PATH"
  RUN="$PYTHON"
else
  EXTRA_PIP_ARGS="${EXTRA_PIP_ARGS:-}" bash hack/setup.sh
  .venv/bin/python -m pip install --quiet -e ".[quant]"
  RUN=.venv/bin/python
fi
"$RUN" - <<'PY' | tee "$OUT/versions.txt"
import sys
from importlib.metadata import version

import predictor
import transformers

print("python", sys.version.split()[0], "predictor from", predictor.__file__)
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "kserve", "bitsandbytes")))
print("transformers from", transformers.__file__)
PY
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
else
  echo "no nvidia-smi on PATH: the benchmark and the GPU tests will find no GPU" | tee "$OUT/gpu.txt"
fi

# A failed benchmark does not stop the GPU tests; the exit status says whether all passed.
failed=0
for shape in $SHAPES; do
  echo "== $shape"
  timeout 240 "$RUN" hack/bench.py --shape "$shape" --json "$OUT/bench-$shape.json" ||
    { echo "benchmark $shape failed (exit $?)"; failed=1; }
done

echo "== GPU-only tests"
"$RUN" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py || failed=1
exit "$failed"
