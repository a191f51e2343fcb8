"""Limits on slow and oversized REST clients, in uvicorn's own HTTP protocol.

Why here: uvicorn (httptools, what KServe's server runs) has no limit on the size of a
request's headers and no deadline for receiving them or the body: a client that sends one
byte every few seconds, or a 16 MB header, holds a connection and its buffers for as long as
it likes. h11's `h11_max_incomplete_event_size` would bound header bytes only (and answer
400); these checks sit in the parser callbacks that already run, so they cost nothing on the
request path:

- the request line and headers together over `--http_max_header_bytes`: 431, closed;
- the request line and headers not all in within `--http_header_timeout_s` of the connection
  opening (or of the request's first byte, on a kept-alive connection): 408, closed (a
  connection that sent nothing at all is just closed);
- the body not all in within `--http_body_timeout_s` of its headers: 408 if no response has
  started, and the connection closed;
- more body bytes than the largest valid request (`max_body_bytes`, from the image limits):
  413, closed, before more is buffered (a declared Content-Length over it gets the v2 route's
  400 naming the body before any of it is read).

When a body is cut, the application sees a client that left; the reason is left in the ASGI
scope's state (`CLOSED_STATE`) so that `predictor.server.logs` logs it as one WARNING line with the
status, not as a client that left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("predictor.http")
HEADERS_TOO_LARGE = (431, "request header fields too large")
# In the ASGI scope's state when this protocol cut the request's body: "408 ..." / "413 ...".
CLOSED_STATE = "qwen_vl_closed_by_server"


@dataclass(frozen=True)
class ClientLimits:
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_body_bytes: int | None = None  # None: no limit here


class Refused(Exception):
    """Raised inside a parser callback to stop parsing a request that is over a limit."""


def limited_protocol(limits: ClientLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class with `limits` (pass it as `uvicorn.Config(http=)`)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = ClientLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._received = False  # any byte of the current request
        self._body_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None  # set by a callback that raised Refused

    # ---- deadlines --------------------------------------------------------------------

    def _arm(self, seconds: float, on_expiry: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, on_expiry)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._received:
            self.transport.close()  # opened and never used: nothing to answer
            return
        logger.warning(
            "client %s: request headers not received within %g s; closed",
            _peer(self.client),
            self.limits.header_timeout_s,
        )
        self._refuse(408, "request headers not received in time")

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_complete:
            if not self.transport.is_closing():
                self.transport.close()
            return
        self._cut(408, f"request body not received within {self.limits.body_timeout_s:g} s")

    def _cut(self, status: int, message: str) -> None:
        """End a request whose headers the application already has."""
        cycle = self.cycle
        cycle.scope["state"][CLOSED_STATE] = f"{status} {message}"
        if cycle.response_started:
            self.transport.close()
        else:
            self._refuse(status, message)

    def _refuse(self, status: int, message: str) -> None:
        body = message.encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    # ---- parsing ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal == HEADERS_TOO_LARGE:
                logger.warning(
                    "client %s: request headers over %d bytes; 431",
                    _peer(self.client),
                    self.limits.max_header_bytes,
                )
                self._refuse(*HEADERS_TOO_LARGE)
                return
            if self._refusal is not None:
                self._cut(*self._refusal)
                return
            logger.warning("client %s: invalid HTTP request; 400", _peer(self.client))
            self._refuse(400, "invalid HTTP request")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._received = True
        if self._deadline is None:  # a kept-alive connection's next request; the first
            self._arm(self.limits.header_timeout_s, self._headers_late)  # counts from open

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            self._refusal = HEADERS_TOO_LARGE
            raise Refused()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_timeout_s, self._body_late)
        self._body_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self.limits.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            self._refusal = (413, f"request body over {limit} bytes")
            raise Refused()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._received = False
        super().on_message_complete()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"
