"""`predictor.server.http_limits` in a real uvicorn server on loopback, in front of a tiny ASGI app
that reads the whole body (no model: fast; the live server's own checks are in
test_client_limits.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from predictor.server.http_limits import CLOSED_STATE, ClientLimits, limited_protocol
from tests.live_server import free_port

LIMITS = ClientLimits(
    max_header_bytes=4096, header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=10_000
)
SLACK_S = 0.5
cut_reasons: list[str] = []


async def echo_length(scope, receive, send) -> None:
    """Answers the body's length; notes why the server cut a body it was waiting for."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cut_reasons.append(scope["state"].get(CLOSED_STATE, "client left"))
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    payload = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": payload})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        echo_length,
        host="127.0.0.1",
        port=port,
        http=limited_protocol(LIMITS),
        log_config=None,
        lifespan="off",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def raw(url: str, data: bytes) -> tuple[bytes, float]:
    """Send `data`, then read until the server closes: its answer and how long that took."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        started = time.perf_counter()
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.perf_counter() - started


def test_requests_within_the_limits_are_served_on_one_connection(url: str) -> None:
    with httpx.Client() as client:
        assert client.post(url, content=b"x" * 9000, headers={"X-A": "a" * 3000}).text == "9000"
        time.sleep(LIMITS.header_timeout_s + 0.2)  # idle between requests: keep-alive's time
        assert client.post(url, content=b"y").text == "1"


def test_headers_over_the_limit_get_431(url: str) -> None:
    assert httpx.get(url, headers={"X-Big": "a" * 5000}).status_code == 431
    many = {f"X-{i}": "b" * 100 for i in range(50)}
    assert httpx.get(url, headers=many).status_code == 431


def test_headers_not_in_by_the_deadline_get_408(url: str) -> None:
    answer, took = raw(url, b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert took < LIMITS.header_timeout_s + SLACK_S


def test_a_connection_that_sends_nothing_is_closed_silently(url: str) -> None:
    answer, took = raw(url, b"")
    assert answer == b"" and took < LIMITS.header_timeout_s + SLACK_S


def test_a_body_not_in_by_the_deadline_gets_408(url: str) -> None:
    answer, took = raw(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert took < LIMITS.body_timeout_s + SLACK_S
    time.sleep(0.1)
    assert cut_reasons[-1] == "408 request body not received within 0.5 s"


def test_a_body_over_the_limit_gets_413_as_it_arrives(url: str) -> None:
    chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 4000
    answer, _ = raw(url, chunked + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3)
    assert answer.startswith(b"HTTP/1.1 413 ")
    time.sleep(0.1)
    assert cut_reasons[-1] == "413 request body over 10000 bytes"


def test_malformed_requests_still_get_400(url: str) -> None:
    answer, _ = raw(url, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
