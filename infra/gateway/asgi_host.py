"""One port, two servers: the WebSocket server's connections that ask for an ASGI path (Socket.IO's
`/socket.io/`) are handed, before anything is parsed, to uvicorn's HTTP protocol serving an ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState
from websockets.asyncio.server import ServerConnection

log = logging.getLogger("pipelines.gateway")

# Longest request line read before deciding (a request line longer than this is not ours anyway).
_HEAD_LIMIT = 8192
# A connection must send its request line within this many seconds.
_HEAD_TIMEOUT = 10.0


class AsgiHost:
    """Runs an ASGI app on connections handed over by the WebSocket server (see `routing_connection`).

    The raw WebSocket connections are untouched websockets connections (their fast write path
    included): the only cost for them is reading their request line once before it is parsed."""

    def __init__(self, app: Any, prefix: str, *, ws_max_size: int = 64 * 1024) -> None:
        self.prefix = prefix.encode()
        self._config = Config(
            app,
            interface="asgi3",
            lifespan="off",
            http="h11",
            ws="websockets-sansio",
            ws_max_size=ws_max_size,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
        )
        self._config.load()
        self._state = ServerState()
        self._app_state: dict[str, Any] = {}
        self.undecided: set[asyncio.Transport] = set()

    def wants(self, request_line: bytes) -> bool:
        """Whether a request line (`GET /socket.io/?EIO=4... HTTP/1.1`) is for the ASGI app."""
        parts = request_line.split(b" ", 2)
        return len(parts) == 3 and parts[1].startswith(self.prefix)

    def take(self, transport: asyncio.Transport, head: bytes) -> None:
        """Serve this connection, whose first bytes were `head`, with the ASGI app."""
        factory: Any = self._config.http_protocol_class  # uvicorn's H11Protocol
        protocol: asyncio.Protocol = factory(config=self._config, server_state=self._state, app_state=self._app_state)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(head)

    async def close(self, timeout: float = 2.0) -> None:
        """Ask every connection to close (after its response), then abort what is left."""
        for transport in list(self.undecided):
            transport.abort()
        for connection in list(self._state.connections):
            connection.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                # uvicorn signals nothing when a connection ends: look (as its own shutdown does).
                while self._state.connections:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        for connection in list(self._state.connections):
            left: asyncio.Transport | None = getattr(connection, "transport", None)
            if left is not None:
                left.abort()
        for task in list(self._state.tasks):
            task.cancel()


def routing_connection(host: AsgiHost) -> type[ServerConnection]:
    """A websockets connection class (`serve(create_connection=...)`) that reads the request line
    first: a request for `host` goes to it; anything else becomes this websockets connection, as if
    nothing had happened (the handshake, its timeout and `process_request` start only then)."""

    class RoutingConnection(ServerConnection):
        _routed = False
        _head = b""
        _pending: asyncio.Transport | None = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self._pending = transport
            host.undecided.add(transport)
            self._timer = asyncio.get_running_loop().call_later(_HEAD_TIMEOUT, transport.abort)

        def data_received(self, data: bytes) -> None:
            if self._routed:
                super().data_received(data)
                return
            self._head += data
            end = self._head.find(b"\r\n")
            if end < 0 and len(self._head) < _HEAD_LIMIT:
                return
            transport, head = self._pending, self._head
            assert transport is not None
            self._decided(transport)
            if end >= 0 and host.wants(head[:end]):
                self._pending = None
                host.take(transport, head)
                return
            self._routed = True
            super().connection_made(transport)
            super().data_received(head)

        def _decided(self, transport: asyncio.Transport) -> None:
            host.undecided.discard(transport)
            self._head = b""
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def eof_received(self) -> None:
            if self._routed:
                super().eof_received()
            elif self._pending is not None:
                self._pending.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._routed:
                super().connection_lost(exc)
            elif self._pending is not None:
                self._decided(self._pending)

        def pause_writing(self) -> None:
            if self._routed:
                super().pause_writing()

        def resume_writing(self) -> None:
            if self._routed:
                super().resume_writing()

    return RoutingConnection
