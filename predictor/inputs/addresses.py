"""Which network addresses the server may connect to on a client's behalf.

Why: a remote image URL makes the server open a connection that the client chooses. Without a
check, `http://127.1:8080/v2/repository/...`, a cloud metadata address (169.254.169.254) or a
name that resolves to a pod IP reaches what only the server can reach. The check is made on
the addresses a host *resolves to*, never on its spelling: the resolver is what turns
`2130706433`, `0x7f000001`, `127.1` or `localhost` into 127.0.0.1, so the checked address is
exactly the one the connection then goes to (the caller connects to it, without resolving
again, so a DNS answer that changes between check and connection cannot slip through).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses it resolves to (tests may pass their own resolver)
Resolver = Callable[[str, int], Awaitable[list[str]]]

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses embedded for a NAT64 gateway
# (the test, the reason) in the order the reasons are told; ipaddress's is_private covers
# loopback and link-local too, so the more precise reasons come first.
_REASONS: tuple[tuple[Callable[[IPAddress], bool], str], ...] = (
    (lambda a: a.is_unspecified, "an unspecified address"),
    (lambda a: a.is_loopback, "a loopback address"),
    (lambda a: a.is_link_local, "a link-local address"),
    (lambda a: a.is_multicast, "a multicast address"),
    (lambda a: a.is_reserved, "a reserved address"),
    (lambda a: a.is_private, "a private address"),
    (lambda a: isinstance(a, ipaddress.IPv6Address) and a.is_site_local, "a site-local address"),
    (lambda a: not a.is_global, "not a public address"),
)


class AddressRefused(Exception):
    """The host resolves to an address the server must not connect to."""


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (v4-mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address, as a phrase (None: it is one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal_reason(address.ipv4_mapped)  # the socket connects to the IPv4 address
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = refusal_reason(embedded)
        if reason is not None:
            return reason
    for test, reason in _REASONS:
        if test(address):
            return reason
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses only, plus the networks an operator allows (an in-cluster store)."""

    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_strings(cls, networks: Iterable[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks))

    def check(self, address: IPAddress) -> None:
        """Raise `AddressRefused` unless the server may connect to `address`."""
        reason = refusal_reason(address)
        if reason is None or any(_within(address, net) for net in self.allowed_networks):
            return
        raise AddressRefused(f"resolves to {address}, {reason}")

    async def resolve(self, host: str, port: int, resolver: Resolver | None = None) -> list[str]:
        """Every address `host` resolves to, all checked (one refused address refuses the
        host: a name that mixes public and internal answers is not one to trust)."""
        found = await (resolver or system_resolver)(host, port)
        if not found:
            raise AddressRefused("resolves to no address")
        checked = []
        for text in found:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
            self.check(address)
            checked.append(str(address))
        return checked


def _within(address: IPAddress, network: IPNetwork) -> bool:
    if address.version != network.version:
        embedded = _embedded_ipv4(address)
        return embedded is not None and embedded in network
    return address in network


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system's resolver gives for `host`, in its order of
    preference, without duplicates (the same lookup a connection to `host` would make)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressRefused(f"could not be resolved ({exc.strerror})") from None
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses
