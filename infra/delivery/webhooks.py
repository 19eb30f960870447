"""Outgoing webhooks: the signature header (HMAC-SHA256 of the body under the item's secret), the
JSON POST itself, and the attempts and timeouts of deliveries."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import httpx

from infra.config import Settings

SIGNATURE_HEADER = "X-Pipelines-Signature-256"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post_json(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        response = await client.post(url, content=body, headers={"Content-Type": "application/json", **headers})
        return response.status_code, response.text[:500]


@dataclass
class DeliveryOptions:
    notify_attempts: int = 4
    # Seconds before the second delivery attempt; each later wait doubles.
    notify_backoff: float = 1.0
    http_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        """PIPELINES_NOTIFY_MAX_ATTEMPTS, PIPELINES_NOTIFY_BACKOFF and PIPELINES_NOTIFY_TIMEOUT."""
        return cls(
            notify_attempts=settings.notify_max_attempts,
            notify_backoff=settings.notify_backoff,
            http_timeout=settings.notify_timeout,
        )
