"""The REST side of the drain: keep-alive off from its start, the listener closed last.

Why: uvicorn's own shutdown (`Server.shutdown`, once `should_exit` is set) closes the listening
socket first, then every connection with no request in progress. Under live traffic both lose
requests: a connection the kernel has accepted but the event loop has not yet (one in the
listen queue) is reset when the listening socket closes, and so is a kept-alive connection
whose client has just sent its next request when the server closes it. Here:

- `begin_drain()`, at the drain's start: every response from then on carries
  `Connection: close`, those of requests already in progress included, and kept-alive
  connections that are idle close at once (`DrainingProtocol.begin_drain`), so clients open new
  connections, which a load balancer sends elsewhere and this server's door answers with 503;
- `shutdown()`, at the drain's end: the loop stops accepting, the connections already in the
  listen queue are accepted and served (the door answers them), and only then does the
  listening socket close. From then on a client's connect is refused: an error before any
  byte was sent, which it can retry elsewhere. A connection opened but with no request yet
  gets `EXIT_WAIT_S` for it (`DrainingProtocol.shutdown`), so the exit stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Any

from kserve.protocol.rest.server import _RefreshingServer

from predictor.server.http_limits import LimitedHttpToolsProtocol, _peer

logger = logging.getLogger(__name__)
EXIT_WAIT_S = 1.0  # for the request of a connection still unused when the listener closes


class DrainingServer(_RefreshingServer):
    """KServe's uvicorn server (`_RefreshingServer`: certificate refresh) with the drain above."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.exited = asyncio.Event()  # set once shutdown() is over
        self._listeners_closed = False

    def begin_drain(self) -> None:
        """Connection: close on every response from now on; idle kept-alive ones close now."""
        for connection in list(self.server_state.connections):
            begin = getattr(connection, "begin_drain", None)
            if begin is not None:
                begin()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self._close_listeners_last()
            await super().shutdown(sockets)  # the servers are closed already: a no-op there
        finally:
            self.exited.set()

    async def _close_listeners_last(self) -> None:
        # A duplicate of each listening socket keeps it listening once the loop's server has
        # stopped polling it; what the kernel has queued on it is accepted here, with no
        # await between the last accept and the close.
        if self._listeners_closed:
            return
        self._listeners_closed = True
        listeners = [_duplicate(s) for server in self.servers for s in server.sockets or ()]
        for server in self.servers:
            server.close()
        queued: list[socket.socket] = []
        for listener in listeners:
            queued.extend(_accept_queued(listener))
            listener.close()
        loop = asyncio.get_running_loop()
        for connection in queued:
            try:
                await loop.connect_accepted_socket(self._protocol, connection)
            except OSError:  # the client left meanwhile
                connection.close()
        logger.info("listener closed (%d queued connections accepted and answered)", len(queued))

    def _protocol(self) -> asyncio.Protocol:
        """What uvicorn's `startup` builds for each accepted connection."""
        return self.config.http_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )


def _duplicate(sock: Any) -> socket.socket:
    """A socket object of our own on the same listening socket (uvloop's are not real ones)."""
    duplicate = socket.socket(fileno=os.dup(sock.fileno()))
    duplicate.setblocking(False)
    return duplicate


def _accept_queued(listener: socket.socket) -> list[socket.socket]:
    accepted: list[socket.socket] = []
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:  # out of descriptors, say: what is left is reset at the close
            logger.warning("accepting the listen queue at exit: %s", exc)
            return accepted
        connection.setblocking(False)
        if connection.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted.append(connection)


class DrainingProtocol(LimitedHttpToolsProtocol):
    """uvicorn's httptools protocol (with `http_limits`) that knows the drain's two moments.

    Whether a request is on its way on a connection is what decides between closing it and
    answering it: a request being parsed, a refused one whose body is still arriving
    (`_answering`), or bytes in the socket that the loop has not read yet."""

    def begin_drain(self) -> None:
        """The drain's start: no response keeps its connection alive any more; an idle
        kept-alive connection closes now. A new connection (no request yet) stays open for
        the request its client is sending: the door answers it with 503 and closes."""
        self._no_keep_alive()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self._request_on_its_way():
            self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's server stops and its listener is closed: a response in progress closes
        its connection when done, an idle kept-alive connection closes now, and a connection
        with a request on its way (or none yet) gets `EXIT_WAIT_S` for the door to answer it."""
        self._no_keep_alive()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return
        if cycle is not None and not self._request_on_its_way():
            self.transport.close()
            return
        self._arm(EXIT_WAIT_S, self._exit_late)

    def _no_keep_alive(self) -> None:
        for queued, _ in self.pipeline:
            queued.keep_alive = False
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def _answering(self) -> bool:
        """Whether a response was given and the request's body is still being read."""
        return False

    def _request_on_its_way(self) -> bool:
        return self._received or self._answering() or _unread_bytes(self.transport) > 0

    def _exit_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # the request got in and runs: its response closes the connection
        if self._received:
            logger.warning("client %s: request incomplete at the exit; 408", _peer(self.client))
            self._refuse(408, "request not received before the server stopped")
        else:
            self.transport.close()


def _unread_bytes(transport: Any) -> int:
    """Bytes the kernel holds for this connection that the event loop has not read."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):  # closed meanwhile
        return 0
