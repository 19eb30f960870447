"""The gateway's request lines (handshakes, /healthz, /metrics), in the API's format (infra.logs)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from infra.logs import log_request, request_id

ProcessRequest = Callable[[ServerConnection, Request], Response | None]


class HandshakeLog:
    """`timed(process_request)` starts each request's clock; `process_response` logs the answer
    (101 for an accepted WebSocket) with the path only: a `?token=` never reaches a log."""

    def __init__(self) -> None:
        self._began: weakref.WeakKeyDictionary[ServerConnection, float] = weakref.WeakKeyDictionary()

    def timed(self, process_request: ProcessRequest) -> ProcessRequest:
        def timed_request(connection: ServerConnection, request: Request) -> Response | None:
            self._began[connection] = time.monotonic()
            return process_request(connection, request)

        return timed_request

    def process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        began = self._began.pop(connection, None)
        rid = request_id(request.headers.get("X-Request-Id"))
        response.headers["X-Request-Id"] = rid
        took = time.monotonic() - began if began is not None else 0.0
        log_request("GET", urlsplit(request.path).path, response.status_code, took, rid)
