"""The predictor's client-facing errors.

Why a subclass of KServe's `InvalidInput`: KServe already maps that one exception to HTTP 400
and gRPC INVALID_ARGUMENT in one place, so every bad input raised anywhere in the predictor
gets the same status on every route without a second error table.
"""

from __future__ import annotations

from kserve.errors import InvalidInput


class InvalidRequest(InvalidInput):
    """A request the client must change; the message starts with the field it names."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class StartupError(RuntimeError):
    """The server cannot start with these settings (missing model, package or device)."""
