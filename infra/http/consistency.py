"""Read-your-writes for the read models: every command's response says the store position it wrote
(`Pipelines-Position`); a read that names a position (`Pipelines-Min-Position` or `?minPosition=`)
waits, bounded, until the projector has passed it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import parse_qs

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from infra.app.positions import tracking
from infra.http.queries import ReadModels

POSITION_HEADER = "Pipelines-Position"
MIN_POSITION_HEADER = "Pipelines-Min-Position"
MIN_POSITION_QUERY = "minPosition"
# Answered (with the rows as they are) when the projector had not passed the position in time.
STALE_HEADER = "Pipelines-Stale"
# How long a read waits for the projector; it answers stale after that, never an error.
MAX_WAIT = 5.0
_MAX_POSITION = 2**63 - 1


class BadPosition(ValueError):
    pass


def min_position(scope: Scope) -> int | None:
    """The position a read asks for: the header, else the query parameter; None when neither."""
    raw: str | None = None
    for name, value in scope.get("headers", ()):
        if name.decode("latin-1").lower() == MIN_POSITION_HEADER.lower():
            raw = value.decode("latin-1")
    where = MIN_POSITION_HEADER
    if raw is None:
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(MIN_POSITION_QUERY)
        if not values:
            return None
        raw, where = values[-1], MIN_POSITION_QUERY
    if not raw.strip().isdigit() or not 0 <= int(raw) <= _MAX_POSITION:
        raise BadPosition(where)
    return int(raw)


async def wait_projected(read_models: ReadModels, position: int, timeout: float = MAX_WAIT) -> bool:
    """Wait until the projector has passed `position`; False when it had not within `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not await read_models.projected_past(position):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return True


def _with_header(send: Send, name: str, value: Callable[[], str | None]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            text = value()
            if text is not None:
                headers = [*message.get("headers", ()), (name.lower().encode(), text.encode())]
                message = {**message, "headers": headers}
        await send(message)

    return wrapped


def _bad_request(where: str) -> bytes:
    message = f"{where} must be a store position: an integer from 0 to {_MAX_POSITION}"
    return msgspec.json.encode(
        {"statusCode": 400, "error": "Bad Request", "message": message, "errors": [{"path": where, "message": message}]}
    )


class ReadYourWrites:
    """ASGI middleware (after authentication): adds `Pipelines-Position` to a write's response, and
    makes a read with a minimum position wait for the projector."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self._read(scope, receive, send)
            return
        with tracking() as written:
            await self.app(scope, receive, _with_header(send, POSITION_HEADER, lambda: _positive(written[0])))

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            wanted = min_position(scope)
        except BadPosition as exc:
            body = _bad_request(str(exc))
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send(cast("Message", {"type": "http.response.start", "status": 400, "headers": headers}))
            await send(cast("Message", {"type": "http.response.body", "body": body}))
            return
        if wanted is None:
            await self.app(scope, receive, send)
            return
        read_models: ReadModels = scope["app"].state.deps.read_models
        fresh = await wait_projected(read_models, wanted)
        await self.app(scope, receive, _with_header(send, STALE_HEADER, lambda: None if fresh else "true"))


def _positive(position: int) -> str | None:
    return str(position) if position > 0 else None


__all__ = ["ReadYourWrites", "wait_projected"]
