#!/usr/bin/env bash
# A local cluster for the dev overlay, for users with Docker: kind, cert-manager, KServe (Standard
# mode), the Gateway API and Inference Extension CRDs, the predictor's CPU image built and loaded
# into kind, and `kubectl apply -k kustomize/overlays/dev`. Idempotent: re-running skips what is
# there and re-applies the rest. WITH_ISTIO=1 also installs Istio with the inference extension
# (istioctl must be on PATH) for trying the gateway-istio / inference-pool components.
#
#   bash hack/kind_up.sh                       # then: see the port-forward line it prints
#   CLUSTER_NAME=qv WITH_ISTIO=1 bash hack/kind_up.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER_NAME="${CLUSTER_NAME:-qwen-vl}"
CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.19.1}"
KSERVE_VERSION="${KSERVE_VERSION:-v0.21.0}"
# The versions of the CRD schemas the manifests are validated against (hack/crds/SOURCES.md).
GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.6.1}"
INFERENCE_EXTENSION_VERSION="${INFERENCE_EXTENSION_VERSION:-v1.6.0}"
WITH_ISTIO="${WITH_ISTIO:-0}"
IMAGE="${IMAGE:-ghcr.io/qwen-vl-predictor/qwen-vl-predictor:0.1.0-cpu}"
OVERLAY="${OVERLAY:-kustomize/overlays/dev}"
NAMESPACE="${NAMESPACE:-qwen-vl-dev}"

log() { printf '\n== %s\n' "$*"; }
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "kind_up.sh needs $tool on PATH" >&2; exit 1; }
  done
}
need docker kind kubectl

log "kind cluster $CLUSTER_NAME"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  kind create cluster --name "$CLUSTER_NAME" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null

log "cert-manager $CERT_MANAGER_VERSION (KServe's webhooks need certificates)"
kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/$CERT_MANAGER_VERSION/cert-manager.yaml"
kubectl -n cert-manager wait --for=condition=Available deployment --all --timeout=300s

log "Gateway API $GATEWAY_API_VERSION and Inference Extension $INFERENCE_EXTENSION_VERSION CRDs"
kubectl apply --server-side -f "https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API_VERSION/standard-install.yaml"
kubectl apply --server-side -f "https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/$INFERENCE_EXTENSION_VERSION/manifests.yaml"

if [ "$WITH_ISTIO" = 1 ]; then
  need istioctl
  log "Istio with the Gateway API inference extension"
  istioctl install -y --set profile=minimal \
    --set values.pilot.env.ENABLE_GATEWAY_API_INFERENCE_EXTENSION=true
fi

log "KServe $KSERVE_VERSION, Standard deployment mode"
kubectl apply --server-side -f "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve.yaml"
kubectl -n kserve wait --for=condition=Available deployment/kserve-controller-manager --timeout=300s
kubectl apply --server-side -f "https://github.com/kserve/kserve/releases/download/$KSERVE_VERSION/kserve-cluster-resources.yaml"

log "image $IMAGE (CPU variant) into kind"
docker build --build-arg VARIANT=cpu -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"

log "kubectl apply -k $OVERLAY"
kubectl apply -k "$OVERLAY"
echo "waiting for the model (download + load on CPU can take 10+ minutes)"
kubectl -n "$NAMESPACE" wait --for=condition=Ready inferenceservice/qwen-vl --timeout=1800s

log "ready"
echo "kubectl -n $NAMESPACE port-forward svc/qwen-vl-predictor 8080:80"
echo "curl localhost:8080/v2/models/qwen-vl/ready"
