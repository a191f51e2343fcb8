"""What can go wrong with one image, sorted by what the client should do about it.

Why classes rather than status codes: REST, gRPC (and later OpenAI) report the same situations
differently. Each protocol client translates its own codes into these once, so the retry loop
and the runner decide without knowing which protocol ran.
"""

from __future__ import annotations


class DescribeError(Exception):
    """Base class; the message is what the user reads."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Retryable(DescribeError):
    """The server is busy, restarting or unreachable: try the same request again later."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ImageRejected(DescribeError):
    """The server refused this image (HTTP 400 / INVALID_ARGUMENT naming `image[i]`).

    Sending it again gives the same answer, so it is recorded in the JSONL manifest and not
    retried on resume unless asked.
    """


class RequestFailed(DescribeError):
    """This image failed for another reason (HTTP 500, retries exhausted, unreadable file).

    Not recorded: a later run tries it again.
    """


class Fatal(DescribeError):
    """No image can succeed (wrong model name or URL, refused credentials, a bad flag).

    The run stops at the first one rather than failing every image the same way.
    """


class Cancelled(DescribeError):
    """The run was interrupted while this image waited to be retried."""
