"""The REST side of the drain (predictor.server.rest_drain) on a real uvicorn server with the
door's protocol and a small ASGI app, over raw sockets: what each connection gets at the
drain's start and at the exit, deterministically (no model, no timing races)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import uvicorn

from predictor.errors import ShuttingDown
from predictor.server.admission import Door, door_protocol
from predictor.server.http_limits import ClientLimits
from predictor.server.rest_drain import EXIT_WAIT_S, DrainingServer

INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n{}"
GET_FAST = b"GET /fast HTTP/1.1\r\nhost: t\r\n\r\n"
GET_SLOW = b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n"
LENGTH = (b"content-length", b"4")  # of b"done"


class App:
    """`/slow` answers once `release` is set; everything else at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["path"] == "/slow":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [LENGTH]})
        await send({"type": "http.response.body", "body": b"done"})


class Place:
    held = True

    def release(self) -> None:
        self.held = False


@dataclass
class Harness:
    server: DrainingServer
    app: App
    address: tuple = ()
    draining: bool = False
    places: list[Place] = field(default_factory=list)

    def admit(self) -> Place:
        if self.draining:
            raise ShuttingDown()
        self.places.append(Place())
        return self.places[-1]

    def drain(self) -> None:
        """What predictor.server.drain does to REST at the signal."""
        self.draining = True
        self.server.begin_drain()


def run(scenario: Callable[[Harness], Awaitable[None]]) -> None:
    """Serve on a free loopback port, run `scenario`, then let the server exit."""

    async def main() -> None:
        harness = Harness(server=None, app=App())  # type: ignore[arg-type]
        door = Door(harness.admit, "m", lambda: harness.draining)
        protocol = door_protocol(ClientLimits(), door)
        config = uvicorn.Config(harness.app, "127.0.0.1", 0, http=protocol, lifespan="off")
        harness.server = server = DrainingServer(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        harness.address = server.servers[0].sockets[0].getsockname()
        try:
            await asyncio.wait_for(scenario(harness), 10)
        finally:
            harness.app.release.set()
            server.should_exit = True
            await asyncio.wait_for(serving, 10)
        assert server.exited.is_set()

    asyncio.run(main())


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection (a reset raises)."""
    return await asyncio.wait_for(reader.read(), 5)


async def response(reader: asyncio.StreamReader) -> bytes:
    """One response (headers and a body of known length) on a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-le")
    )
    return head + await reader.readexactly(length)


def test_at_the_drains_start_idle_connections_close_and_every_answer_closes_its_own() -> None:
    async def scenario(h: Harness) -> None:
        idle = await asyncio.open_connection(*h.address)
        idle[1].write(GET_FAST)
        assert b"connection: close" not in await response(idle[0])  # kept alive
        busy = await asyncio.open_connection(*h.address)
        busy[1].write(GET_SLOW)
        fresh = await asyncio.open_connection(*h.address)  # nothing sent yet
        await asyncio.sleep(0.1)

        h.drain()

        assert await read_all(idle[0]) == b""  # closed, nothing on its way was cut
        h.app.release.set()
        answer = await read_all(busy[0])  # accepted before the drain: answered, then closed
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer, answer
        fresh[1].write(INFER)  # its request was on its way: the door's 503, then the close
        refused = await read_all(fresh[0])
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after: 1" in refused and b"connection: close" in refused

    run(scenario)


def test_the_listen_queue_is_answered_before_the_listener_closes() -> None:
    async def scenario(h: Harness) -> None:
        h.drain()
        # Connected and sent while the loop does not run: the request sits in the kernel's
        # listen queue, where closing the listening socket would reset it.
        queued = socket.create_connection(h.address)
        queued.sendall(INFER)
        await h.server._close_listeners_last()  # the first step of the exit, no await before
        reader, writer = await asyncio.open_connection(sock=queued)
        refused = await read_all(reader)
        assert refused.startswith(b"HTTP/1.1 503") and b"server shutting down" in refused
        writer.close()
        try:
            socket.create_connection(h.address, timeout=1).close()
            raise AssertionError("the listener still accepts connections")
        except ConnectionRefusedError:
            pass  # refused at connect: nothing was sent

    run(scenario)


def test_at_the_exit_an_unused_connection_gets_a_moment_for_its_request() -> None:
    async def scenario(h: Harness) -> None:
        h.drain()
        late = await asyncio.open_connection(*h.address)
        silent = await asyncio.open_connection(*h.address)
        await asyncio.sleep(0.1)
        h.server.should_exit = True  # uvicorn's shutdown: listener, then every connection
        await asyncio.sleep(0.4)
        late[1].write(INFER)
        assert (await read_all(late[0])).startswith(b"HTTP/1.1 503")
        started = asyncio.get_running_loop().time()
        assert await read_all(silent[0]) == b""
        assert asyncio.get_running_loop().time() - started < EXIT_WAIT_S + 0.5

    run(scenario)
