"""The predictor's Prometheus collectors, exposed on KServe's `/metrics` beside its own.

Why module-level collectors labelled by model name only: label values must stay bounded, and
every route (OIP v2 REST and gRPC, later OpenAI) counts into the same series. All names share
the `qwen_vl_` prefix; Kubernetes manifests and dashboards refer to these exact names.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PREFIX = "qwen_vl"
LABELS = ("model_name",)
OUTCOMES = ("success", "invalid", "error")

REQUESTS = Counter(
    f"{PREFIX}_requests",
    "Inference requests finished, by outcome (success, invalid = client error, error).",
    (*LABELS, "outcome"),
)
IMAGES = Counter(f"{PREFIX}_images", "Images described.", LABELS)
GENERATED_TOKENS = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.", LABELS)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens", "Prompt tokens processed, image tokens included.", LABELS
)
GENERATION_SECONDS = Histogram(
    f"{PREFIX}_generation_seconds",
    "Time of one generate call (one batch of images), in seconds.",
    LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
)
IMAGE_DECODE_SECONDS = Histogram(
    f"{PREFIX}_image_decode_seconds",
    "Time to decode, validate and resize the images of one request, in seconds.",
    LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
