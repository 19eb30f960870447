"""Where outbound HTTP may go: a URL's host (numeric forms normalised, names resolved) must be a
public address unless PIPELINES_OUTBOUND_ALLOW lists it; URLs with credentials are refused."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses it resolves to (an empty list when it resolves to nothing).
Resolver = Callable[[str, int], Awaitable[list[str]]]

# What inet_aton takes: one to four parts, each decimal, octal (leading 0) or hex (0x).
_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_EXCEPTIONS = "PIPELINES_OUTBOUND_ALLOW lists exceptions"


class OutboundRefused(Exception):
    """The URL or an address its host resolves to may not be reached; the message says why."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_ip(host: str) -> IPAddress | None:
    """The address a host literal denotes (`2130706433`, `0x7f.1`, `127.1`, `::ffff:127.0.0.1`,
    as the system's resolver reads them), or None for a name; IPv4-mapped IPv6 is that IPv4."""
    text = host.strip("[]")
    try:
        ip: IPAddress = ipaddress.ip_address(text)
    except ValueError:
        if not _NUMERIC_V4.match(text):
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(text.rstrip(".")))
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def reaches(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries to (NAT64, 6to4), which is what gets checked."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def why_not_public(ip: IPAddress) -> str | None:
    """Which kind of non-public address `ip` is, or None when it is a public one."""
    checks: list[tuple[bool, str]] = [
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and (ip == _BROADCAST), "broadcast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "shared (CGNAT)"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.teredo is not None, "Teredo"),
        (not ip.is_global, "non-global"),
    ]
    return next((kind for bad, kind in checks if bad), None)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL: its scheme, its host as written (lowercased), and its port."""

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress | None  # when the host is an address literal


@dataclass(frozen=True)
class OutboundPolicy:
    allow: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False, repr=False)

    def allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)

    def check_address(self, ip: IPAddress, host: str, *, resolved: bool = False) -> None:
        """Refuses a non-public address that PIPELINES_OUTBOUND_ALLOW does not list."""
        subject = reaches(ip)
        kind = why_not_public(subject)
        if kind is None or self.allowed(subject):
            return
        if subject != ip:
            kind += f" address ({subject}) inside an IPv6"
        if resolved:
            what = f"{host} resolves to {ip}, {_a(kind)} address"
        elif host.strip("[]") == str(ip):
            what = f"{ip} is {_a(kind)} address"
        else:
            what = f"{host} is {ip}, {_a(kind)} address"
        raise OutboundRefused(f"{what}: outbound requests go to public addresses only ({_EXCEPTIONS})")

    def check_url(self, url: str) -> Target:
        """What can be decided without DNS: the URL's form, credentials, and an address literal."""
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise OutboundRefused("must not contain whitespace or control characters")
        try:
            parts = urlsplit(url)
            httpx.URL(url)  # what the request will be made of
        except (ValueError, httpx.InvalidURL) as exc:
            raise OutboundRefused(f"is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise OutboundRefused("must be an http or https URL")
        if "@" in parts.netloc:
            raise OutboundRefused("must not contain credentials (user:password@): use the secret to sign requests")
        host = (parts.hostname or "").lower()
        if not host:
            raise OutboundRefused("must name a host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise OutboundRefused("has an invalid port") from None
        ip = parse_ip(host)
        if ip is None and _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
            raise OutboundRefused(f"{host} is not a valid IP address")
        if ip is not None:
            self.check_address(ip, host)
        elif host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost"):
            loopback = ipaddress.IPv4Address("127.0.0.1")
            if not self.allowed(loopback):
                raise OutboundRefused(
                    f"{host} is a loopback name: outbound requests go to public addresses only ({_EXCEPTIONS})"
                )
        return Target(url=url, scheme=parts.scheme, host=host, port=port, ip=ip)

    async def resolve(self, target: Target) -> list[IPAddress]:
        """Every address the target's host resolves to, each checked: one refused address refuses
        the whole name (a client might have picked it). Connect to one of these, not to the name."""
        if target.ip is not None:
            return [target.ip]
        try:
            found = await self.resolver(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise OutboundRefused(f"{target.host} does not resolve: {getattr(exc, 'strerror', None) or exc}") from None
        addresses = _parsed(found)
        if not addresses:
            raise OutboundRefused(f"{target.host} does not resolve to any address")
        for ip in addresses:
            self.check_address(ip, target.host, resolved=True)
        return addresses


def _parsed(found: Iterable[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for text in found:
        ip = parse_ip(text)
        if ip is None:
            raise OutboundRefused(f"the resolver answered {text!r}, which is not an address")
        if ip not in out:
            out.append(ip)
    return out


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


async def check_saved(policy: OutboundPolicy, url: str, timeout: float = 2.0) -> None:
    """The save-time check: the URL's form and literal address, and, when its name resolves now,
    every address it resolves to. A name that does not resolve (yet) is accepted: the connect-time
    check decides then."""
    target = policy.check_url(url)
    if target.ip is not None:
        return
    try:
        async with asyncio.timeout(timeout):
            found = await policy.resolver(target.host, target.port)
    except (OSError, UnicodeError, TimeoutError):
        return
    for ip in _parsed(found):
        policy.check_address(ip, target.host, resolved=True)
