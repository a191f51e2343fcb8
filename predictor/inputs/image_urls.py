"""Turn an `image_url` into encoded image bytes, under the server's rules.

Why so strict: a URL is a request for the server to read something. `data:` URLs are decoded
(strict base64). `http(s)` URLs are fetched only with `--allow_remote_images`, and then:

- from the hosts in `--remote_image_hosts` (any host if empty);
- only from public addresses: the host is resolved and every address checked
  (`predictor.inputs.addresses`; loopback, private, link-local, multicast, reserved and unspecified
  ones are refused, IPv4, IPv6 and v4-mapped alike, unless `--remote_image_allow_networks`
  admits them), and the connection goes to the checked address, not to a second lookup of
  the name; the URL's host still names the server in the `Host` header and in TLS (SNI and
  certificate checks);
- redirects only up to `--remote_image_max_redirects` (default 0: none), each hop checked
  like the first URL;
- within `--remote_image_timeout_s` for the whole fetch (resolving, connecting, every hop and
  the body: a server that trickles bytes is cut at the deadline) and `--max_image_bytes`;
- without proxies from the environment (a proxy would resolve the name itself).

`file:` URLs, bare paths and every other scheme are refused: user strings never reach a file
reader. Every refusal is an `InvalidRequest` naming the field (400).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpx

from predictor.errors import InvalidRequest
from predictor.inputs.addresses import AddressPolicy, AddressRefused, Resolver
from predictor.protocol import decode_base64

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class RemotePolicy:
    allowed: bool
    hosts: tuple[str, ...]
    timeout_s: float
    max_bytes: int
    addresses: AddressPolicy = field(default_factory=AddressPolicy)
    max_redirects: int = 0
    resolver: Resolver | None = None  # None: the system's (tests pass a stand-in DNS)

    def host_allowed(self, host: str) -> bool:
        if not self.hosts:
            return True
        host = host.lower()
        return any(
            host == h.lower() or (h.startswith(".") and host.endswith(h.lower()))
            for h in self.hosts
        )


async def fetch_image_url(url: str, policy: RemotePolicy, field: str) -> bytes:
    """The encoded image an `image_url.url` points at."""
    if url.startswith("data:"):
        return decode_base64(url, field)
    _check_scheme(url, field)
    if not policy.allowed:
        raise InvalidRequest(
            field, "remote image URLs are disabled on this server; send a data: URL"
        )
    try:
        return await asyncio.wait_for(_fetch(url, policy, field), policy.timeout_s)
    except asyncio.TimeoutError:
        raise InvalidRequest(field, f"could not be fetched within {policy.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise InvalidRequest(field, f"could not be fetched: {exc}") from None


def _check_scheme(url: str, field: str) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise InvalidRequest(field, "must be a data: URL with base64 image data, or an http(s) URL")


async def _fetch(url: str, policy: RemotePolicy, field: str) -> bytes:
    async with httpx.AsyncClient(
        timeout=policy.timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        for hop in range(policy.max_redirects + 1):
            try:
                if hop:
                    _check_scheme(url, field)
                response = await _get(client, url, policy, field)
            except InvalidRequest as exc:
                if not hop:
                    raise
                reason = str(exc).split(": ", 1)[1]
                raise InvalidRequest(field, f"redirects to {url}: {reason}") from None
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECTS and location:
                    if hop == policy.max_redirects:
                        raise InvalidRequest(field, _redirect_refusal(response, policy))
                    url = urljoin(url, location)
                    continue
                return await _body(response, policy, field)
            finally:
                await response.aclose()
    raise AssertionError("unreachable: the last hop returns or raises")


def _redirect_refusal(response: httpx.Response, policy: RemotePolicy) -> str:
    if policy.max_redirects == 0:
        return f"could not be fetched: HTTP {response.status_code}, a redirect, not followed"
    return f"could not be fetched: more than {policy.max_redirects} redirects"


async def _get(
    client: httpx.AsyncClient, url: str, policy: RemotePolicy, field: str
) -> httpx.Response:
    """GET `url` from one of the checked addresses its host resolves to (streamed)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidRequest(field, f"is not a valid URL ({exc})") from None
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise InvalidRequest(field, "has no host")
    if parsed.userinfo:
        raise InvalidRequest(field, "must not carry credentials")
    if not policy.host_allowed(host):
        raise InvalidRequest(field, f"host {host!r} is not allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = await policy.addresses.resolve(host, port, policy.resolver)
    except AddressRefused as exc:
        raise InvalidRequest(field, f"host {host!r} {exc}; refused") from None
    # The URL's own name stays in the Host header and in TLS; only the TCP peer is pinned.
    headers = {"Host": parsed.netloc.decode("ascii"), "Accept": "image/*"}
    extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
    error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET", parsed.copy_with(host=address), headers=headers, extensions=extensions
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:  # try the host's next address
            error = exc
    assert error is not None
    raise error


async def _body(response: httpx.Response, policy: RemotePolicy, field: str) -> bytes:
    if response.status_code != 200:
        raise InvalidRequest(field, f"could not be fetched: HTTP {response.status_code}")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise InvalidRequest(
            field, f"is {declared} bytes, more than the limit of {policy.max_bytes} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > policy.max_bytes:
            raise InvalidRequest(field, f"is more than the limit of {policy.max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
