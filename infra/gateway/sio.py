"""Socket.IO `/events` (the API reference's live events): `pipeline.run.updated` and `pipeline.log`
for every run of the client's organization, narrowed by `subscribe`, from the gateway's frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

import msgspec
import socketio

from domain import events as ev
from infra.app.commands import Commands
from infra.app.ports import EventStore
from infra.auth import AuthError, Principal, verify_token
from infra.broker.cursor import parse_cursor_token
from infra.config import Settings
from infra.gateway import frames as fr
from infra.gateway.protocol import BadRequest, Scope
from infra.gateway.scopes import resolve
from infra.gateway.views import Views
from infra.store.records import FEED_START, FeedCursor, RecordedEvent

log = logging.getLogger("pipelines.gateway")

NAMESPACE = "/events"
SOCKETIO_PATH = "/socket.io/"
_encoder = msgspec.json.Encoder()


class _Json:
    """python-socketio's JSON, by msgspec: an event's payload is spliced in already encoded (msgspec.Raw)."""

    @staticmethod
    def dumps(obj: Any, **_: Any) -> str:
        return _encoder.encode(obj).decode()

    @staticmethod
    def loads(text: str | bytes, **_: Any) -> Any:
        return json.loads(text)


class _Packet(socketio.packet.Packet):  # type: ignore[misc]
    json = _Json


@dataclass(eq=False)
class _Client:
    principal: Principal
    rooms: set[str] = field(default_factory=set)
    expiry: asyncio.Task[None] | None = None


def _org_room(org: str | None) -> str:
    return f"org:{org or ''}"


class SocketIOEvents:
    """The `/events` namespace. Events come from the gateway's live feed (`publish`), one at a time
    in feed order, and go out from a task of their own, so that raw WebSocket clients never wait
    for Socket.IO ones. Each event's payload is the gateway's frame for it (built once, cached and
    shared with the raw clients); it is emitted once to the rooms it is for: `org:<org>` (everyone of
    the organization who did not narrow), `pipeline:<id>` and `run:<id>` (who subscribed to them).

        io("<gateway>/events", {auth: {token}})      or `?token=`, `Authorization: Bearer`, `access_token` cookie
        socket.on("pipeline.run.updated", (run, {position, cursor}) => ...)
        socket.on("pipeline.log", ({runId, stage, message}, {position, cursor}) => ...)
        socket.emit("subscribe", {runId} | {pipelineId}, (ack) => ...)   ack: {ok: true, ...} | {ok: false, error}
        socket.emit("subscribe", {runId?, pipelineId?, fromCursor}, ...)  first what was missed, then live

    A `subscribe` with `fromCursor` replays from the store what came after it, in feed order, then
    joins its room: the last part of the replay is read with the emitter paused, up to the last
    event the emitter handled (everything after it is still to be emitted to the room): no gap, no
    duplicate, whatever else the client is subscribed to.
    """

    def __init__(
        self,
        settings: Settings,
        commands: Commands,
        store: EventStore,
        views: Views,
        *,
        backlog: int = 100_000,
        page_size: int = 500,
    ) -> None:
        self.settings = settings
        self.commands = commands
        self.store = store
        self.views = views
        self.backlog = backlog
        self.page_size = page_size
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            serializer=_Packet,
            # The engine's own check: a browser page of another origin cannot use a visitor's cookie.
            cors_allowed_origins=None,
            max_http_buffer_size=64 * 1024,
            logger=False,
            engineio_logger=False,
        )
        self.app = socketio.ASGIApp(self.sio, socketio_path=SOCKETIO_PATH.strip("/"))
        self.sio.on("connect", self._on_connect, namespace=NAMESPACE)
        self.sio.on("disconnect", self._on_disconnect, namespace=NAMESPACE)
        self.sio.on("subscribe", self._on_subscribe, namespace=NAMESPACE)
        self._clients: dict[str, _Client] = {}
        self._pending: deque[RecordedEvent] = deque()
        # The emitter holds it while it handles an event; `_last` is the last event it handled.
        self._lock = asyncio.Lock()
        self._last: FeedCursor = FEED_START
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropping: asyncio.Task[None] | None = None
        self.emitted = 0  # events emitted (for tests and logs)
        self.dropped = 0  # events not emitted because the backlog was full (their clients were disconnected)

    @property
    def clients(self) -> int:
        return len(self._clients)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._emitter(), name="gateway-socketio-emitter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in self._clients.values():
            if client.expiry is not None:
                client.expiry.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.shutdown(), 5)

    # ---- events -----------------------------------------------------------------------------

    def publish(self, rec: RecordedEvent) -> None:
        """A live event, in feed order (from the gateway's dispatcher: must not wait)."""
        kind, _ = ev.aggregate_of(rec.stream_id)
        if not self._clients or kind not in ("run", "runlog"):
            if not self._pending:  # nothing before it is still to be emitted: handled
                self._last = rec.cursor
            return
        if len(self._pending) >= self.backlog:
            # Far behind: rather than a silent gap, every client goes and comes back with the
            # cursor of the last event it had (`subscribe` with `fromCursor`).
            self.dropped += len(self._pending) + 1
            log.warning("socket.io: %d events behind; disconnecting %d clients", self.backlog, len(self._clients))
            self._pending.clear()
            self._last = rec.cursor
            self._dropping = asyncio.create_task(self._disconnect(list(self._clients)))
            return
        self._pending.append(rec)
        self._wake.set()

    async def _disconnect(self, sids: list[str]) -> None:
        for sid in sids:
            with contextlib.suppress(Exception):
                await self.sio.disconnect(sid, namespace=NAMESPACE)

    async def _emitter(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            async with self._lock:
                rec = self._pending.popleft()
                try:
                    await self._emit(rec)
                except Exception:
                    log.exception("socket.io: emitting position %d failed", rec.position)
                self._last = rec.cursor

    async def _emit(self, rec: RecordedEvent) -> None:
        owner = await self.views.owner(rec.stream_id)
        if owner is None:
            return
        _, run_id = ev.aggregate_of(rec.stream_id)
        rooms = [_org_room(owner.org), f"run:{run_id}"]
        if owner.pipeline_id is not None:
            rooms.append(f"pipeline:{owner.pipeline_id}")
        for frame in await self.views.frames(rec):
            env = fr.envelope(frame)
            meta = {"position": env.position, "cursor": env.cursor}
            # One encoding per event for every recipient (python-socketio encodes an emit once).
            await self.sio.emit(env.event, (env.data, meta), to=rooms, namespace=NAMESPACE)
        self.emitted += 1

    # ---- clients ----------------------------------------------------------------------------

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = _token(environ, auth)
        if not token:
            raise socketio.exceptions.ConnectionRefusedError("missing token")
        try:
            principal = verify_token(self.settings, token)
        except AuthError:
            raise socketio.exceptions.ConnectionRefusedError("invalid token") from None
        if not principal.has("viewer"):
            # Like every HTTP read and the raw WebSocket: a token without a role sees nothing.
            raise socketio.exceptions.ConnectionRefusedError("this connection needs the viewer role")
        client = _Client(principal, {_org_room(principal.org)})
        self._clients[sid] = client
        await self.sio.enter_room(sid, _org_room(principal.org), namespace=NAMESPACE)
        if principal.expires is not None:
            client.expiry = asyncio.create_task(self._expire(sid, principal.expires), name="gateway-socketio-expiry")

    async def _on_disconnect(self, sid: str, *_: Any) -> None:
        client = self._clients.pop(sid, None)
        if client is not None and client.expiry is not None and client.expiry is not asyncio.current_task():
            client.expiry.cancel()

    async def _expire(self, sid: str, exp: float) -> None:
        """A session lives no longer than its token (as on the raw WebSocket)."""
        await asyncio.sleep(max(0.0, exp - time.time()))
        await self.sio.emit("session.expired", {"message": "token expired"}, to=sid, namespace=NAMESPACE)
        await self.sio.disconnect(sid, namespace=NAMESPACE)

    async def _on_subscribe(self, sid: str, data: Any = None) -> dict[str, Any]:
        """Narrow to one run or pipeline (more `subscribe`s add more), or resume (`fromCursor`);
        the answer is the ack, sent once the client is live."""
        client = self._clients.get(sid)
        if client is None:
            return {"ok": False, "error": "not connected"}
        try:
            params, after = _subscribe_params(data)
            scope, key = await resolve(self.commands, client.principal, params)
        except BadRequest as exc:
            return {"ok": False, "error": str(exc)}
        room = f"{scope}:{key}"
        org_room = _org_room(client.principal.org)
        if room != org_room and org_room in client.rooms:
            client.rooms.discard(org_room)
            await self.sio.leave_room(sid, org_room, namespace=NAMESPACE)
        answer: dict[str, Any] = {"ok": True, **params}
        if after is not None:
            if room in client.rooms:  # replayed from the store: not live meanwhile
                client.rooms.discard(room)
                await self.sio.leave_room(sid, room, namespace=NAMESPACE)
            answer["fromCursor"] = data["fromCursor"]
            await self._replay(sid, scope, key, after)
        elif sid in self._clients:
            await self.sio.enter_room(sid, room, namespace=NAMESPACE)
        if sid not in self._clients:
            return {"ok": False, "error": "not connected"}
        client.rooms.add(room)
        return answer

    async def _replay(self, sid: str, scope: Scope, key: str, after: FeedCursor) -> None:
        """Emit to `sid` what the store has after `after` for the room, then put it in the room."""
        cursor = after
        while True:  # most of it without holding the emitter up
            page = await self._read(scope, key, cursor)
            cursor = await self._emit_page(sid, scope, key, page, cursor)
            if len(page) < self.page_size or sid not in self._clients:
                break
        async with self._lock:
            while sid in self._clients:
                page = [r for r in await self._read(scope, key, cursor) if r.cursor <= self._last]
                cursor = await self._emit_page(sid, scope, key, page, cursor)
                if len(page) < self.page_size:
                    await self.sio.enter_room(sid, f"{scope}:{key}", namespace=NAMESPACE)
                    return

    async def _read(self, scope: Scope, key: str, after: FeedCursor) -> list[RecordedEvent]:
        if scope == "run":
            return await self.store.read_feed(after, self.page_size, run_id=key)
        if scope == "pipeline":
            return await self.store.read_feed(after, self.page_size, pipeline_id=key)
        return await self.store.read_feed(after, self.page_size)

    async def _emit_page(
        self, sid: str, scope: Scope, key: str, page: list[RecordedEvent], cursor: FeedCursor
    ) -> FeedCursor:
        for rec in page:
            kind, _ = ev.aggregate_of(rec.stream_id)
            if kind in ("run", "runlog") and (scope != "org" or (rec.org or "") == key):
                for frame in await self.views.frames(rec):
                    env = fr.envelope(frame)
                    meta = {"position": env.position, "cursor": env.cursor}
                    await self.sio.emit(env.event, (env.data, meta), to=sid, namespace=NAMESPACE)
            cursor = rec.cursor
        return cursor


def _subscribe_params(data: Any) -> tuple[dict[str, str], FeedCursor | None]:
    if not isinstance(data, dict):
        raise BadRequest("subscribe takes an object: {runId} or {pipelineId}")
    unknown = sorted(set(data) - {"runId", "pipelineId", "fromCursor"})
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(map(str, unknown))}")
    params: dict[str, str] = {}
    for name in ("runId", "pipelineId"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not 1 <= len(value) <= 200:
            raise BadRequest(f"{name} must be a string of 1-200 characters")
        params[name] = value
    after = None
    if data.get("fromCursor") is not None:
        after = parse_cursor_token(data["fromCursor"])
        if after is None:
            raise BadRequest("fromCursor must be a cursor received with an event (32 hex digits)")
    if not params and after is None:
        raise BadRequest("subscribe takes runId, pipelineId or fromCursor")
    return params, after


def _token(environ: dict[str, Any], auth: Any) -> str | None:
    """The handshake's `auth.token`, else `?token=`, else a Bearer header, else the `access_token` cookie."""
    if isinstance(auth, dict) and isinstance(auth.get("token"), str) and auth["token"]:
        return str(auth["token"])
    query = parse_qs(str(environ.get("QUERY_STRING", "")))
    if query.get("token"):
        return query["token"][0]
    scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookie = SimpleCookie()
    with contextlib.suppress(Exception):
        cookie.load(str(environ.get("HTTP_COOKIE", "")))
    morsel = cookie.get("access_token")
    return morsel.value if morsel is not None and morsel.value else None
