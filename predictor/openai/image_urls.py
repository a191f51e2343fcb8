"""Turn an `image_url` into encoded image bytes, under the server's rules.

Why so strict: a URL is a request for the server to read something. `data:` URLs are decoded
(strict base64). `http(s)` URLs are fetched only with `--allow_remote_images`, from the hosts
in `--remote_image_hosts` (any host if empty), without following redirects (a redirect could
leave the allow-list), within `--remote_image_timeout_s` and `--max_image_bytes`. `file:`
URLs, bare paths and every other scheme are refused: user strings never reach a file reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from predictor.errors import InvalidRequest
from predictor.images import decode_base64


@dataclass(frozen=True)
class RemotePolicy:
    allowed: bool
    hosts: tuple[str, ...]
    timeout_s: float
    max_bytes: int

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
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidRequest(field, "must be a data: URL with base64 image data, or an http(s) URL")
    if not policy.allowed:
        raise InvalidRequest(
            field, "remote image URLs are disabled on this server; send a data: URL"
        )
    if not parts.hostname or not policy.host_allowed(parts.hostname):
        raise InvalidRequest(field, f"host {parts.hostname!r} is not allowed")
    try:
        return await _download(url, policy, field)
    except httpx.HTTPError as exc:
        raise InvalidRequest(field, f"could not be fetched: {exc}") from None


async def _download(url: str, policy: RemotePolicy, field: str) -> bytes:
    async with (
        httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as client,
        client.stream("GET", url) as response,
    ):
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
