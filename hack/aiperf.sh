#!/usr/bin/env bash
# Install NVIDIA's aiperf in a virtual environment of its own and print its executable's path.
#
# aiperf pulls in heavy dependencies (its own pydantic, zmq, textual, ...) that must not change
# the project's environment, so it gets its own venv. Idempotent: an existing install of the
# same version is reused.
#
# Usage: bash hack/aiperf.sh                  -> prints .../bin/aiperf
#        AIPERF_VENV=/opt/aiperf bash hack/aiperf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AIPERF_VENV:-$PWD/.cache/aiperf-venv}"
VERSION="${AIPERF_VERSION:-0.13.0}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/aiperf" ] && [ "$("$VENV/bin/aiperf" --version 2>/dev/null | tail -1)" = "$VERSION" ]; then
    echo "$VENV/bin/aiperf"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "aiperf==$VERSION" >&2
"$VENV/bin/aiperf" --version >&2
echo "$VENV/bin/aiperf"
