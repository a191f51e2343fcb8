"""One log line per refused request, tracebacks only for real failures.

Why: KServe logs every 400, 404 and 503 at ERROR with a full traceback (about 3 KB each), so
a client sending bad requests fills the log, and a client that leaves mid-upload shows up as
two tracebacks and an HTTP 500. Here, on every REST route:

- a 4xx, 503 or 504 (any status from 400 up but 500) is one WARNING line: request id, model,
  route, status and the message the client got (control characters escaped, so a request
  cannot forge log lines);
- a client that left (499, or its body ended early) is one INFO line, and its status is 499,
  never 500 (KServe's timing log and the access log see 499);
- any other exception is one ERROR line with its traceback and a 500 answer (not re-raised:
  uvicorn would log the same traceback a second time).

Every response carries `x-request-id`: the client's own, if it sent a sane one, else a new id.
KServe's exception handlers are replaced by `quiet_exception_handlers` (same statuses and
bodies, no logging) so that this middleware is the only place that logs a refusal, but for
the 503s the door gives before a request reaches the app (`predictor.server.admission`), which it
logs itself in the same form.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ServerNotLive,
    ServerNotReady,
    UnsupportedProtocol,
)
from starlette.requests import ClientDisconnect

from predictor.errors import RepositoryDisabled
from predictor.server.http_limits import CLOSED_STATE

logger = logging.getLogger("predictor.requests")
REQUEST_ID_HEADER = b"x-request-id"
CLIENT_LEFT = 499  # nginx's status for a client that closed the connection first
_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_MODEL_IN_PATH = re.compile(r"^/v2/(?:repository/)?models/(?P<name>[^/]+)")
_CAPTURE_BYTES = 2048  # of an error body, for its message
_MESSAGE_CHARS = 300
Scope = dict[str, Any]


def request_id_of(scope: Scope) -> str:
    """The request id the middleware gave this request ('-' outside it)."""
    return scope.get("state", {}).get("request_id", "-")


def request_id_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's own `x-request-id`, if it sent a sane one, else a new id."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _SANE_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


def where(scope: Scope, request_id: str, model_name: str) -> str:
    """How a log line names a request: its id, model, method and path."""
    path = scope.get("path", "")
    match = _MODEL_IN_PATH.match(path)
    model = match["name"] if match else model_name
    method = scope.get("method", "-")
    return f"request {request_id} model {one_line(model)} {method} {one_line(path)}"


def one_line(text: str) -> str:
    """`text` shortened and with control characters escaped: one line a client cannot forge."""
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    return text.encode("unicode_escape").decode("ascii")


def _message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()
    if isinstance(document, dict):
        error = document.get("error", document.get("detail"))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return error if isinstance(error, str) else json.dumps(error)
    return json.dumps(document)


class RequestLogMiddleware:
    """Gives each HTTP request an id and logs its refusal or failure, as described above."""

    def __init__(self, app: Callable[..., Any], model_name: str):
        self.app = app
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from_headers(scope.get("headers", ()))
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        captured = bytearray()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(name.lower() == REQUEST_ID_HEADER for name, _ in headers):
                    headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and status >= 400:
                room = _CAPTURE_BYTES - len(captured)
                if room > 0:
                    captured.extend(message.get("body", b"")[:room])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            self._client_left(scope)
            if not status:
                await _send_json(send_with_id, CLIENT_LEFT, {"error": "client closed request"})
            return
        except Exception:
            logger.exception("%s: 500 internal server error", self._where(scope))
            if not status:
                await _send_json(send_with_id, 500, {"error": "internal server error"})
            return
        if status == CLIENT_LEFT:
            self._client_left(scope)
        elif status >= 400 and status != 500:  # a 500 is logged, with its traceback, where
            # it happens (here above, or the chat router's error table)
            message = one_line(_message(bytes(captured))) or HTTPStatus(status).phrase
            logger.warning("%s: %d %s", self._where(scope), status, message)

    def _where(self, scope: Scope) -> str:
        return where(scope, request_id_of(scope), self.model_name)

    def _client_left(self, scope: Scope) -> None:
        cut = scope.get("state", {}).get(CLOSED_STATE)  # the server cut the body, see
        if cut is not None:  # predictor.server.http_limits: a refusal, not a client that left
            logger.warning("%s: %s; closed", self._where(scope), cut)
        else:
            logger.info("%s: client left before the answer", self._where(scope))


async def _send_json(send: Callable, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _quiet(status: int) -> Callable[[Request, Exception], Any]:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": str(exc)})

    return handler


# KServe's exception classes and their statuses (kserve/errors.py), and ours without a
# handler of their own. QueueFull and DeadlineExceeded keep `predictor.server.rest`'s handlers.
QUIET_STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidInput, 400),
    (ModelNotFound, 404),
    (ModelNotReady, 503),
    (NotImplementedError, 501),
    (UnsupportedProtocol, 501),
    (ServerNotLive, 503),
    (ServerNotReady, 503),
    (RepositoryDisabled, 403),
)


def install_quiet_exception_handlers(app: FastAPI) -> None:
    """Replace KServe's logging exception handlers (call after KServe registered its own)."""
    for kind, status in QUIET_STATUSES:
        app.add_exception_handler(kind, _quiet(status))
    # KServe's handler for Exception logs a traceback and starlette then re-raises it;
    # RequestLogMiddleware handles unexpected exceptions instead (one traceback, one 500).
    app.exception_handlers.pop(Exception, None)
    app.exception_handlers.pop(500, None)
