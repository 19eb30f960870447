"""Outgoing webhooks: the signature header (HMAC-SHA256 of the body under the item's secret), the
JSON POST itself (to a checked, resolved address), and the attempts and timeouts of deliveries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field

import httpx

from infra.config import Settings
from infra.delivery.outbound import IPAddress, OutboundPolicy, OutboundRefused, Target

SIGNATURE_HEADER = "X-Pipelines-Signature-256"
# Of a reply, only this much is read: its status and a short excerpt are all that is kept.
_REPLY_BYTES = 4096

__all__ = ["SIGNATURE_HEADER", "DeliveryOptions", "OutboundRefused", "Reply", "post_json", "sign"]


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str  # the start of the body (at most _REPLY_BYTES), for an excerpt


def _pinned(target: Target, ip: IPAddress) -> tuple[httpx.URL, str, str]:
    """The URL with the checked address as its host, the Host header and the (ASCII) name."""
    url = httpx.URL(target.url)
    name = url.raw_host.decode("ascii")
    host = f"[{name}]" if ":" in name else name
    return url.copy_with(host=str(ip)), host + (f":{url.port}" if url.port is not None else ""), name


async def post_json(url: str, body: bytes, headers: dict[str, str], timeout: float, policy: OutboundPolicy) -> Reply:
    """POST to `url` under `policy`: its host is resolved, every address checked, and the request
    sent to a checked address (with the name's Host header and TLS server name), so a DNS answer
    that changes between check and connect cannot redirect it. Redirects are not followed.
    Raises OutboundRefused (nothing sent) or httpx.HTTPError."""
    try:
        return await asyncio.wait_for(_post(url, body, headers, timeout, policy), timeout)
    except TimeoutError:
        raise httpx.TimeoutException(f"no answer within {timeout:g} s") from None


async def _post(url: str, body: bytes, headers: dict[str, str], timeout: float, policy: OutboundPolicy) -> Reply:
    target = policy.check_url(url)
    addresses = await policy.resolve(target)
    last: httpx.HTTPError | None = None
    # A bare transport, not a client: no proxy from the environment, no redirects, and no
    # request line with the URL (which may be a credential) in httpx's own log.
    async with httpx.AsyncHTTPTransport(retries=0) as transport:
        for ip in addresses:
            pinned, host, name = _pinned(target, ip)
            extensions: dict[str, object] = {"timeout": httpx.Timeout(timeout).as_dict()}
            if target.scheme == "https" and target.ip is None:
                extensions["sni_hostname"] = name  # also the name the certificate must match
            request = httpx.Request(
                "POST",
                pinned,
                content=body,
                headers={"Host": host, "User-Agent": "pipelines", "Content-Type": "application/json", **headers},
                extensions=extensions,
            )
            try:
                response = await transport.handle_async_request(request)
            except httpx.ConnectError as exc:
                last = exc  # the next checked address, if any
                continue
            try:
                head = b""
                async for chunk in response.aiter_bytes():
                    head += chunk
                    if len(head) >= _REPLY_BYTES:
                        break
            finally:
                await response.aclose()
            return Reply(response.status_code, head[:_REPLY_BYTES].decode("utf-8", "replace"))
    assert last is not None
    raise last


@dataclass(frozen=True)
class DeliveryOptions:
    notify_attempts: int = 4
    # Seconds before the second delivery attempt; each later wait doubles.
    notify_backoff: float = 1.0
    http_timeout: float = 10.0
    # Where deployers and channels may be reached (PIPELINES_OUTBOUND_ALLOW).
    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        """PIPELINES_NOTIFY_MAX_ATTEMPTS, PIPELINES_NOTIFY_BACKOFF, PIPELINES_NOTIFY_TIMEOUT and
        PIPELINES_OUTBOUND_ALLOW."""
        return cls(
            notify_attempts=settings.notify_max_attempts,
            notify_backoff=settings.notify_backoff,
            http_timeout=settings.notify_timeout,
            outbound=OutboundPolicy(settings.outbound_allow),
        )
