"""The WebSocket server: handshake (health, path, token), connection lifetime, and client requests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import time
import weakref
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nats.aio.client import Client as NATS
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from infra.app.commands import Commands
from infra.app.ports import EventStore
from infra.auth import AuthError, Principal, verify_token
from infra.broker.cursor import cursor_token
from infra.config import Settings
from infra.gateway import frames as fr
from infra.gateway.asgi_host import AsgiHost, routing_connection
from infra.gateway.conn import Conn, Item, Sub
from infra.gateway.fanout import Fanout
from infra.gateway.feed import feed_head, subscribe_after
from infra.gateway.handshake_log import HandshakeLog
from infra.gateway.protocol import BadRequest, Channel, Scope, parse_request
from infra.gateway.scopes import resolve
from infra.gateway.scrape import METRICS_PATH, metrics_response
from infra.gateway.sio import NAMESPACE, SOCKETIO_PATH, SocketIOEvents
from infra.gateway.views import Views
from infra.metrics import websocket_clients
from infra.setaside import GATEWAY, set_aside
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, FeedCursor

log = logging.getLogger("pipelines.gateway")

WS_PATH = "/api/v1/ws"
HEALTH_PATH = "/healthz"


class Gateway:
    """Live run updates and log lines over WebSocket (and Socket.IO), resumable by feed cursor.

        ws://<host>:<port>/api/v1/ws          token in `Authorization: Bearer ...` or `?token=`
        http://<host>:<port>/socket.io/       Socket.IO, namespace `/events` (see infra/gateway/sio.py)
        GET /healthz                          200 `ok` (plain HTTP), 503 while NATS is down
        GET /metrics                          the process's Prometheus metrics (plain HTTP)

    Clients send `{"action": "subscribe"|"unsubscribe", "channel": "runs"|"logs"|"pipelines",
    "params": {"pipelineId"?, "runId"?}, "fromCursor"?: token, "fromPosition"?: n}` and receive

        {"event": "subscribed",           "data": {"channel", "params"}}
        {"event": "pipeline.run.updated", "data": <PipelineRun as of that event>, "position": n, "cursor": c}
        {"event": "pipeline.log",         "data": {"runId", "stage", "message"}, "position": n, "cursor": c}
        {"event": "pipeline.updated",     "data": <Pipeline as of that event>, "position": n, "cursor": c}
        {"event": "pipeline.deleted",     "data": <Pipeline as it was deleted>, "position": n, "cursor": c}
        {"event": "unsubscribed",         "data": {"channel", "params"}}
        {"event": "error",                "data": {"message", ...}}

    `cursor` only goes up in delivery order (the resume token); `position` can go down.

    One JetStream ordered consumer per process reads every event the relay publishes, in feed
    order. It starts right after the stream's last message, whose headers also give the feed cursor
    the live feed starts from, so the gateway always knows exactly where "now" is.

    Serves on settings.gateway_host:gateway_port (port 0: any free port). `ready` is set once it
    listens (and `port` is the bound port); `serve(stop)` returns after `stop` is set and every
    connection has been closed (code 1001).
    """

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        commands: Commands,
        nc: NATS,
        *,
        queue_limit: int = 1000,
        buffer_limit: int | None = None,
        page_size: int = 500,
        max_subscriptions: int = 100,
        write_buffer_limit: int = 256 << 10,
    ) -> None:
        self.settings = settings
        self.store = store
        self.commands = commands
        self.nc = nc
        self.queue_limit = queue_limit
        self.max_subscriptions = max_subscriptions
        self.write_buffer_limit = write_buffer_limit
        self.ready = asyncio.Event()
        self.port = settings.gateway_port
        # An event that cannot be framed is recorded as set aside (poison_events) where the store
        # is PostgreSQL; with another store it is logged and counted only.
        pool = store.pool if isinstance(store, PostgresEventStore) else None
        views = Views(store, set_aside=functools.partial(set_aside, pool, GATEWAY) if pool is not None else None)
        self._fanout = Fanout(
            store,
            views,
            buffer_limit=buffer_limit if buffer_limit is not None else max(queue_limit, 100),
            page_size=page_size,
        )
        self.socketio = SocketIOEvents(settings, commands, store, views, page_size=page_size)
        self._fanout.on_live = self.socketio.publish
        self._principals: weakref.WeakKeyDictionary[ServerConnection, tuple[Principal, float | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._conns: set[Conn] = set()
        self._feed_ready = False
        self._server: Server | None = None

    @property
    def live_cursor(self) -> FeedCursor:
        """The feed cursor of the last event the live feed has dispatched ("now" for a new subscription)."""
        return self._fanout.live_cursor

    # Counters, for tests and logs.
    @property
    def overflows(self) -> int:
        """How many times a client was too slow and its subscriptions fell back to catching up."""
        return self._fanout.overflows

    @property
    def dispatched(self) -> int:
        return self._fanout.dispatched

    @property
    def written_direct(self) -> int:
        """Events written straight to a subscriber's transport."""
        return self._fanout.written_direct

    # ---- lifecycle --------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        feed = await self._start_feed()
        handshakes = HandshakeLog()
        # Socket.IO shares the port: its requests (`/socket.io/`) go to its ASGI app before the
        # WebSocket server parses anything; every other connection is a websockets one, as before.
        asgi = AsgiHost(self.socketio.app, SOCKETIO_PATH)
        self.socketio.start()
        try:
            async with serve(
                self._handler,
                self.settings.gateway_host,
                self.settings.gateway_port,
                process_request=handshakes.timed(self._process_request),
                process_response=handshakes.process_response,
                compression=None,  # frames are encoded once for every subscriber; keep it that way
                max_size=64 * 1024,
                create_connection=routing_connection(asgi),
            ) as server:
                self._server = server
                try:
                    for sock in server.sockets:
                        self.port = sock.getsockname()[1]
                        break
                    log.info(
                        "gateway listening on %s:%d%s (Socket.IO namespace %s at %s)",
                        self.settings.gateway_host,
                        self.port,
                        WS_PATH,
                        NAMESPACE,
                        SOCKETIO_PATH,
                    )
                    self.ready.set()
                    await stop.wait()
                    log.info("gateway stopping: closing %d connections", len(self._conns))
                finally:
                    # Before the server closes: it waits for its connections, these among them.
                    await self.socketio.stop()
                    await asgi.close()
        finally:
            self.ready.clear()
            self._feed_ready = False
            with contextlib.suppress(Exception):
                await feed.unsubscribe()
            for conn in list(self._conns):
                self._close_conn(conn)

    async def _start_feed(self) -> Any:
        """Subscribe to everything after the stream's last message, and learn its feed cursor."""
        stream = self.settings.events_stream
        last_seq, cursor = await feed_head(self.nc, stream, self.settings.events_stream_replicas)
        if cursor != FEED_START:
            self._fanout.live_cursor = cursor
        sub = await subscribe_after(self.nc, stream, last_seq, self._fanout.on_msg)
        self._feed_ready = True
        log.info("live feed from stream %s seq %d (feed cursor %s)", stream, last_seq + 1, self._fanout.live_cursor)
        return sub

    # ---- HTTP: health, path, auth -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == HEALTH_PATH:
            if self._feed_ready and self.nc.is_connected:
                return connection.respond(http.HTTPStatus.OK, "ok")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "nats unavailable")
        if url.path == METRICS_PATH:
            return metrics_response(connection)
        if url.path != WS_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found")
        token = _bearer(request.headers)
        if token is None:
            token = next(iter(parse_qs(url.query).get("token", [])), None)
        if not token:
            return _unauthorized(connection, "missing bearer token")
        try:
            principal = verify_token(self.settings, token)
        except AuthError:
            return _unauthorized(connection, "invalid token")
        if not principal.has("viewer"):
            # Like every HTTP read: a token without a role sees nothing of its organization.
            return connection.respond(http.HTTPStatus.FORBIDDEN, "this connection needs the viewer role")
        self._principals[connection] = (principal, principal.expires)
        return None

    # ---- connections ------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        auth = self._principals.pop(ws, None)
        if auth is None:  # cannot happen: the handshake checked the token
            await ws.close(1008, "unauthorized")
            return
        principal, exp = auth
        conn = Conn(ws, principal, self.queue_limit, self.write_buffer_limit)
        self._conns.add(conn)
        tasks = [
            asyncio.create_task(conn.writer(), name="gateway-writer"),
            asyncio.create_task(self._read(conn), name="gateway-reader"),
        ]
        if exp is not None:
            tasks.append(asyncio.create_task(_expire(ws, exp), name="gateway-token-expiry"))
        websocket_clients.inc()
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            websocket_clients.dec()
            self._close_conn(conn)
            for task in tasks:
                task.cancel()
            for task in tasks:
                try:
                    await task
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
                except Exception as exc:
                    log.warning("connection task failed: %r", exc)

    async def _read(self, conn: Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in conn.ws:
                await self._on_client_frame(conn, message)

    def _close_conn(self, conn: Conn) -> None:
        self._conns.discard(conn)
        for sub in list(conn.subs.values()):
            self._fanout.remove(sub)

    # ---- client requests --------------------------------------------------------------------

    async def _on_client_frame(self, conn: Conn, message: str | bytes) -> None:
        echo: dict[str, Any] = {}
        try:
            req = parse_request(message, echo)
            if req.action == "subscribe":
                await self._subscribe(conn, req.channel, req.params, req.from_position, req.from_cursor)
            else:
                await self._unsubscribe(conn, req.channel, req.params)
        except BadRequest as exc:
            await conn.control("error", {"message": str(exc), **echo})
        except Exception:
            log.exception("client frame failed")
            await conn.control("error", {"message": "internal error", **echo})

    async def _subscribe(
        self,
        conn: Conn,
        channel: Channel,
        params: dict[str, str],
        from_position: int | None,
        from_cursor: FeedCursor | None = None,
    ) -> None:
        scope, key = await resolve(self.commands, conn.principal, params)
        if (channel, scope, key) in conn.subs:
            raise BadRequest(f"already subscribed to {channel} {params or '(all)'}")
        if len(conn.subs) >= self.max_subscriptions:
            raise BadRequest(f"at most {self.max_subscriptions} subscriptions per connection")
        start: FeedCursor | None
        if from_cursor is not None:
            start = from_cursor  # a cursor needs no look-up: the feed continues right after it
        elif from_position is None:
            start = None
        elif from_position == 0:
            start = FEED_START
        else:
            start = await self.store.cursor_of(from_position)
            if start is None:
                raise BadRequest(f"unknown position {from_position}")
        if conn not in self._conns or (channel, scope, key) in conn.subs:  # closed or raced meanwhile
            return
        if start is None:
            start = self._fanout.now()
        cursor = start
        sub = Sub(conn, channel, scope, key, params, enqueued=cursor, sent=cursor)
        self._fanout.add(sub)
        data: dict[str, Any] = {"channel": channel, "params": params}
        if from_cursor is not None:
            data["fromCursor"] = cursor_token(from_cursor)
            self._fanout.start_catch_up(sub)
        elif from_position is not None:
            data["fromPosition"] = from_position
            self._fanout.start_catch_up(sub)
        conn.push([Item(fr.control("subscribed", data))])

    async def _unsubscribe(self, conn: Conn, channel: Channel, params: dict[str, str]) -> None:
        run_id, pipeline_id = params.get("runId"), params.get("pipelineId")
        ident: tuple[Channel, Scope, str]
        if run_id is not None:
            ident = (channel, "run", run_id)
        elif pipeline_id is not None:
            ident = (channel, "pipeline", pipeline_id)
        else:
            ident = (channel, "org", conn.principal.org or "")
        sub = conn.subs.get(ident)
        if sub is None:
            raise BadRequest("not subscribed")
        self._fanout.remove(sub)
        conn.drop_events(sub)
        await conn.control("unsubscribed", {"channel": channel, "params": params})


async def _expire(ws: ServerConnection, exp: float) -> None:
    """Close the connection when its token expires: a session lives no longer than its token."""
    await asyncio.sleep(max(0.0, exp - time.time()))
    await ws.close(1008, "token expired")


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _unauthorized(connection: ServerConnection, message: str) -> Response:
    response = connection.respond(http.HTTPStatus.UNAUTHORIZED, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="pipelines"'
    return response
