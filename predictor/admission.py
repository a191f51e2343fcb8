"""Refuse inference requests at the door when the engine's queue is full.

Why an ASGI middleware: under overload the server must answer 503 in milliseconds while the
engine keeps one core busy. Routing, body parsing and KServe's exception handling cost a few
milliseconds of Python per request, and a burst of refused clients queues behind each other
in the one event loop. This check runs before all of that and before the body is read; the
engine's own admission (`Engine.reserve`) stays the authority for requests that get through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from predictor.errors import EngineUnavailable, QueueFull
from predictor.openai.protocol import error_body

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]

_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(/versions/[^/]+)?/infer$")
_CHAT = ("/openai/v1/chat/completions", "/v1/chat/completions")


class AdmissionMiddleware:
    """503 with Retry-After for inference POSTs while `admit()` raises `QueueFull` (or
    `EngineUnavailable`: the engine process died and the pod is about to be restarted)."""

    def __init__(self, app: ASGIApp, admit: Callable[[], None], model_name: str):
        self.app = app
        self.admit = admit
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            chat = path in _CHAT
            v2 = _V2_INFER.match(path)
            if chat or (v2 and v2["name"] == self.model_name):
                try:
                    self.admit()
                except (QueueFull, EngineUnavailable) as refusal:
                    await _refuse(send, refusal, chat)
                    return
        await self.app(scope, receive, send)


async def _refuse(send: Callable, full: QueueFull | EngineUnavailable, chat: bool) -> None:
    message = str(full)
    code = "queue_full" if isinstance(full, QueueFull) else "engine_unavailable"
    body = error_body(message, "server_overloaded", None, code) if chat else {"error": message}
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"retry-after", str(full.retry_after_s).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
