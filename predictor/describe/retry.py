"""Exponential backoff with jitter, honouring the server's `Retry-After`.

Why jitter: with `--concurrency 8`, eight requests fail together when a pod restarts; without
jitter they would all come back at the same instant, again and again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar

from predictor.describe.errors import Cancelled, RequestFailed, Retryable

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one image.

    attempts: total tries, the first included. base_s: the first backoff; each retry doubles it,
    up to cap_s. A `Retry-After` from the server replaces the backoff (capped at cap_s too, so
    a misconfigured proxy cannot stall the run for an hour).
    """

    attempts: int = 6
    base_s: float = 1.0
    cap_s: float = 60.0

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        if retry_after is not None:
            # A little jitter on top, so that requests told the same time spread out.
            return min(max(retry_after, 0.0), self.cap_s) + rng.uniform(0, self.base_s / 4)
        backoff = min(self.cap_s, self.base_s * 2 ** (retry - 1))
        return backoff / 2 + rng.uniform(0, backoff / 2)  # "equal jitter": grows, never ~0


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - (now or datetime.now(timezone.utc))).total_seconds(), 0.0)


def call_with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    stop: threading.Event,
    label: str,
    rng: random.Random | None = None,
) -> T:
    """Run `call`, retrying on `Retryable` as the policy says.

    Raises `RequestFailed` when the attempts are used up and `Cancelled` when `stop` is set
    during a wait, so Ctrl-C does not sit out a long backoff. Other errors pass through at once.
    """
    rng = rng or random.Random()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Retryable as error:
            if attempt == policy.attempts:
                raise RequestFailed(f"gave up after {attempt} attempts: {error.message}") from error
            wait = policy.delay(attempt, error.retry_after, rng)
            logger.info(
                "%s: %s; retry %d/%d in %.1fs",
                label,
                error.message,
                attempt,
                policy.attempts - 1,
                wait,
            )
            if stop.wait(wait):
                raise Cancelled("interrupted while waiting to retry") from error
    raise AssertionError("unreachable: attempts must be at least 1")
