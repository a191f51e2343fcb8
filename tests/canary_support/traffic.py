"""Test traffic: client threads sending OIP v2 requests of a chosen cost to chosen predictors.

Cost is `max_new_tokens`: on the tiny model each token is a fixed slice of CPU time, so a
request's latency grows with it. A `Route` picks, per request, which predictor answers and how
long the answer is: a fixed one, or a gateway that splits by the weights a stand-in cluster
holds right now.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.live_server import infer_body

# (backend label, infer URL, max_new_tokens) of the next request.
Route = Callable[[], tuple[str, str, int]]


def fixed(label: str, infer_url: str, max_new_tokens: int) -> Route:
    return lambda: (label, infer_url, max_new_tokens)


@dataclass
class Stream:
    """`clients` threads, each sending `route()`'s requests one after another."""

    route: Route
    clients: int = 1
    requests: int | None = None  # per client; None: until the duration ends
    # Pause after a refused or failed request, as a client honouring Retry-After would (briefly).
    pause_after_error_s: float = 0.05


def drive(
    streams: list[Stream],
    duration_s: float,
    picture: bytes,
    stop: threading.Event | None = None,
) -> Counter[tuple[str, int]]:
    """Run every stream at once until `duration_s`, `stop` or their request counts; count answers.

    Returns (backend label, HTTP status) -> count; a client-side timeout counts as status 0.
    """
    tally: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + duration_s

    def client(stream: Stream) -> None:
        sent = 0
        with httpx.Client(timeout=60) as http:
            while (
                time.monotonic() < deadline
                and not (stop and stop.is_set())
                and (stream.requests is None or sent < stream.requests)
            ):
                label, url, tokens = stream.route()
                try:
                    status = http.post(url, json=infer_body(picture, tokens)).status_code
                except httpx.HTTPError:
                    status = 0
                sent += 1
                with lock:
                    tally[(label, status)] += 1
                if status != 200:
                    time.sleep(stream.pause_after_error_s)

    threads = [
        threading.Thread(target=client, args=(s,), daemon=True)
        for s in streams
        for _ in range(s.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


@dataclass(frozen=True)
class Backend:
    label: str
    infer_url: str
    max_new_tokens: int


def weighted(
    canary_share: Callable[[], float], stable: Backend, canary: Backend, seed: int
) -> Route:
    """A gateway: each request goes to the canary with the share the cluster holds right now."""
    rng = random.Random(seed)

    def route() -> tuple[str, str, int]:
        chosen = canary if rng.random() < canary_share() else stable
        return chosen.label, chosen.infer_url, chosen.max_new_tokens

    return route


def pool_share(route: dict) -> float:
    """The canary pool's share of an HTTPRoute whose first rule splits two pools."""
    refs = {r["name"]: r.get("weight", 1) for r in route["spec"]["rules"][0]["backendRefs"]}
    total = sum(refs.values())
    return refs["qwen-vl-canary"] / total if total else 0.0


def knative_share(isvc: dict) -> float:
    """The newest revision's share, as KServe reports it in the InferenceService's status."""
    traffic = isvc["status"]["components"]["predictor"]["traffic"]
    latest = next(t for t in traffic if t.get("latestRevision"))
    return latest["percent"] / 100
