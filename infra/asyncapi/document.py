"""Assembles the AsyncAPI 3.0 document from its NATS and gateway parts."""

from __future__ import annotations

import functools
from typing import Any

from infra.asyncapi.gateway import websocket_parts
from infra.asyncapi.nats import core_channels, event_channels
from infra.asyncapi.schemas import model_components

ASYNCAPI_URL = "/api/v1/asyncapi.json"

_DESCRIPTION = """\
What Pipelines publishes and streams. Every stored event goes on JetStream (stream PIPELINES_EVENTS) as
`pipelines.v1.<org>.<aggregate>.<id>.<event_type>`, in feed order, once, with its id in `Nats-Msg-Id`,
CloudEvents headers (binary mode) and its feed cursor (`Pipelines-Position`, `Pipelines-Tx`). Live log chunks
and notifications go on core NATS. The gateway streams run updates and log lines over a WebSocket and over
Socket.IO. The HTTP API is described by its OpenAPI document at /schema/openapi.json."""


@functools.cache
def _document() -> dict[str, Any]:
    payloads, schemas = model_components()
    ev_channels, ev_operations, ev_messages = event_channels(payloads)
    core_ch, core_ops, core_msgs, core_schemas = core_channels()
    ws_ch, ws_ops, ws_msgs, ws_schemas = websocket_parts()
    variable = {"description": "host:port"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Pipelines events", "version": "1.0.0", "description": _DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "{host}",
                "protocol": "nats",
                "description": "The NATS server of the deployment (PIPELINES_NATS_URL), JetStream on.",
                "variables": {"host": {**variable, "default": "127.0.0.1:4222"}},
            },
            "gateway": {
                "host": "{host}",
                "protocol": "ws",
                "description": "The gateway (PIPELINES_GATEWAY_PORT); its token rules are the channel's.",
                "variables": {"host": {**variable, "default": "127.0.0.1:8081"}},
                "security": [
                    {"$ref": "#/components/securitySchemes/bearer"},
                    {"$ref": "#/components/securitySchemes/queryToken"},
                ],
            },
            "gatewaySocketIO": {
                "host": "{host}",
                "protocol": "ws",
                "pathname": "/socket.io/",
                "description": "Socket.IO on the gateway's port, at Socket.IO's default path.",
                "variables": {"host": {**variable, "default": "127.0.0.1:8081"}},
                "security": [{"$ref": "#/components/securitySchemes/queryToken"}],
            },
        },
        "channels": {**ev_channels, **core_ch, **ws_ch},
        "operations": {**ev_operations, **core_ops, **ws_ops},
        "components": {
            "schemas": {**schemas, **core_schemas, **ws_schemas},
            "messages": {**ev_messages, **core_msgs, **ws_msgs},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "queryToken": {"type": "httpApiKey", "name": "token", "in": "query"},
            },
        },
    }


def asyncapi_document() -> dict[str, Any]:
    """The document (built once; callers must not change it)."""
    return _document()
