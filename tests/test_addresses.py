"""Which addresses the server may connect to for a remote image (no network needed)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from predictor.inputs.addresses import AddressPolicy, AddressRefused, refusal_reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),  # v4-mapped
        ("2002:7f00:1::", "a loopback address"),  # 6to4 of 127.0.0.1
        ("64:ff9b::7f00:1", "a loopback address"),  # NAT64 of 127.0.0.1
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("10.0.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.0.1", "a private address"),
        ("::ffff:192.168.0.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.251", "a multicast address"),
        ("ff05::2", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("100.64.0.1", "not a public address"),
        ("fec0::1", "a site-local address"),
        ("93.184.216.34", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_refusal_reason(address: str, reason: str | None) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


def test_allowed_networks_admit_internal_addresses_and_only_those() -> None:
    policy = AddressPolicy.from_strings(["10.20.0.0/16", "fd00::/8"])
    policy.check(ipaddress.ip_address("10.20.3.4"))
    policy.check(ipaddress.ip_address("::ffff:10.20.3.4"))
    policy.check(ipaddress.ip_address("fd00::5"))
    with pytest.raises(AddressRefused, match="a private address"):
        policy.check(ipaddress.ip_address("10.21.0.1"))
    with pytest.raises(AddressRefused, match="a loopback address"):
        policy.check(ipaddress.ip_address("127.0.0.1"))


def test_every_resolved_address_is_checked() -> None:
    async def dns(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "fe80::1%eth0"]

    with pytest.raises(AddressRefused, match="fe80::1, a link-local address"):
        asyncio.run(AddressPolicy().resolve("mixed.example", 80, dns))


def test_the_system_resolver_reads_odd_spellings_as_the_connection_would() -> None:
    for spelling in ("127.1", "2130706433", "0x7f000001", "localhost"):
        with pytest.raises(AddressRefused, match=r"127\.0\.0\.1, a loopback address"):
            asyncio.run(AddressPolicy().resolve(spelling, 80))
