"""Remote image URLs on the OpenAI route: only with the flag, only allowed hosts, bounded.

The image host is a real HTTP server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from predictor.errors import InvalidRequest
from predictor.openai.image_urls import RemotePolicy
from tests import images
from tests.live_server import LiveServer, start_server

MAX_IMAGE_BYTES = 200_000
JPEG = images.jpeg()


class ImageHost(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/cat.jpg":
            self._send(200, JPEG)
        elif self.path == "/huge.jpg":
            self._send(200, b"\xff" * (MAX_IMAGE_BYTES + 1))
        elif self.path == "/moved.jpg":
            self.send_response(302)
            self.send_header("Location", "/cat.jpg")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("remote") / "server.log"
    args = (
        "--allow_remote_images", "true",
        "--remote_image_hosts", "127.0.0.1",
        "--remote_image_timeout_s", "5",
        "--max_image_bytes", str(MAX_IMAGE_BYTES),
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


def ask(server: LiveServer, url: str):
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return client.chat.completions.create(
        model="qwen-vl", messages=[{"role": "user", "content": content}], max_tokens=3
    )


@pytest.mark.slow
def test_an_allowed_remote_image_is_fetched(server: LiveServer, image_host: str) -> None:
    assert ask(server, f"{image_host}/cat.jpg").choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/huge.jpg", "more than the limit"),
        ("/moved.jpg", "HTTP 302"),
        ("/gone.jpg", "HTTP 404"),
    ],
)
def test_remote_images_are_bounded(
    server: LiveServer, image_host: str, path: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        ask(server, f"{image_host}{path}")
    assert message in error.value.body["message"]


@pytest.mark.slow
def test_hosts_outside_the_allow_list_are_refused(server: LiveServer, image_host: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        ask(server, image_host.replace("127.0.0.1", "localhost") + "/cat.jpg")
    assert "is not allowed" in error.value.body["message"]


@pytest.mark.parametrize(
    ("hosts", "host", "allowed"),
    [
        ((), "anything.example", True),
        (("images.example.com",), "images.example.com", True),
        (("images.example.com",), "evil.example.com", False),
        ((".example.com",), "cdn.example.com", True),
        ((".example.com",), "example.com.evil.net", False),
    ],
)
def test_host_allow_list(hosts: tuple[str, ...], host: str, allowed: bool) -> None:
    policy = RemotePolicy(allowed=True, hosts=hosts, timeout_s=1, max_bytes=10)
    assert policy.host_allowed(host) is allowed


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "ftp://x/y.jpg", "s3://b/k"])
def test_other_schemes_never_reach_a_reader(url: str) -> None:
    import asyncio

    from predictor.openai.image_urls import fetch_image_url

    policy = RemotePolicy(allowed=True, hosts=(), timeout_s=1, max_bytes=10)
    with pytest.raises(InvalidRequest, match="data: URL"):
        asyncio.run(fetch_image_url(url, policy, "url"))
