"""The gRPC door (predictor.server.grpc_door) on a real grpc.aio server and client: a refused
call gets UNAVAILABLE with the server's message before its message is decoded or any handler
runs; an admitted call's place is the handler's to take over, and is released at its end."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from predictor.errors import QueueFull, ShuttingDown, Unavailable
from predictor.server.grpc_door import GrpcDoor

INFER = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
DOOR_PLACE: contextvars.ContextVar[Place | None] = contextvars.ContextVar("place", default=None)


class Place:
    def __init__(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False


class Service:
    """ModelInfer and ServerLive on raw bytes, counting what they decode and handle."""

    def __init__(self) -> None:
        self.decoded = 0
        self.handled: list[str] = []

    def decode(self, data: bytes) -> bytes:
        self.decoded += 1
        return data

    async def infer(self, request: bytes, context: aio.ServicerContext) -> bytes:
        place = DOOR_PLACE.get()  # what QwenVLModel.take_reservation reads
        self.handled.append("infer")
        return b"held" if place is not None and place.held else b"no place"

    async def live(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self.handled.append("live")
        return b"live"

    def handler(self) -> grpc.GenericRpcHandler:
        def method(function: Callable) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(function, request_deserializer=self.decode)

        return grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": method(self.infer), "ServerLive": method(self.live)},
        )


def serve(
    admit: Callable[[], Place], scenario: Callable[[aio.Channel, Service], Awaitable[None]]
) -> Service:
    service = Service()

    async def main() -> None:
        server = aio.server(interceptors=(GrpcDoor(admit, "qwen-vl"),))
        server.add_generic_rpc_handlers((service.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(scenario(channel, service), 10)
        finally:
            await server.stop(None)

    asyncio.run(main())
    return service


def refusing(refusal: Callable[[], Unavailable]) -> Callable[[], Place]:
    def admit() -> Place:
        raise refusal()

    return admit


def test_a_refused_call_is_unavailable_before_it_is_decoded() -> None:
    for refusal, message in (
        (ShuttingDown, "server shutting down"),
        (lambda: QueueFull(9), "server overloaded: 9 requests waiting"),
    ):
        service = serve(refusing(refusal), scenario_for(message))
        assert service.decoded == 1 and service.handled == ["live"], "only ServerLive got in"


def scenario_for(message: str) -> Callable[[aio.Channel, Service], Awaitable[None]]:
    async def scenario(channel: aio.Channel, service: Service) -> None:
        try:
            await channel.unary_unary(INFER)(b"an image, megabytes of it")
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert message in error.details(), error.details()
        else:
            raise AssertionError(f"not refused: {message}")
        # Methods that need no place pass the door, even while it refuses.
        assert await channel.unary_unary(LIVE)(b"") == b"live"

    return scenario


def test_an_admitted_call_holds_its_place_until_it_ends() -> None:
    places: list[Place] = []

    def admit() -> Place:
        places.append(Place())
        DOOR_PLACE.set(places[-1])  # as QwenVLModel.admit records it
        return places[-1]

    async def scenario(channel: aio.Channel, service: Service) -> None:
        assert await channel.unary_unary(INFER)(b"x") == b"held"  # the handler saw it
        assert await channel.unary_unary(LIVE)(b"") == b"live"

    service = serve(admit, scenario)
    assert len(places) == 1, "only inference takes a place"
    assert not places[0].held, "released when the call ended"
    assert service.decoded == 2 and service.handled == ["infer", "live"]
