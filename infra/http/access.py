"""One request line per HTTP request (infra.logs.log_request), and its X-Request-Id.

The middleware (outermost) starts the clock and picks the request id; the `before_send` hook logs
the status actually sent, which for an exception (a 401 of the auth middleware, a 500) is only
known after litestar's exception handlers answered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from infra.logs import log_request, request_id

__all__ = ["access_log", "log_response"]

_KEY = "pipelines.access"


@dataclass
class _Entry:
    began: float
    rid: str
    logged: bool = False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _log(scope: Scope, entry: _Entry, status: int) -> None:
    entry.logged = True
    method, path = str(scope.get("method", "")), str(scope.get("path", ""))
    log_request(method, path, status, time.monotonic() - entry.began, entry.rid)


def access_log(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        entry = _Entry(time.monotonic(), request_id(_header(scope, b"x-request-id")))
        scope[_KEY] = entry  # type: ignore[literal-required]
        # An exception goes on to litestar's handlers, whose answer log_response logs.
        await app(scope, receive, send)
        if not entry.logged:  # returned without a response
            _log(scope, entry, 500)

    return middleware


async def log_response(message: Message, scope: Scope) -> None:
    if message["type"] != "http.response.start":
        return
    entry: Any = scope.get(_KEY)
    if not isinstance(entry, _Entry):
        # Refused by the router (no such path or method) before any middleware ran: it took no time.
        entry = _Entry(time.monotonic(), request_id(_header(scope, b"x-request-id")))
    if not entry.logged:
        MutableScopeHeaders.from_message(message)["X-Request-Id"] = entry.rid
        _log(scope, entry, int(message["status"]))
