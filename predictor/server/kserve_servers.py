"""KServe's REST and gRPC servers with the predictor's limits, logging and health.

Why subclasses: KServe's `ModelServer.start()` builds its `RESTServer` (the uvicorn config)
and `GRPCServer` (the interceptors and channel options) itself, with no way to pass either.
`install()` puts these subclasses where `ModelServer.start()` looks them up, so everything
else of KServe's start-up (routes, signal handling, the model registry) stays KServe's:

- REST: uvicorn runs `predictor.server.admission`'s protocol (the door that answers 503 when the
  engine is full, and `predictor.server.http_limits`' header size limit, header and body deadlines),
  and KServe's logging exception handlers are replaced by quiet ones (`predictor.server.logs`);
- gRPC: the door (`predictor.server.grpc_door`) comes first among the interceptors; KServe's
  exception interceptor, which logs a traceback for every rejected call, becomes one that
  logs a refusal as one WARNING line (a traceback only for INTERNAL), and a cancelled call as
  one INFO line; the HTTP/2 handshake must finish within the header deadline. Metadata size
  keeps grpcio's own limits (8 KiB soft, 16 KiB hard: RESOURCE_EXHAUSTED).

Both servers also take their part in the drain (`predictor.server.drain`): `begin_drain` at
the signal, `finish` once the requests they accepted are answered.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent import futures
from typing import Any

from grpc import StatusCode, aio
from grpc_interceptor import AsyncExceptionToStatusInterceptor
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import (
    InferenceError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer
from timing_asgi import TimingMiddleware

from predictor.server.admission import Door, check_uvicorn, door_protocol
from predictor.server.grpc_door import GrpcDoor
from predictor.server.grpc_model_config import model_config_handler
from predictor.server.health import GuardedRepository, HealthDataPlane
from predictor.server.http_limits import ClientLimits
from predictor.server.logs import RequestLogMiddleware, install_quiet_exception_handlers, one_line
from predictor.server.request_limits import request_bytes_limit
from predictor.server.rest_drain import DrainingServer
from predictor.settings import Settings

logger = logging.getLogger(__name__)
REST_EXIT_S = 5.0  # for the connections still open when the listener closes (1 s each at most)
requests_logger = logging.getLogger("predictor.requests")  # one line per refused call

# KServe's own mapping (kserve/protocol/grpc/interceptors.py), minus its logging.
_GRPC_STATUSES: tuple[tuple[tuple[type[BaseException], ...], StatusCode], ...] = (
    ((InferenceError, InvalidInput, UnsupportedProtocol), StatusCode.INVALID_ARGUMENT),
    ((ServerNotReady, ServerNotLive, ModelNotReady), StatusCode.UNAVAILABLE),
    ((NotImplementedError,), StatusCode.UNIMPLEMENTED),
    ((ModelNotFound,), StatusCode.NOT_FOUND),
)


def grpc_status_of(error: BaseException) -> tuple[StatusCode, str] | None:
    """The status and message a refused call gets (None: an unexpected failure)."""
    if isinstance(error, GrpcException):
        return error.status_code, error.details
    for kinds, status in _GRPC_STATUSES:
        if isinstance(error, kinds):
            return status, getattr(error, "reason", None) or str(error)
    return None


def _where(request: Any, method_name: str) -> str:
    request_id = getattr(request, "id", "") or "-"
    model = getattr(request, "model_name", "") or getattr(request, "name", "") or "-"
    return f"request {one_line(request_id)} model {one_line(model)} grpc {method_name}"


class QuietExceptionToStatusInterceptor(AsyncExceptionToStatusInterceptor):
    """Maps exceptions to gRPC statuses like KServe's, with one log line per refusal."""

    async def intercept(self, method, request_or_iterator, context, method_name) -> Any:
        try:
            return await super().intercept(method, request_or_iterator, context, method_name)
        except asyncio.CancelledError:
            requests_logger.info(
                "%s: cancelled (the client left or its deadline passed)",
                _where(request_or_iterator, method_name),
            )
            raise

    async def handle_exception(self, ex, request_or_iterator, context, method_name) -> Any:
        where = _where(request_or_iterator, method_name)
        refusal = grpc_status_of(ex)
        if refusal is None:
            requests_logger.error("%s: INTERNAL", where, exc_info=ex)
            await context.abort(StatusCode.INTERNAL, "Internal server error")
            raise ex  # abort() raises; not reached
        status, message = refusal
        requests_logger.warning("%s: %s %s", where, status.name, one_line(message))
        await context.abort(status, message)


class LimitedRESTServer(RESTServer):
    """KServe's REST server on the limited uvicorn protocol with the door, and quiet
    exception handlers."""

    client_limits = ClientLimits()
    door: Door | None = None
    latency_logging = True  # KServe's --enable_latency_logging
    reuse_port = False  # several front processes on one port (predictor.server.fronts)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config.http = door_protocol(self.client_limits, self.door)
        self._server = DrainingServer(self.config)

    async def start(self) -> None:
        """KServe's start, on a listening socket of our own with SO_REUSEPORT when several
        fronts share the port (uvicorn binds without it)."""
        if not self.reuse_port:
            await super().start()
            return
        self.create_application()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.config.host, self.config.port))
        logger.info("REST listening on port %d with SO_REUSEPORT", self.config.port)
        await self._server.serve(sockets=[listener])

    def begin_drain(self, grace_s: float) -> None:
        """Connection: close on every response from now on; idle kept-alive ones close."""
        self._server.begin_drain()

    async def finish(self) -> None:
        """Close the listener last (`predictor.server.rest_drain`) and wait for the exit."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._server.exited.wait(), REST_EXIT_S)
        except TimeoutError:
            logger.warning("REST connections open %g s after the listener closed", REST_EXIT_S)

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        install_quiet_exception_handlers(app)

    def _add_middlewares(self, app: Any) -> None:
        """KServe's, with its timing log's metric names escaped: they are built from the
        request path, and a path with an encoded newline would forge a log line.

        KServe adds that timing middleware whether latency logging is on or not; off (this
        server's default), it is removed: it called `getrusage` twice a request (a walk over
        every thread of the process) and matched the path against every route again, about
        a tenth of the event loop's time per request, for two log lines nobody asked for."""
        super()._add_middlewares(app)
        if not self.latency_logging:
            app.user_middleware[:] = [
                m for m in app.user_middleware if m.cls is not TimingMiddleware
            ]
        for middleware in app.user_middleware:
            if middleware.cls is TimingMiddleware:
                namer = middleware.kwargs["metric_namer"]
                middleware.kwargs["metric_namer"] = lambda scope, namer=namer: one_line(
                    namer(scope)
                )


class QuietGRPCServer(GRPCServer):
    """KServe's gRPC server (its `start`, unchanged but for interceptors, options and Triton's
    `ModelConfig` method)."""

    handshake_timeout_s = 10.0
    door: GrpcDoor | None = None
    _stopping: asyncio.Task | None = None  # the stop the drain began

    async def start(self, max_workers: int) -> None:
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        door = () if self.door is None else (self.door,)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(*door, LoggingInterceptor(), QuietExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                (
                    "grpc.max_receive_message_length",
                    self._kwargs.get("grpc_max_receive_message_length"),
                ),
                ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        # Triton's ModelConfig beside KServe's methods (predictor.server.grpc_model_config).
        self._server.add_generic_rpc_handlers((model_config_handler(self._data_plane),))
        listen_addr = f"[::]:{self._port}"
        self._server.add_insecure_port(listen_addr)
        logger.info("Starting gRPC server on %s with %d workers", listen_addr, max_workers)
        await self._server.start()
        await self._server.wait_for_termination()

    def begin_drain(self, grace_s: float) -> None:
        """Stop the server now, letting the calls in progress finish for up to `grace_s`.

        grpc.aio's `stop(grace)` is the one way to send HTTP/2 GOAWAY: it closes the listener
        and tells every connection to go away, so clients' channels reconnect (elsewhere,
        behind a load balancer) and their new calls never reach this process. A call that
        reaches it in the instant it stops, before the event loop picked it up, is cancelled
        by grpc itself, unprocessed (docs/shutdown.md: the known limit)."""
        if self._server is not None and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._server.stop(grace_s))

    async def finish(self) -> None:
        """Wait for the calls in progress to end (they did, if the drain is over)."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)


def install(
    kserve_model_server: Any,
    limits: ClientLimits,
    door: Door | None = None,
    grpc_door: GrpcDoor | None = None,
    latency_logging: bool = True,
) -> None:
    """Make `kserve.model_server.ModelServer.start()` build these servers with `limits` and
    their doors."""
    check_uvicorn()
    LimitedRESTServer.client_limits = limits
    LimitedRESTServer.door = door
    LimitedRESTServer.latency_logging = latency_logging
    QuietGRPCServer.door = grpc_door
    QuietGRPCServer.handshake_timeout_s = limits.header_timeout_s
    kserve_model_server.RESTServer = LimitedRESTServer
    kserve_model_server.GRPCServer = QuietGRPCServer


def harden(server: Any, kserve_model_server: Any, model: Any, settings: Settings) -> None:
    """Everything this package's `health`, `admission`, `http_limits` and `logs` change in a
    `kserve.ModelServer` that is built but not started (call before adding routes)."""
    enabled = settings.enable_model_repository
    registry = server.registered_models
    server.dataplane = HealthDataPlane(registry, [model], repository_enabled=enabled)
    server.model_repository_extension = GuardedRepository(registry, [model], enabled=enabled)
    limits = ClientLimits(
        max_header_bytes=settings.http_max_header_bytes,
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        max_body_bytes=request_bytes_limit(settings),
    )
    door = Door(model.admit, model.name, lambda: model.draining)
    grpc_door = GrpcDoor(model.admit, model.name)
    install(kserve_model_server, limits, door, grpc_door, server.enable_latency_logging)
    # Added last, so it runs first (the door's 503s never reach it: the door logs them).
    kserve_model_server.app.add_middleware(RequestLogMiddleware, model_name=model.name)
