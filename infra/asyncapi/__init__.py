"""The AsyncAPI 3 document of what the system publishes and streams (NATS, WebSocket, Socket.IO)."""

from infra.asyncapi.document import asyncapi_document

__all__ = ["asyncapi_document"]
