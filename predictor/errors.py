"""The predictor's client-facing errors.

Why a subclass of KServe's `InvalidInput`: KServe already maps that one exception to HTTP 400
and gRPC INVALID_ARGUMENT in one place, so every bad input raised anywhere in the predictor
gets the same status on every route without a second error table.
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput, ServerNotReady

RETRY_AFTER_S = 1


class InvalidRequest(InvalidInput):
    """A request the client must change; the message starts with the field it names."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class StartupError(RuntimeError):
    """The server cannot start with these settings (missing model, package or device)."""


class Unavailable(ServerNotReady):
    """Refused for now by this replica (HTTP 503 + Retry-After, gRPC UNAVAILABLE); the client
    may retry here later or on another replica. `code` names the reason on the OpenAI route."""

    code = "unavailable"

    def __init__(self, message: str):
        super().__init__()
        # KServe's gRPC interceptor reads `reason`, its REST handler `str()`: set both.
        self.error_msg = self.reason = message
        self.retry_after_s = RETRY_AFTER_S


class QueueFull(Unavailable):
    """The queue is full: refuse now, never time out."""

    code = "queue_full"

    def __init__(self, waiting: int):
        super().__init__(
            f"server overloaded: {waiting} requests waiting; retry after {RETRY_AFTER_S} s"
        )


class ShuttingDown(Unavailable):
    """The server is draining before it exits: new work is refused, and work still running
    when `--drain_timeout_s` runs out is ended with this error."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__(f"server shutting down; retry after {RETRY_AFTER_S} s")


class ModelUnavailable(Unavailable):
    """A request for a model that cannot serve now (not loaded, or unloaded): refused, never
    loaded from the request path (models load at start-up only, see `predictor.server.health`)."""

    code = "model_not_ready"

    def __init__(self, model_name: str, why: str = "is not loaded") -> None:
        super().__init__(f"model {model_name} {why}; retry after {RETRY_AFTER_S} s")


class OutOfDeviceMemory(Unavailable):
    """The device ran out of memory on this request's rows (its images in the vision encoder,
    its prefill alone, or its rows evicted from a full decoding batch): 503 with Retry-After,
    gRPC UNAVAILABLE. The server goes on, and the same request may fit later or elsewhere."""

    code = "out_of_memory"

    def __init__(self, where: str):
        super().__init__(f"out of device memory {where}; retry after {RETRY_AFTER_S} s")
        self.where = where


class DeadlineExceeded(GrpcException):
    """The request ran past --request_timeout_s (HTTP 504, gRPC DEADLINE_EXCEEDED)."""

    status_code = StatusCode.DEADLINE_EXCEEDED

    def __init__(self, timeout_s: float):
        super().__init__(details=f"request did not finish within {timeout_s:g} s")
        self.reason = self.details


class EngineUnavailable(Unavailable):
    """The engine process is gone: requests it held, and new ones, fail at once while the
    server reports itself not ready and not live."""

    code = "engine_unavailable"

    def __init__(self, detail: str = "the engine process exited"):
        super().__init__(f"model engine unavailable: {detail}")


class RepositoryDisabled(GrpcException):
    """A model repository call while `--enable_model_repository` is off (HTTP 403, gRPC
    PERMISSION_DENIED): without it, anyone who reaches the port could unload the model."""

    status_code = StatusCode.PERMISSION_DENIED

    def __init__(self) -> None:
        super().__init__(
            details="the model repository endpoints are disabled on this server "
            "(--enable_model_repository)"
        )
        self.reason = self.details

    def __str__(self) -> str:
        return self.details
