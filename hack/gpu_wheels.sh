#!/usr/bin/env bash
# On a machine with a package registry: prepare ${WHEELS:-gpu-wheels}, the wheel folder that
# `PYTHON=... bash hack/gpu_check.sh` installs on a GPU machine without one (pip --no-index
# --target; no venv, no registry). That machine has a Python ${PY_VERSION:-3.12} with torch,
# torchvision, transformers (older than this project needs), numpy, pillow, prometheus-client,
# grpcio, httpx, uvloop, protobuf, psutil and pandas; the wheels are everything else the
# server, hack/bench.py and the GPU tests import, each for that Python and platform, without
# their dependencies (the list below is the closure, checked by the offline rehearsal).
# bitsandbytes is trimmed to its CPU and CUDA ${BNB_CUDA:-130} libraries, so the folder and the
# working tree fit the 64 MiB a device call carries. Idempotent: downloads only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-gpu-wheels}"
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"
BNB_CUDA="${BNB_CUDA:-130}"
# Pinned to a set the suite passes with (pip resolves nothing here: --no-deps).
PACKAGES=(
  # the model stack, newer than the machine's
  transformers==5.24.0 huggingface-hub==1.33.0  # 2.x needs httpx2
  # transformers 5.24 checks these at import; the machine's may be older (5.17 needed less)
  tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19
  # KServe's model server and what it imports
  kserve==0.21.0 kubernetes==37.0.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
  pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  orjson==3.13.0 pybase64==1.5.1 httptools==0.9.0 watchfiles==1.3.0 websockets==17.4 websocket-client==1.9.2
  oauthlib==4.0.1 requests-oauthlib==2.0.0 cloudevents==1.13.0 python-multipart==0.0.34
  grpc-interceptor==0.15.4 opentelemetry-api==1.45.2 deprecation==2.1.0 timing-asgi==0.3.2
  durationpy==0.11 tabulate==0.10.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
  # the GPU tests
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
  # 4-bit and 8-bit loading (--quantization)
  bitsandbytes==0.50.2 accelerate==1.16.0  # transformers loads bitsandbytes layers through accelerate
  # guided decoding (about 4.6 MB); its triton comes with the machine's CUDA torch
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
)
mkdir -p "$WHEELS"
echo "downloading wheels for CPython $PY_VERSION, manylinux x86_64, into $WHEELS"
"$PYTHON" -m pip download --quiet --only-binary=:all: --no-deps \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$WHEELS" "${PACKAGES[@]}"

# bitsandbytes ships one library per CUDA and ROCm release (about 43 MB): keep CUDA $BNB_CUDA
# and the CPU one.
"$PYTHON" -m wheel version >/dev/null 2>&1 || "$PYTHON" -m pip install --quiet wheel
for wheel in "$WHEELS"/bitsandbytes-*.whl; do
  [ -e "$wheel" ] || continue
  if "$PYTHON" -m zipfile -l "$wheel" | grep "libbitsandbytes_" | grep -v "_cpu\." |
    grep -vq "_cuda${BNB_CUDA}\."; then
    work=$(mktemp -d)
    "$PYTHON" -m wheel unpack --dest "$work" "$wheel" >/dev/null
    find "$work" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cpu.*' \
      ! -name "libbitsandbytes_cuda${BNB_CUDA}.*" -delete
    rm "$wheel"
    "$PYTHON" -m wheel pack --dest-dir "$WHEELS" "$work"/bitsandbytes-* >/dev/null
    rm -rf "$work"
    echo "trimmed $(basename "$wheel") to its CPU and CUDA $BNB_CUDA libraries"
  fi
done
ls "$WHEELS" | sed 's/^/  /'
echo "wheel folder: $(du -sh "$WHEELS" | cut -f1) in $(ls "$WHEELS" | wc -l) wheels"
