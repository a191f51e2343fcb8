"""Refuse inference requests at the door when the engine's queue is full.

Why an ASGI middleware: under overload the server must answer 503 in milliseconds while the
engine keeps one core busy. Routing, body parsing and KServe's exception handling cost a few
milliseconds of Python per request, and a burst of refused clients queues behind each other
in the one event loop. This check runs before all of that and before the body is read, and
takes the request's place in the engine there (`admit` returns it; the request path takes it
over, and it is released here if the request ends before reaching the engine), so a burst
cannot pass the door faster than places are taken. gRPC requests, which have no door, take
their place on the request path (`Engine.reserve`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from predictor.errors import Unavailable
from predictor.openai.protocol import error_body

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(/versions/[^/]+)?/infer$")
_CHAT = ("/openai/v1/chat/completions", "/v1/chat/completions")


class Place(Protocol):
    """A place in the engine's queue (`predictor.engine.scheduler.Reservation`)."""

    def release(self) -> None: ...


class AdmissionMiddleware:
    """503 with Retry-After for inference POSTs while `admit()` raises `Unavailable`: the
    queue is full, the engine process died, or the server is draining."""

    def __init__(
        self,
        app: ASGIApp,
        admit: Callable[[], Place],
        model_name: str,
        draining: Callable[[], bool] = lambda: False,
    ):
        self.app = app
        self.admit = admit
        self.model_name = model_name
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.draining():
            send = _closing(send)  # keep-alive clients reconnect elsewhere (predictor.drain)
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            chat = path in _CHAT
            v2 = _V2_INFER.match(path)
            if chat or (v2 and v2["name"] == self.model_name):
                try:
                    place = self.admit()
                except Unavailable as refusal:
                    await _refuse(send, refusal, chat)
                    return
                try:
                    await self.app(scope, receive, send)
                finally:  # a no-op once the request path has handed it to the engine
                    place.release()
                return
        await self.app(scope, receive, send)


def _closing(send: Callable) -> Callable:
    """`send` with `Connection: close` on the response, so the connection ends after it."""

    async def send_closing(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_closing


async def _refuse(send: Callable, refusal: Unavailable, chat: bool) -> None:
    message = str(refusal)
    body = (
        error_body(message, "server_overloaded", None, refusal.code) if chat else {"error": message}
    )
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(refusal.retry_after_s).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
