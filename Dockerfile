# syntax=docker/dockerfile:1
# The qwen-vl-predictor image, two variants from one file:
#   docker build -t ghcr.io/qwen-vl-predictor/qwen-vl-predictor:0.1.0 .
#   docker build --build-arg VARIANT=cpu -t ghcr.io/qwen-vl-predictor/qwen-vl-predictor:0.1.0-cpu .
# VARIANT=cuda (default): CUDA runtime base, CUDA build of PyTorch, the `quant` extra
# (bitsandbytes, for --quantization 4bit|8bit). VARIANT=cpu: plain Ubuntu and CPU PyTorch, for the
# dev overlay. Stages: base-<variant> (OS + Python) -> builder (virtualenv) -> runtime.

ARG VARIANT=cuda

FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS base-cuda
# PyTorch's CUDA 13.0 wheels, matching the base image's CUDA runtime.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
    PACKAGE_EXTRAS=quant

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PACKAGE_EXTRAS=

FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu 24.04's Python 3.12 (the package needs 3.10+); wheels bring their own native libraries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM base AS builder
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch and torchvision first, from the variant's index and as one pair (torchvision must be the
# build that matches torch); the package's own `torch>=...` is then already satisfied.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url "$TORCH_INDEX_URL" \
      "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY predictor ./predictor
RUN pip install ".${PACKAGE_EXTRAS:+[$PACKAGE_EXTRAS]}"

FROM base AS runtime
# uid/gid 1000 (the manifests' runAsUser/fsGroup); Ubuntu's own "ubuntu" user holds 1000 first.
# /mnt/models is where KServe's storage initializer puts storageUri; /var/cache/qwen-vl holds the
# Hugging Face and kernel caches (a writable emptyDir in Kubernetes, where / is read-only).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 app \
 && useradd --uid 1000 --gid 1000 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /mnt/models /var/cache/qwen-vl \
 && chown 1000:1000 /mnt/models /var/cache/qwen-vl
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/var/cache/qwen-vl/huggingface \
    XDG_CACHE_HOME=/var/cache/qwen-vl
USER 1000:1000
WORKDIR /home/app
# REST (Open Inference Protocol v2, /metrics) and gRPC.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "predictor"]
CMD ["--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
