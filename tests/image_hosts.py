"""Real HTTP servers on loopback addresses for the remote-image tests, each keeping a log of
every connection it accepted (what proves that a refused fetch never connected)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests import images

JPEG = images.jpeg()
Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Host:
    """A server's address, its connection log and the Host headers it was sent."""

    address: str
    port: int
    connections: list[str] = field(default_factory=list)
    host_headers: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def trickle(handler: BaseHTTPRequestHandler, size: int = 100_000, every_s: float = 0.1) -> None:
    """A JPEG's headers at once, then its body one byte at a time: each read gets data well
    within any per-read timeout, so only a deadline on the whole fetch stops it."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(size))
    handler.end_headers()
    try:
        for byte in range(size):
            handler.wfile.write(bytes([byte % 256]))
            handler.wfile.flush()
            time.sleep(every_s)
    except OSError:  # the predictor hung up: what the test wants
        pass


def _handler(host: Host, routes: dict[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host.host_headers.append(self.headers.get("Host", ""))
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                send(self, 404, b"not here")
            else:
                route(self)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class _Recording(ThreadingHTTPServer):
    daemon_threads = True
    host: Host

    def verify_request(self, request: object, client_address: object) -> bool:
        self.host.connections.append(str(client_address))
        return True


def ipv6_loopback() -> list[str]:
    """["::1"] where the machine has IPv6 loopback (some containers do not), else []."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return []
    return ["::1"]


@contextmanager
def serve(addresses: list[str], routes: dict[str, Route]) -> Iterator[list[Host]]:
    """One server per address, all on the same port, sharing `routes`."""
    servers: list[_Recording] = []
    port = 0
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            server_class = type("Server", (_Recording,), {"address_family": family})
            host = Host(address, port)
            server = server_class((address, port), _handler(host, routes))
            port = host.port = server.server_address[1]
            server.host = host
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        yield [server.host for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
