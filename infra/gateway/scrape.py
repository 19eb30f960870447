"""The gateway's GET /metrics: this process's Prometheus metrics (its WebSocket clients among
them), answered on the WebSocket port beside /healthz."""

from __future__ import annotations

import http

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from infra.metrics import CONTENT_TYPE, exposition

METRICS_PATH = "/metrics"


def metrics_response(connection: ServerConnection) -> Response:
    response = connection.respond(http.HTTPStatus.OK, exposition().decode())
    del response.headers["Content-Type"]  # respond() says text/plain; Prometheus wants its version
    response.headers["Content-Type"] = CONTENT_TYPE
    return response
