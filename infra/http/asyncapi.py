"""GET /api/v1/asyncapi.json: the AsyncAPI 3 document of NATS subjects, WebSocket and Socket.IO (no token)."""

from __future__ import annotations

from typing import Any

from litestar import get

from infra.asyncapi import asyncapi_document
from infra.asyncapi.document import ASYNCAPI_URL

__all__ = ["ASYNCAPI_URL", "asyncapi"]


@get(ASYNCAPI_URL, summary="AsyncAPI 3 document of the events, logs and notifications", tags=["definitions"])
async def asyncapi() -> dict[str, Any]:
    return asyncapi_document()
