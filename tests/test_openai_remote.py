"""Remote image URLs on the OpenAI route: only with the flag, only public addresses (or the
networks allowed), one deadline for the whole fetch, bounded size and redirects.

The image servers are real HTTP servers on loopback addresses. The allowed one listens on
127.0.0.2 (admitted with --remote_image_allow_networks 127.0.0.2/32); the "internal service"
listens on 127.0.0.1 and [::1] and logs every connection it accepts: a refused fetch must
leave that log empty, whatever spelling of its address the URL used. The unit tests at the
end call `fetch_image_url` itself against the same servers, with a stand-in resolver where a
DNS name is needed (no DNS server runs here).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from predictor.errors import InvalidRequest
from predictor.inputs.addresses import AddressPolicy
from predictor.inputs.image_urls import RemotePolicy, fetch_image_url
from tests.image_hosts import JPEG, Host, ipv6_loopback, send, serve, trickle
from tests.live_server import LiveServer, start_server

MAX_IMAGE_BYTES = 200_000
TIMEOUT_S = 2.0
MAX_REDIRECTS = 2
FIELD = "messages.0.content.0.image_url.url"


@pytest.fixture(scope="module")
def internal() -> Iterator[list[Host]]:
    """What remote URLs must never reach: a service on 127.0.0.1 and [::1] (where the machine
    has IPv6), on one port."""
    routes = {"/cat.jpg": lambda h: send(h, 200, JPEG)}
    with serve(["127.0.0.1", *ipv6_loopback()], routes) as hosts:
        yield hosts


@pytest.fixture(autouse=True)
def no_connection_to_internal(internal: list[Host]) -> Iterator[None]:
    """Every test here must leave the internal service untouched."""
    yield
    assert [host.connections for host in internal] == [[] for _ in internal]


@pytest.fixture(scope="module")
def image_host(internal: list[Host]) -> Iterator[Host]:
    port = internal[0].port
    routes = {
        "/cat.jpg": lambda h: send(h, 200, JPEG),
        "/huge.jpg": lambda h: send(h, 200, b"\xff" * (MAX_IMAGE_BYTES + 1)),
        "/moved.jpg": lambda h: send(h, 302, b"", Location="/cat.jpg"),
        "/loop.jpg": lambda h: send(h, 302, b"", Location="/loop.jpg"),
        "/to-internal.jpg": lambda h: send(h, 302, b"", Location=f"http://127.0.0.1:{port}/"),
        "/to-internal-v6.jpg": lambda h: send(h, 307, b"", Location=f"http://[::1]:{port}/"),
        "/to-file.jpg": lambda h: send(h, 302, b"", Location="file:///etc/passwd"),
        "/trickle.jpg": trickle,
    }
    with serve(["127.0.0.2"], routes) as (host,):
        yield host


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("remote") / "server.log"
    args = (
        "--allow_remote_images", "true",
        "--remote_image_allow_networks", "127.0.0.2/32",
        "--remote_image_timeout_s", str(TIMEOUT_S),
        "--remote_image_max_redirects", str(MAX_REDIRECTS),
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


def refusal(server: LiveServer, url: str) -> str:
    """The 400's message for `url`, after checking it names the image field."""
    with pytest.raises(openai.BadRequestError) as error:
        ask(server, url)
    body = error.value.body
    assert body["param"] == FIELD
    return body["message"]


@pytest.mark.slow
def test_an_allowed_remote_image_is_fetched(server: LiveServer, image_host: Host) -> None:
    assert ask(server, f"{image_host.url}/cat.jpg").choices[0].message.content
    assert ask(server, f"{image_host.url}/moved.jpg").choices[0].message.content  # redirected


@pytest.mark.slow
@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("127.0.0.1", "127.0.0.1, a loopback address; refused"),
        ("[::1]", "::1, a loopback address; refused"),
        ("localhost", "127.0.0.1, a loopback address; refused"),
        ("127.1", "127.0.0.1, a loopback address; refused"),
        ("2130706433", "127.0.0.1, a loopback address; refused"),
        ("0x7f000001", "127.0.0.1, a loopback address; refused"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1, a loopback address; refused"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1, a loopback address; refused"),
        ("0.0.0.0", "an unspecified address; refused"),  # Linux connects it to the local host
        ("0", "0.0.0.0, an unspecified address; refused"),
        ("[::]", "an unspecified address; refused"),
        ("0177.0.0.1", "is not a valid URL"),  # octal: the URL parser refuses it first
    ],
)
def test_every_spelling_of_a_loopback_address_is_refused_unconnected(
    server: LiveServer, internal: list[Host], host: str, message: str
) -> None:
    assert message in refusal(server, f"http://{host}:{internal[0].port}/cat.jpg")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata services
        ("[fe80::1]", "a link-local address"),
        ("[fd00::1]", "a private address"),
        ("224.0.0.1", "a multicast address"),
        ("[ff02::1]", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("100.64.0.1", "not a public address"),  # carrier-grade NAT
        ("[2002:7f00:1::]", "a loopback address"),  # 6to4 of 127.0.0.1
        ("[64:ff9b::a00:1]", "a private address"),  # NAT64 of 10.0.0.1
        ("127.0.0.3", "a loopback address"),  # beside the allowed 127.0.0.2/32
    ],
)
def test_internal_addresses_are_refused(server: LiveServer, host: str, reason: str) -> None:
    assert f"{reason}; refused" in refusal(server, f"http://{host}/cat.jpg")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/to-internal.jpg", "resolves to 127.0.0.1, a loopback address; refused"),
        ("/to-internal-v6.jpg", "resolves to ::1, a loopback address; refused"),
        ("/to-file.jpg", "redirects to file:///etc/passwd: must be a data: URL"),
        ("/loop.jpg", f"more than {MAX_REDIRECTS} redirects"),
    ],
)
def test_every_redirect_hop_is_checked(
    server: LiveServer, image_host: Host, path: str, message: str
) -> None:
    assert message in refusal(server, f"{image_host.url}{path}")


@pytest.mark.slow
def test_a_trickling_server_is_cut_at_the_deadline(server: LiveServer, image_host: Host) -> None:
    started = time.perf_counter()
    message = refusal(server, f"{image_host.url}/trickle.jpg")
    elapsed = time.perf_counter() - started
    assert f"could not be fetched within {TIMEOUT_S:g} s" in message
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "message"), [("/huge.jpg", "more than the limit"), ("/gone.jpg", "HTTP 404")]
)
def test_remote_images_are_bounded(
    server: LiveServer, image_host: Host, path: str, message: str
) -> None:
    assert message in refusal(server, f"{image_host.url}{path}")


@pytest.mark.slow
def test_refusals_are_one_warning_line(server: LiveServer) -> None:
    refusal(server, "http://169.254.7.7/latest/meta-data/")  # an address no other test uses
    lines = [line for line in server.log().splitlines() if "169.254.7.7" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and ": 400 " in lines[0]
    assert "Traceback" not in server.log()


# ---- fetch_image_url itself ---------------------------------------------------------------


def policy(**overrides: object) -> RemotePolicy:
    values: dict[str, object] = {
        "allowed": True,
        "hosts": (),
        "timeout_s": TIMEOUT_S,
        "max_bytes": MAX_IMAGE_BYTES,
        "addresses": AddressPolicy.from_strings(["127.0.0.2/32"]),
    }
    values.update(overrides)
    return RemotePolicy(**values)  # type: ignore[arg-type]


def stand_in_dns(answers: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    return resolve


def fetch(url: str, remote: RemotePolicy) -> bytes:
    return asyncio.run(fetch_image_url(url, remote, FIELD))


def test_the_connection_goes_to_the_checked_address_with_the_url_host_kept(
    image_host: Host,
) -> None:
    """`images.test` exists only in the stand-in DNS: the fetch can only succeed if the
    connection goes to the address that was checked, without a second lookup."""
    remote = policy(resolver=stand_in_dns({"images.test": ["127.0.0.2"]}))
    assert fetch(f"http://images.test:{image_host.port}/cat.jpg", remote) == JPEG
    assert image_host.host_headers[-1] == f"images.test:{image_host.port}"


@pytest.mark.parametrize(
    "answer", [["127.0.0.1"], ["::1"], ["93.184.216.34", "10.0.0.7"], ["::ffff:10.0.0.7"]]
)
def test_a_name_resolving_to_an_internal_address_is_refused(
    internal: list[Host], answer: list[str]
) -> None:
    remote = policy(resolver=stand_in_dns({"images.example.com": answer}))
    with pytest.raises(InvalidRequest, match=r"images\.example\.com' resolves to .* address"):
        fetch(f"http://images.example.com:{internal[0].port}/cat.jpg", remote)


def test_an_allowed_host_name_is_still_checked_for_its_address(internal: list[Host]) -> None:
    remote = policy(hosts=("localhost",))
    with pytest.raises(InvalidRequest, match="a loopback address; refused"):
        fetch(f"http://localhost:{internal[0].port}/cat.jpg", remote)


def test_redirects_are_refused_by_default(image_host: Host) -> None:
    with pytest.raises(InvalidRequest, match="HTTP 302, a redirect, not followed"):
        fetch(f"{image_host.url}/moved.jpg", policy())


def test_tls_names_the_url_host_not_the_address() -> None:
    """SNI (and so the certificate check) uses the URL's host, though the TCP connection
    goes to the pinned address; a TLS server without a certificate records the name."""
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    listener = socket.create_server(("127.0.0.2", 0))

    def accept() -> None:
        connection, _ = listener.accept()
        try:
            context.wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        finally:
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    remote = policy(resolver=stand_in_dns({"images.test": ["127.0.0.2"]}))
    with pytest.raises(InvalidRequest, match="could not be fetched"):
        fetch(f"https://images.test:{port}/cat.jpg", remote)
    thread.join(5)
    listener.close()
    assert names == ["images.test"]


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
    assert policy(hosts=hosts).host_allowed(host) is allowed


def test_hosts_outside_the_allow_list_are_refused_before_resolving(image_host: Host) -> None:
    remote = policy(hosts=("images.example.com",), resolver=stand_in_dns({}))
    with pytest.raises(InvalidRequest, match=r"host '127\.0\.0\.2' is not allowed"):
        fetch(f"{image_host.url}/cat.jpg", remote)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "ftp://x/y.jpg", "s3://b/k", "gopher://x/"]
)
def test_other_schemes_never_reach_a_reader(url: str) -> None:
    with pytest.raises(InvalidRequest, match="data: URL"):
        fetch(url, policy())


def test_credentials_in_the_url_are_refused(image_host: Host) -> None:
    with pytest.raises(InvalidRequest, match="must not carry credentials"):
        fetch(f"http://user:secret@127.0.0.2:{image_host.port}/cat.jpg", policy())
