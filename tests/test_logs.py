"""`predictor.server.logs` without a server: one line per refusal, nothing a client can forge."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.requests import ClientDisconnect

from predictor.server.logs import RequestLogMiddleware, one_line


def test_one_line_escapes_control_characters_and_shortens() -> None:
    assert one_line("a\nERROR forged\r\x1b[31m") == "a\\nERROR forged\\r\\x1b[31m"
    assert len(one_line("x" * 5000)) < 400


def run(app, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v2/models/qwen-vl/infer"}
    scope["headers"] = headers or []
    asyncio.run(RequestLogMiddleware(app, "qwen-vl")(scope, receive, send))
    return sent


def answering(status: int, body: bytes):
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def raising(error: Exception):
    async def app(scope, receive, send) -> None:
        raise error

    return app


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, b'{"error": "image[0]: too big"}', "400 image[0]: too big"),
        (404, b'{"detail": "Not Found"}', "404 Not Found"),
        (503, b'{"error": {"message": "server overloaded"}}', "503 server overloaded"),
        (422, b"plain text", "422 plain text"),
    ],
)
def test_a_refusal_is_one_warning_line(
    caplog: pytest.LogCaptureFixture, status: int, body: bytes, message: str
) -> None:
    with caplog.at_level(logging.INFO, "predictor.requests"):
        sent = run(answering(status, body), [(b"x-request-id", b"req-1")])
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and not record.exc_info
    where = "request req-1 model qwen-vl POST /v2/models/qwen-vl/infer"
    assert record.getMessage() == f"{where}: {message}"
    assert (b"x-request-id", b"req-1") in sent[0]["headers"]


def test_success_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "predictor.requests"):
        run(answering(200, b"{}"))
    assert not caplog.records


def test_a_client_that_left_is_info_and_499(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "predictor.requests"):
        sent = run(raising(ClientDisconnect()))
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "client left" in record.getMessage()
    assert sent[0]["status"] == 499


def test_an_unexpected_error_is_one_traceback_and_500(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "predictor.requests"):
        sent = run(raising(RuntimeError("boom")))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert sent[0]["status"] == 500 and b"boom" not in sent[1]["body"]
