"""Refuse gRPC inference calls at the door, before their message is decoded.

Why an interceptor: grpc.aio runs a server's interceptors when a call's headers arrive, before
its message is deserialized, so this is where gRPC can do what the REST door
(`predictor.server.admission`) does in uvicorn's protocol. A `ModelInfer` call takes its place
in the engine here or is refused at once with UNAVAILABLE and a message (queue full, server
draining, engine process gone): its protobuf, and the images in it, are never decoded, and no
other interceptor or the servicer sees it. The place is taken over by the request path
(`QwenVLModel.take_reservation`, through the context variable `admit` sets: the interceptor,
the servicer and the model run in one asyncio task), and released when the call ends if it
never reached the engine.

The call that holds a place is accepted: it runs to completion through the drain
(`predictor.server.drain`), whatever readiness says meanwhile.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from predictor.errors import Unavailable
from predictor.server.admission import Place
from predictor.server.logs import one_line

logger = logging.getLogger("predictor.requests")

# The methods that need a place in the engine (KServe's servicer has no streaming inference).
GUARDED_METHODS = frozenset({"/inference.GRPCInferenceService/ModelInfer"})


class GrpcDoor(aio.ServerInterceptor):
    """Admission for gRPC inference calls; put it first among the server's interceptors."""

    def __init__(self, admit: Callable[[], Place], model_name: str):
        self.admit = admit  # a Place, or raises Unavailable
        self.model_name = model_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in GUARDED_METHODS:
            return await continuation(handler_call_details)
        try:
            place = self.admit()
        except Unavailable as refusal:
            message = str(refusal)
            logger.warning(
                "request - model %s grpc %s: UNAVAILABLE %s",
                one_line(self.model_name),
                method.rsplit("/", 1)[-1],
                one_line(message),
            )
            return _refusing(message)
        try:
            handler = await continuation(handler_call_details)
        except BaseException:
            place.release()
            raise
        if handler is None or not inspect.iscoroutinefunction(handler.unary_unary):
            place.release()  # not an async unary handler: the request path takes its own
            return handler
        return _holding(handler, place)


def _refusing(message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAVAILABLE; no deserializer, so the message stays bytes."""

    async def refuse(request: bytes, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    return grpc.unary_unary_rpc_method_handler(refuse)


def _holding(handler: grpc.RpcMethodHandler, place: Place) -> grpc.RpcMethodHandler:
    """`handler`, releasing `place` when the call ends (a no-op once the engine has it)."""
    inner = handler.unary_unary

    async def call(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        finally:
            place.release()

    return grpc.unary_unary_rpc_method_handler(
        call,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
