"""Refuse inference requests at the door, in the HTTP protocol, when the engine is full.

Why in the protocol and not in an ASGI middleware: under overload the server must answer 503
in milliseconds while the engine process and image work keep both cores of a small machine
busy. Every refused request that reaches the ASGI app costs the one event loop a task, eight
middlewares (KServe's timing, FastAPI's telemetry and body limit, the request log), the
access log and its send wrappers: about 0.8 ms of the loop's time each, so in a burst of 40
at an idle server the last refusal waited 30 ms behind the others. Here the decision is made
as soon as a request's headers are parsed, before an ASGI task exists: a refused request
costs one `admit()` call, one pre-built response and one log line.

The door takes the request's place in the engine (`admit` returns it) so that a burst cannot
pass faster than places are taken; the request path takes the place over
(`QwenVLModel.take_reservation`, through a context variable `admit` sets in the context the
request's task runs in), and it is released when the task ends if the request never reached
the engine. gRPC calls take theirs at their own door (`predictor.server.grpc_door`).

A refused request's body is read and thrown away before the connection closes (a close with
unread bytes would reset the connection, and the client could lose the 503 with it). While
the server drains, every response also closes its connection, so keep-alive clients
reconnect to another replica; what the drain does to connections already open, and to the
listener, is `predictor.server.rest_drain`'s.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from predictor.errors import Unavailable
from predictor.openai.protocol import error_body
from predictor.server.http_limits import ClientLimits
from predictor.server.logs import REQUEST_ID_HEADER, request_id_from_headers, where
from predictor.server.rest_drain import DrainingProtocol

logger = logging.getLogger("predictor.requests")
Scope = dict[str, Any]

_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(/versions/[^/]+)?/infer$")
_CHAT = ("/openai/v1/chat/completions", "/v1/chat/completions")


class Place(Protocol):
    """A place in the engine's queue (`predictor.engine.scheduler.Reservation`)."""

    def release(self) -> None: ...


class Door:
    """Which requests need a place in the engine, and the 503 for those that get none."""

    def __init__(
        self,
        admit: Callable[[], Place],
        model_name: str,
        draining: Callable[[], bool] = lambda: False,
    ):
        self.admit = admit  # a Place, or raises Unavailable (full, draining, engine gone)
        self.model_name = model_name
        self.draining = draining

    def guards(self, scope: Scope) -> bool | None:
        """None for a request that passes freely; else whether it is an OpenAI chat call
        (its refusal has OpenAI's error shape) or a v2 inference call for this model."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path in _CHAT:
            return True
        v2 = _V2_INFER.match(path)
        return False if v2 and v2["name"] == self.model_name else None

    def refusal(self, scope: Scope, refusal: Unavailable, chat: bool) -> bytes:
        """The whole 503 response (it closes the connection), logged as one line."""
        request_id = request_id_from_headers(scope.get("headers", ()))
        message = str(refusal)
        logger.warning("%s: 503 %s", where(scope, request_id, self.model_name), message)
        body = (
            error_body(message, "server_overloaded", None, refusal.code)
            if chat
            else {"error": message}
        )
        payload = orjson.dumps(body)
        return b"".join(
            [
                STATUS_LINE[503],
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(payload),
                b"retry-after: %d\r\n" % refusal.retry_after_s,
                REQUEST_ID_HEADER + b": " + request_id.encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                payload,
            ]
        )


class DoorProtocol(DrainingProtocol):
    """uvicorn's httptools protocol (with `predictor.server.http_limits`' limits and
    `predictor.server.rest_drain`'s connection handling at the drain) and the door.

    uvicorn starts a request's ASGI task in `_start_asgi_task` once its headers are in (or,
    for a pipelined request, once the one before it is answered); the door sits there."""

    door: Door | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._close_after_body = False  # a refused request's body is still arriving

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        door = self.door
        if door is None:
            super()._start_asgi_task(cycle, app)
            return
        if door.draining():
            cycle.keep_alive = False  # uvicorn answers with Connection: close, then closes
        chat = door.guards(cycle.scope)
        if chat is None:
            super()._start_asgi_task(cycle, app)
            return
        # The task runs in this context, so the place `admit` records in a context variable
        # is the task's alone (not this callback's, which every later request would share).
        context = contextvars.copy_context()
        try:
            place = context.run(door.admit)
        except Unavailable as refusal:
            self._turn_away(cycle, door.refusal(cycle.scope, refusal, chat))
            return
        except Exception:  # a bug, not a refusal: the app answers (and logs) it, no hang
            logger.exception("the door failed; the request goes on without a place")
            super()._start_asgi_task(cycle, app)
            return
        task = context.run(self.loop.create_task, cycle.run_asgi(app))  # a copy of it
        # Released when the task ends, even one cancelled before it ever ran (a `finally` in
        # the app would not run then); a no-op once the engine has the place.
        task.add_done_callback(lambda _: place.release())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _turn_away(self, cycle: RequestResponseCycle, response: bytes) -> None:
        # Marked answered: uvicorn's on_body then drops the body's bytes as they arrive.
        cycle.response_started = cycle.response_complete = True
        cycle.keep_alive = False
        self.transport.write(response)
        if cycle.more_body:
            self._close_after_body = True
        else:
            self.transport.close()

    def _answering(self) -> bool:
        return self._close_after_body

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._close_after_body:
            self._close_after_body = False
            self.transport.close()


def door_protocol(limits: ClientLimits, door: Door | None) -> type[DoorProtocol]:
    """The protocol class for `uvicorn.Config(http=)`: `limits` and `door` built in."""
    return type("DoorProtocol", (DoorProtocol,), {"limits": limits, "door": door})


def check_uvicorn() -> None:
    """Fail at start-up, not under load, if uvicorn no longer has the hook the door uses."""
    if not hasattr(DrainingProtocol, "_start_asgi_task"):
        raise RuntimeError("this uvicorn has no HttpToolsProtocol._start_asgi_task (0.55+ has)")
