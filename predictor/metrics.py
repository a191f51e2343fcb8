"""The predictor's Prometheus collectors, exposed on KServe's `/metrics` beside its own.

Why module-level collectors labelled by model name only: label values must stay bounded, and
every route (OIP v2 REST and gRPC, later OpenAI) counts into the same series. All names share
the `qwen_vl_` prefix; Kubernetes manifests and dashboards refer to these exact names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from kserve.errors import InvalidInput
from prometheus_client import Counter, Gauge, Histogram

from predictor.errors import DeadlineExceeded, Unavailable

PREFIX = "qwen_vl"
LABELS = ("model_name",)
OUTCOMES = ("success", "invalid", "rejected", "timeout", "cancelled", "error")

REQUESTS = Counter(
    f"{PREFIX}_requests",
    "Inference requests finished, by outcome: success, invalid (400), rejected (503: queue "
    "full, draining, or engine gone), timeout (504), cancelled (client went away), error (500).",
    (*LABELS, "outcome"),
)
IMAGES = Counter(f"{PREFIX}_images", "Images described.", LABELS)
GENERATED_TOKENS = Counter(f"{PREFIX}_generated_tokens", "Tokens generated.", LABELS)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens", "Prompt tokens processed, image tokens included.", LABELS
)
GENERATION_SECONDS = Histogram(
    f"{PREFIX}_generation_seconds",
    "Time a request spent generating, from its first row's prefill to its last token, in seconds.",
    LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
)
IMAGE_DECODE_SECONDS = Histogram(
    f"{PREFIX}_image_decode_seconds",
    "Time to decode, validate and resize the images of one request, in seconds.",
    LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INPUT_CACHE_HITS = Counter(
    f"{PREFIX}_input_cache_hits",
    "Images found in the input cache (same bytes, same pixel budget): not decoded or "
    "processed again.",
    LABELS,
)
INPUT_CACHE_MISSES = Counter(
    f"{PREFIX}_input_cache_misses",
    "Images looked up in the input cache and not found (decoded and processed, then kept).",
    LABELS,
)
VISION_CACHE_HITS = Counter(
    f"{PREFIX}_vision_cache_hits",
    "Image sets found in the engine's vision cache (the same pixels): not encoded again.",
    LABELS,
)
VISION_CACHE_MISSES = Counter(
    f"{PREFIX}_vision_cache_misses",
    "Image sets looked up in the engine's vision cache and not found (encoded, then kept).",
    LABELS,
)

# Load of the generation engine, for an endpoint picker and an autoscaler.
REQUESTS_WAITING = Gauge(
    f"{PREFIX}_num_requests_waiting",
    "Requests queued, not yet generating.",
    LABELS,
    multiprocess_mode="livemax",
)
REQUESTS_RUNNING = Gauge(
    f"{PREFIX}_num_requests_running",
    "Requests whose images are generating now.",
    LABELS,
    multiprocess_mode="livemax",
)
UTILIZATION = Gauge(
    f"{PREFIX}_utilization",
    "Share of the engine's capacity in use, 0 to 1: (running + waiting rows) / max batch size, "
    "capped at 1. Endpoint pickers use it in place of KV-cache usage.",
    LABELS,
    multiprocess_mode="livemax",  # with several fronts only the engine core sets these
)
REJECTED = Counter(
    f"{PREFIX}_requests_rejected",
    "Requests refused at once because the queue was full (HTTP 503 / gRPC UNAVAILABLE).",
    LABELS,
)
BATCH_SIZE = Histogram(
    f"{PREFIX}_batch_size",
    "Rows (images) decoded together: the running batch at each decoding step.",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
QUEUE_WAIT_SECONDS = Histogram(
    f"{PREFIX}_queue_wait_seconds",
    "Time a row waited in the queue before its batch started, in seconds.",
    LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    f"{PREFIX}_time_to_first_token_seconds",
    "Time from a row's arrival to its first generated token, in seconds.",
    LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def touch(model_name: str) -> None:
    """Create every series of a model at zero, so scrapers see them before the first request."""
    for outcome in OUTCOMES:
        REQUESTS.labels(model_name, outcome)
    for collector in (
        IMAGES,
        GENERATED_TOKENS,
        PROMPT_TOKENS,
        GENERATION_SECONDS,
        IMAGE_DECODE_SECONDS,
        INPUT_CACHE_HITS,
        INPUT_CACHE_MISSES,
        REQUESTS_WAITING,
        REQUESTS_RUNNING,
        UTILIZATION,
        REJECTED,
        BATCH_SIZE,
        QUEUE_WAIT_SECONDS,
        TIME_TO_FIRST_TOKEN_SECONDS,
    ):
        collector.labels(model_name)


def outcome_of(error: BaseException | None) -> str:
    """The `outcome` label of a request that ended with `error` (None: it succeeded)."""
    if error is None:
        return "success"
    for kind, outcome in (
        (InvalidInput, "invalid"),
        (Unavailable, "rejected"),
        (DeadlineExceeded, "timeout"),
        (asyncio.CancelledError, "cancelled"),
    ):
        if isinstance(error, kind):
            return outcome
    return "error"


def count_request(model_name: str, error: BaseException | None) -> None:
    REQUESTS.labels(model_name, outcome_of(error)).inc()


@contextmanager
def counted(model_name: str) -> Iterator[None]:
    """Count the request run inside the block by its outcome (every route uses this)."""
    try:
        yield
    except BaseException as error:
        count_request(model_name, error)
        raise
    count_request(model_name, None)


@contextmanager
def counted_rejection(model_name: str) -> Iterator[None]:
    """Count a refusal that happens before a request reaches `counted` (REST admission)."""
    try:
        yield
    except Unavailable as error:
        count_request(model_name, error)
        raise
