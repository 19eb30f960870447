"""The WebSocket gateway: live run updates and log lines, resumable by feed position.

    ws://<host>:<port>/api/v1/ws          token in `Authorization: Bearer ...` or `?token=`
    GET /healthz                          200 `ok` (plain HTTP), 503 while NATS is down

Clients send `{"action": "subscribe"|"unsubscribe", "channel": "runs"|"logs"|"pipelines",
"params": {"pipelineId"?, "runId"?}, "fromPosition"?: n}` and receive

    {"event": "subscribed",           "data": {"channel", "params"}}
    {"event": "pipeline.run.updated", "data": <PipelineRun as of that event>, "position": n}
    {"event": "pipeline.log",         "data": {"runId", "stage", "message"}, "position": n}
    {"event": "pipeline.updated",     "data": <Pipeline as of that event>, "position": n}
    {"event": "pipeline.deleted",     "data": <Pipeline as it was deleted>, "position": n}
    {"event": "unsubscribed",         "data": {"channel", "params"}}
    {"event": "error",                "data": {"message", ...}}

How it works:

- One JetStream ordered consumer per process reads every event the relay publishes, in feed
  order. It starts right after the stream's last message, whose headers also give the feed cursor
  the live feed starts from, so the gateway always knows exactly where "now" is.
- Frames are built once per event and shared by every subscriber (a bounded cache keyed by
  position); the run view "as of an event" folds the run's stream up to that event's version with
  the log chunks whose feed cursor is at or before the event's, from a per-run cache that only
  reads what it has not seen.
- A subscription is either live (the dispatcher puts its frames on the connection's queue) or
  catching up (a task reads the store's feed after the subscription's cursor). A catch-up that
  reaches the end of the feed starts buffering the live events meant for it, reads the feed once
  more, then flushes the buffer, dropping what it already sent, and goes live: no gap (anything
  published before buffering began is already below the feed's horizon, so the last read sees
  it) and no duplicate (everything at or before the last cursor sent is dropped).
- Each connection has a bounded queue. When the dispatcher finds it full, the queued event frames
  are dropped and every subscription of that connection falls back to catching up from the last
  frame actually handed to the socket. The dispatcher never waits for a client.
- The live fan-out encodes each event's WebSocket frames once (server frames are not masked, so
  the bytes on the wire are the same for every subscriber) and writes them straight to each
  connection's transport, without a task switch, a lock or an `await` per subscriber. That is
  what websockets' `broadcast()` does, minus its per-connection frame serialisation; the same
  guards apply (the connection is OPEN, no fragmented message is being sent, no extensions).
  A connection takes this path only when nothing of its own is queued or being sent (so frames
  never overtake each other) and while its transport buffer is under `write_buffer_limit`; a
  client whose buffer is over it is too slow: it falls back to catching up, as above. Memory per
  client stays bounded by that limit plus its queue.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import http
import logging
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit

import jwt
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from infra.app.commands import Commands
from infra.app.ports import EventStore
from infra.auth import AuthError, Principal, verify_token
from infra.broker.bus import EVENTS_SUBJECTS, ensure_events_stream
from infra.broker.relay import POSITION, TX
from infra.config import Settings
from infra.store.records import FEED_START, FeedCursor, RecordedEvent
from projections.views import pipeline_view, run_view

log = logging.getLogger("pipelines.gateway")

WS_PATH = "/api/v1/ws"
HEALTH_PATH = "/healthz"
STREAM_VERSION = "Pipelines-Stream-Version"

Channel = Literal["runs", "logs", "pipelines"]
Scope = Literal["run", "pipeline", "org"]
CHANNELS: tuple[Channel, ...] = ("runs", "logs", "pipelines")
# The stream kind each channel carries.
_STREAM_KIND: dict[str, Channel] = {"run": "runs", "runlog": "logs", "pipeline": "pipelines"}

_encoder = msgspec.json.Encoder()
_K = TypeVar("_K")
_V = TypeVar("_V")


class _Lru(OrderedDict[_K, _V]):
    """A dict that forgets its least recently used entries beyond `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_fresh(self, key: _K) -> _V | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class _FrameCache:
    """Encoded frames by event position, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._frames: OrderedDict[int, tuple[bytes, ...]] = OrderedDict()

    def get(self, position: int) -> tuple[bytes, ...] | None:
        frames = self._frames.get(position)
        if frames is not None:
            self._frames.move_to_end(position)
        return frames

    def put(self, position: int, frames: tuple[bytes, ...]) -> None:
        size = sum(len(f) for f in frames)
        if size > self._max // 4 or position in self._frames:
            return
        self._frames[position] = frames
        self._bytes += size
        while self._bytes > self._max:
            _, old = self._frames.popitem(last=False)
            self._bytes -= sum(len(f) for f in old)


@dataclass(eq=False)
class _RunHistory:
    """What the gateway has read of one run: its events, states after each, and its log chunks."""

    positions: list[int] = field(default_factory=list)  # of its events, by stream version
    states: list[rn.RunState] = field(default_factory=list)
    # (feed cursor, chunk) in cursor order; every chunk at or before `logs_through` is here.
    logs: list[tuple[FeedCursor, rn.LogAppended]] = field(default_factory=list)
    log_version: int = 0
    logs_through: FeedCursor = FEED_START
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Kept up to date from the live messages (see _Views.observe): holds every event and chunk of
    # the run up to the last live message the gateway handled, so its live frames need no read.
    live: bool = False


@dataclass(eq=False)
class _PipelineHistory:
    positions: list[int] = field(default_factory=list)
    states: list[pl.PipelineState] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class _Owner:
    """Who an aggregate belongs to (never changes)."""

    pipeline_id: str | None
    org: str | None


class _Views:
    """Builds each event's frames once, from incrementally loaded, cached histories."""

    def __init__(self, store: EventStore, *, runs: int = 64, pipelines: int = 256, frame_bytes: int = 64 << 20):
        self.store = store
        self._runs: _Lru[str, _RunHistory] = _Lru(runs)
        self._pipelines: _Lru[str, _PipelineHistory] = _Lru(pipelines)
        self._owners: _Lru[str, _Owner] = _Lru(50_000)
        self._frames = _FrameCache(frame_bytes)

    async def owner(self, stream_id: str) -> _Owner | None:
        """The pipeline and organization of a `run-`, `runlog-` or `pipeline-` stream (None: unknown)."""
        kind, ident = ev.aggregate_of(stream_id)
        key = ("pipeline-" if kind == "pipeline" else "run-") + ident
        cached = self._owners.get_fresh(key)
        if cached is not None:
            return cached
        records = await self.store.read_stream(key, 0)
        if not records:
            return None
        first = records[0]
        owner = _Owner(pipeline_id=first.pipeline_id, org=first.org)
        self._owners.put(key, owner)
        return owner

    async def frames(self, rec: RecordedEvent, *, live: bool = False) -> tuple[bytes, ...]:
        """The frames of `rec`; `live` when it is the live message being dispatched now."""
        cached = self._frames.get(rec.position)
        if cached is not None:
            return cached
        kind, ident = ev.aggregate_of(rec.stream_id)
        frames: tuple[bytes, ...]
        if kind == "run":
            frames = (await self._run_frame(ident, rec, live),)
        elif kind == "runlog":
            frames = self._log_frames(ident, rec)
        elif kind == "pipeline":
            frames = (await self._pipeline_frame(ident, rec),)
        else:
            frames = ()
        self._frames.put(rec.position, frames)
        return frames

    def observe(self, rec: RecordedEvent, watched: Callable[[_Owner], bool]) -> None:
        """Bring a cached run history up to date from a live message itself, so that the run's
        next frame needs no read of the store. Live messages come in feed order, one at a time:
        a history that held everything of its run up to the last one holds everything up to this
        one once this message is added. Whatever breaks that (a history being read meanwhile, a gap
        in versions, an event the relay sent as a stub) makes the history read the store again at
        its next live frame (`_run_frame`). A new run gets a history from its first event only
        when someone `watched` its runs (a subscription to its pipeline or organization): nobody
        else's run costs memory or pushes a watched run's history out of the cache."""
        kind, ident = ev.aggregate_of(rec.stream_id)
        if kind not in ("run", "runlog"):
            return
        hist = self._runs.get_fresh(ident)
        try:
            if hist is None and kind == "run" and rec.stream_version == 1:
                # A new run: its first event says whose it is, and it has no log yet.
                hist = self._start_history(ident, rec, watched)
            if hist is None or not hist.live:
                return
            hist.live = self._apply_live(hist, kind, rec)
        except Exception:  # never in the way of the dispatch: the next frame reads the store
            log.exception("keeping run %s's history from position %d failed", ident, rec.position)
            if hist is not None:
                hist.live = False
            return
        if hist.live and rec.cursor > hist.logs_through:
            hist.logs_through = rec.cursor

    def _start_history(self, run_id: str, rec: RecordedEvent, watched: Callable[[_Owner], bool]) -> _RunHistory | None:
        try:
            e = rec.event
        except Exception:
            return None
        if not isinstance(e, rn.RunTriggered):
            return None
        owner = _Owner(pipeline_id=e.pipeline_id, org=e.organization_id)
        self._owners.put(f"run-{run_id}", owner)
        if not watched(owner):
            return None
        # Its first event is in it already (observe then finds it known: no second decode).
        hist = _RunHistory(positions=[rec.position], states=[rn.evolve(rn.initial_state, e)], live=True)
        self._runs.put(run_id, hist)
        return hist

    @staticmethod
    def _apply_live(hist: _RunHistory, kind: str, rec: RecordedEvent) -> bool:
        if hist.lock.locked():
            return False
        known = hist.log_version if kind == "runlog" else len(hist.positions)
        if 0 < rec.stream_version <= known:  # a catch-up read it from the store already
            return kind == "runlog" or hist.positions[rec.stream_version - 1] == rec.position
        if rec.stream_version != known + 1:
            return False
        try:
            e = rec.event
        except Exception:  # a stub for an oversized event
            return False
        if kind == "runlog":
            if not isinstance(e, rn.LogAppended):
                return False
            # In feed order, as a read from the store sorts them: chunks of parallel steps can
            # commit in another order than their versions (a catch-up may have read a later one).
            bisect.insort(hist.logs, (rec.cursor, e), key=lambda p: p[0])
            hist.log_version = rec.stream_version
            return True
        if not ev.is_run_event(e) or isinstance(e, rn.LogAppended):
            return False
        hist.states.append(rn.evolve(hist.states[-1] if hist.states else rn.initial_state, e))
        hist.positions.append(rec.position)
        return True

    @staticmethod
    def _log_frames(run_id: str, rec: RecordedEvent) -> tuple[bytes, ...]:
        e = rec.event
        if not isinstance(e, rn.LogAppended):
            return ()
        where: dict[str, str | None] = {"runId": run_id, "stage": e.stage_id}
        if e.job is not None:  # inside a stage of jobs
            where["job"], where["step"] = e.job, e.step
        return tuple(
            _encoder.encode(
                {"event": "pipeline.log", "data": {**where, "message": line.text}, "position": rec.position}
            )
            for line in e.lines
        )

    @staticmethod
    def _index(positions: list[int], rec: RecordedEvent) -> int | None:
        if 0 < rec.stream_version <= len(positions) and positions[rec.stream_version - 1] == rec.position:
            return rec.stream_version - 1
        with contextlib.suppress(ValueError):
            return positions.index(rec.position)
        return None

    async def _run_frame(self, run_id: str, rec: RecordedEvent, live: bool = False) -> bytes:
        hist = self._runs.get_fresh(run_id)
        if hist is None:
            hist = _RunHistory()
            self._runs.put(run_id, hist)
        async with hist.lock:
            i = self._index(hist.positions, rec)
            if i is None:
                more = await self.store.read_stream(ev.run_stream(run_id), len(hist.positions))
                state = hist.states[-1] if hist.states else rn.initial_state
                for r in more:
                    e = r.event
                    assert ev.is_run_event(e)
                    assert not isinstance(e, rn.LogAppended)
                    state = rn.evolve(state, e)
                    hist.positions.append(r.position)
                    hist.states.append(state)
                i = self._index(hist.positions, rec)
                if i is None:
                    raise LookupError(f"event {rec.position} is not in {rec.stream_id}")
            if rec.cursor > hist.logs_through:
                # Every chunk at or before this (committed, below-horizon) event has committed.
                for r in await self.store.read_stream(ev.run_log_stream(run_id), hist.log_version):
                    e = r.event
                    if isinstance(e, rn.LogAppended):
                        hist.logs.append((r.cursor, e))
                    hist.log_version = r.stream_version
                hist.logs.sort(key=lambda p: p[0])
                hist.logs_through = rec.cursor
            if live:
                # Everything up to this, the last live message, is here: from now on the live
                # messages themselves keep the history up to date.
                hist.live = True
            state = hist.states[i]
            logs = [chunk for cursor, chunk in hist.logs if cursor <= rec.cursor]
        view = run_view(state, logs)
        return _encoder.encode({"event": "pipeline.run.updated", "data": view, "position": rec.position})

    async def _pipeline_frame(self, pipeline_id: str, rec: RecordedEvent) -> bytes:
        hist = self._pipelines.get_fresh(pipeline_id)
        if hist is None:
            hist = _PipelineHistory()
            self._pipelines.put(pipeline_id, hist)
        async with hist.lock:
            i = self._index(hist.positions, rec)
            if i is None:
                more = await self.store.read_stream(ev.pipeline_stream(pipeline_id), len(hist.positions))
                state = hist.states[-1] if hist.states else pl.initial_state
                for r in more:
                    e = r.event
                    assert ev.is_pipeline_event(e)
                    state = pl.evolve(state, e)
                    hist.positions.append(r.position)
                    hist.states.append(state)
                i = self._index(hist.positions, rec)
                if i is None:
                    raise LookupError(f"event {rec.position} is not in {rec.stream_id}")
            state = hist.states[i]
        name = "pipeline.deleted" if state.deleted else "pipeline.updated"
        return _encoder.encode({"event": name, "data": pipeline_view(state), "position": rec.position})


# ---- connections and subscriptions --------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Item:
    frame: bytes
    sub: _Sub | None = None  # None for control frames (subscribed, error, ...)
    cursor: FeedCursor = FEED_START
    index: int = 0  # the frame's index among its event's frames
    last: bool = True


@dataclass(eq=False)
class _Sub:
    conn: _Conn
    channel: Channel
    scope: Scope
    key: str  # run id, pipeline id, or the organization ("" for none)
    params: dict[str, str]
    # Every frame of every event at or before `enqueued` is queued or sent.
    enqueued: FeedCursor
    # Every frame of every event at or before `sent` has been handed to the socket; of the event
    # at `partial[0]`, the first `partial[1]` frames have too.
    sent: FeedCursor
    partial: tuple[FeedCursor, int] | None = None
    catching_up: bool = False
    # Live events held while a catch-up makes its last read (None: not holding).
    buffer: list[RecordedEvent] | None = None
    task: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def ident(self) -> tuple[Channel, Scope, str]:
        return (self.channel, self.scope, self.key)

    def feed_filter(self) -> dict[str, str]:
        if self.scope == "run":
            return {"run_id": self.key}
        if self.scope == "pipeline":
            return {"pipeline_id": self.key}
        return {}

    def matches(self, rec: RecordedEvent) -> bool:
        """For a record read from the store (it carries its org, pipeline and run)."""
        kind, _ = ev.aggregate_of(rec.stream_id)
        if _STREAM_KIND.get(kind) != self.channel:
            return False
        if self.scope == "run":
            return rec.run_id == self.key
        if self.scope == "pipeline":
            return rec.pipeline_id == self.key
        return (rec.org or "") == self.key


class _Conn:
    """One client: its subscriptions and its bounded outgoing queue, drained by `writer()`."""

    def __init__(self, ws: ServerConnection, principal: Principal, limit: int, buffer_limit: int = 256 << 10) -> None:
        self.ws = ws
        self.principal = principal
        self.limit = limit
        self.buffer_limit = buffer_limit
        self.subs: dict[tuple[Channel, Scope, str], _Sub] = {}
        self.items: deque[_Item] = deque()
        self.overflows = 0
        # The writer is inside `ws.send` (a frame of the queue is on its way to the transport).
        self.sending = False
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def room_for(self, n: int) -> bool:
        # An event with more frames than the whole queue still goes in, alone.
        return not self.items or len(self.items) + n <= self.limit

    async def wait_room(self, n: int) -> None:
        while not self.room_for(n):
            self._room.clear()
            await self._room.wait()

    def push(self, items: Iterable[_Item]) -> None:
        self.items.extend(items)
        self._nonempty.set()

    def write_now(self, wire: bytes) -> bool | None:
        """Write an event's encoded frames straight to the transport. None: not now (something is
        queued or being sent, or the connection is not plainly open): use the queue. False: the
        client's transport buffer is over the limit (too slow). True: written."""
        ws = self.ws
        if (
            self.items
            or self.sending
            or ws.protocol.state is not State.OPEN
            or getattr(ws, "send_in_progress", None) is not None
            or ws.protocol.extensions
        ):
            return None
        transport = ws.transport
        if transport.is_closing():
            return None
        if transport.get_write_buffer_size() > self.buffer_limit:
            return False
        if wire:
            transport.write(wire)
        return True

    async def control(self, event: str, data: dict[str, Any]) -> None:
        await self.wait_room(1)
        self.push([_Item(_encoder.encode({"event": event, "data": data}))])

    def drop_events(self, sub: _Sub | None = None) -> None:
        """Drop the queued event frames (of one subscription, or all); keep control frames."""
        self.items = deque(i for i in self.items if i.sub is None or (sub is not None and i.sub is not sub))
        self._room.set()

    async def writer(self) -> None:
        while True:
            while not self.items:
                self._nonempty.clear()
                await self._nonempty.wait()
            item = self.items.popleft()
            self._room.set()
            sub = item.sub
            if sub is not None:
                if sub.closed:
                    continue
                # Counted as sent once handed over: a catch-up that starts while this frame is
                # being written must not send it again.
                if item.last:
                    sub.sent, sub.partial = item.cursor, None
                else:
                    sub.partial = (item.cursor, item.index + 1)
            self.sending = True
            try:
                await self.ws.send(item.frame, text=True)
            finally:
                self.sending = False


def _wire(frames: tuple[bytes, ...]) -> bytes:
    """The frames as unmasked, unfragmented WebSocket text frames, back to back (RFC 6455 5.2)."""
    out = bytearray()
    for payload in frames:
        n = len(payload)
        if n < 126:
            out += bytes((0x81, n))
        elif n < 1 << 16:
            out += bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            out += bytes((0x81, 127)) + n.to_bytes(8, "big")
        out += payload
    return bytes(out)


def _items(sub: _Sub, rec: RecordedEvent, frames: tuple[bytes, ...]) -> list[_Item]:
    skip = sub.partial[1] if sub.partial is not None and sub.partial[0] == rec.cursor else 0
    n = len(frames)
    return [_Item(frames[i], sub, rec.cursor, i, i == n - 1) for i in range(skip, n)]


class _BadRequest(Exception):
    pass


def _str_param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise _BadRequest(f"params.{name} must be a string of 1-200 characters")
    return value


def _headers_get(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    return str(value) if value is not None else None


def record_from_msg(msg: Msg) -> RecordedEvent | None:
    """The stored event a relay message carries (org, pipeline and run are left to the caller)."""
    headers = msg.headers or {}
    pos, tx = _headers_get(headers, POSITION), _headers_get(headers, TX)
    if pos is None or tx is None:
        return None
    parts = msg.subject.split(".")
    stream_id = _headers_get(headers, "ce-subject")
    if stream_id is None:
        if len(parts) < 6:
            return None
        stream_id = f"{parts[3]}-{parts[4]}"
    event_type = parts[-1] if len(parts) >= 6 else ""
    raw_time = _headers_get(headers, "ce-time")
    try:
        recorded_at = datetime.fromisoformat(raw_time) if raw_time else datetime.now(UTC)
    except ValueError:
        recorded_at = datetime.now(UTC)
    return RecordedEvent(
        position=int(pos),
        tx_id=int(tx),
        stream_id=stream_id,
        stream_version=int(_headers_get(headers, STREAM_VERSION) or 0),
        event_id=_headers_get(headers, "Nats-Msg-Id") or "",
        event_type=event_type,
        data=msg.data,
        org=None,
        pipeline_id=None,
        run_id=None,
        recorded_at=recorded_at,
    )


class Gateway:
    """Serves `/api/v1/ws` on settings.gateway_host:gateway_port (port 0: any free port).

    `ready` is set once it listens (and `port` is the bound port); `serve(stop)` returns after
    `stop` is set and every connection has been closed (code 1001).
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
        self.buffer_limit = buffer_limit if buffer_limit is not None else max(queue_limit, 100)
        self.page_size = page_size
        self.max_subscriptions = max_subscriptions
        self.write_buffer_limit = write_buffer_limit
        self.ready = asyncio.Event()
        self.port = settings.gateway_port
        # Counters, for tests and logs.
        self.overflows = 0
        self.dispatched = 0
        self.written_direct = 0  # events written straight to a subscriber's transport
        self._views = _Views(store)
        self._index: dict[tuple[Channel, Scope, str], set[_Sub]] = {}
        self._scope_counts: dict[tuple[Channel, Scope], int] = {}
        self._principals: weakref.WeakKeyDictionary[ServerConnection, tuple[Principal, float | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._conns: set[_Conn] = set()
        # The feed cursor of the last live event dispatched, and of the one being dispatched.
        self._live_cursor: FeedCursor = FEED_START
        self._dispatching: FeedCursor | None = None
        self._feed_ready = False
        self._server: Server | None = None

    @property
    def live_cursor(self) -> FeedCursor:
        """The feed cursor of the last event the live feed has dispatched ("now" for a new subscription)."""
        return self._live_cursor

    # ---- lifecycle --------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        feed = await self._start_feed()
        try:
            async with serve(
                self._handler,
                self.settings.gateway_host,
                self.settings.gateway_port,
                process_request=self._process_request,
                compression=None,  # frames are encoded once for every subscriber; keep it that way
                max_size=64 * 1024,
            ) as server:
                self._server = server
                for sock in server.sockets:
                    self.port = sock.getsockname()[1]
                    break
                log.info("gateway listening on %s:%d%s", self.settings.gateway_host, self.port, WS_PATH)
                self.ready.set()
                await stop.wait()
                log.info("gateway stopping: closing %d connections", len(self._conns))
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
        await ensure_events_stream(self.nc, stream)
        js = self.nc.jetstream()
        info = await js.stream_info(stream)
        last_seq = info.state.last_seq
        if last_seq > 0:
            try:
                msg = await js.get_msg(stream, last_seq)
                pos, tx = _headers_get(msg.headers, POSITION), _headers_get(msg.headers, TX)
                if pos is not None and tx is not None:
                    self._live_cursor = (int(tx), int(pos))
            except NotFoundError:
                pass
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_seq + 1)
        sub = await js.subscribe(EVENTS_SUBJECTS, stream=stream, cb=self._on_msg, ordered_consumer=True, config=config)
        self._feed_ready = True
        log.info("live feed from stream %s seq %d (feed cursor %s)", stream, last_seq + 1, self._live_cursor)
        return sub

    # ---- HTTP: health, path, auth -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == HEALTH_PATH:
            if self._feed_ready and self.nc.is_connected:
                return connection.respond(http.HTTPStatus.OK, "ok")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "nats unavailable")
        if url.path != WS_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found")
        token = _bearer(request.headers)
        if token is None:
            token = next(iter(parse_qs(url.query).get("token", [])), None)
        if not token:
            return _unauthorized(connection, "missing bearer token")
        try:
            principal = verify_token(self.settings, token)
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        except (AuthError, jwt.PyJWTError):
            return _unauthorized(connection, "invalid token")
        self._principals[connection] = (principal, float(exp) if isinstance(exp, int | float) else None)
        return None

    # ---- connections ------------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        auth = self._principals.pop(ws, None)
        if auth is None:  # cannot happen: the handshake checked the token
            await ws.close(1008, "unauthorized")
            return
        principal, exp = auth
        conn = _Conn(ws, principal, self.queue_limit, self.write_buffer_limit)
        self._conns.add(conn)
        tasks = [
            asyncio.create_task(conn.writer(), name="gateway-writer"),
            asyncio.create_task(self._read(conn), name="gateway-reader"),
        ]
        if exp is not None:
            tasks.append(asyncio.create_task(_expire(ws, exp), name="gateway-token-expiry"))
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
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

    async def _read(self, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in conn.ws:
                await self._on_client_frame(conn, message)

    def _close_conn(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for sub in list(conn.subs.values()):
            self._remove(sub)

    async def _on_client_frame(self, conn: _Conn, message: str | bytes) -> None:
        echo: dict[str, Any] = {}
        try:
            try:
                frame = msgspec.json.decode(message)
            except msgspec.DecodeError:
                raise _BadRequest("frame must be a JSON object") from None
            if not isinstance(frame, dict):
                raise _BadRequest("frame must be a JSON object")
            action = frame.get("action")
            channel = frame.get("channel")
            raw_params = frame.get("params")
            if isinstance(channel, str):
                echo["channel"] = channel
            if isinstance(raw_params, dict):
                echo["params"] = raw_params
            if action not in ("subscribe", "unsubscribe"):
                raise _BadRequest("action must be 'subscribe' or 'unsubscribe'")
            if channel not in CHANNELS:
                raise _BadRequest("channel must be 'runs', 'logs' or 'pipelines'")
            if raw_params is None:
                raw_params = {}
            if not isinstance(raw_params, dict):
                raise _BadRequest("params must be an object")
            unknown = sorted(set(raw_params) - {"pipelineId", "runId"})
            if unknown:
                raise _BadRequest(f"unknown params: {', '.join(unknown)}")
            run_id = _str_param(raw_params, "runId")
            pipeline_id = _str_param(raw_params, "pipelineId")
            if channel == "pipelines" and run_id is not None:
                raise _BadRequest("the pipelines channel takes no runId")
            from_position = frame.get("fromPosition")
            if from_position is not None and (
                isinstance(from_position, bool) or not isinstance(from_position, int) or from_position < 0
            ):
                raise _BadRequest("fromPosition must be a non-negative integer")
            params = {k: v for k, v in (("pipelineId", pipeline_id), ("runId", run_id)) if v is not None}
            if action == "subscribe":
                await self._subscribe(conn, channel, params, from_position)
            else:
                await self._unsubscribe(conn, channel, params)
        except _BadRequest as exc:
            await conn.control("error", {"message": str(exc), **echo})
        except Exception:
            log.exception("client frame failed")
            await conn.control("error", {"message": "internal error", **echo})

    async def _resolve(self, principal: Principal, params: dict[str, str]) -> tuple[Scope, str]:
        """What a subscription is keyed by, once the principal may see it."""
        run_id, pipeline_id = params.get("runId"), params.get("pipelineId")
        if run_id is not None:
            run, _ = await self.commands.load_run(run_id)
            ok = run.exists and run.organization_id == principal.org
            ok = ok and (pipeline_id is None or run.pipeline_id == pipeline_id)
            if ok:
                pipeline, _ = await self.commands.load_pipeline(run.pipeline_id)
                ok = pipeline.live
            if not ok:
                raise _BadRequest("run not found")
            return "run", run_id
        if pipeline_id is not None:
            pipeline, _ = await self.commands.load_pipeline(pipeline_id)
            if not pipeline.live or pipeline.organization_id != principal.org:
                raise _BadRequest("pipeline not found")
            return "pipeline", pipeline_id
        return "org", principal.org or ""

    async def _subscribe(
        self, conn: _Conn, channel: Channel, params: dict[str, str], from_position: int | None
    ) -> None:
        scope, key = await self._resolve(conn.principal, params)
        if (channel, scope, key) in conn.subs:
            raise _BadRequest(f"already subscribed to {channel} {params or '(all)'}")
        if len(conn.subs) >= self.max_subscriptions:
            raise _BadRequest(f"at most {self.max_subscriptions} subscriptions per connection")
        start: FeedCursor | None
        if from_position is None:
            start = None
        elif from_position == 0:
            start = FEED_START
        else:
            start = await self.store.cursor_of(from_position)
            if start is None:
                raise _BadRequest(f"unknown position {from_position}")
        if conn not in self._conns or (channel, scope, key) in conn.subs:  # closed or raced meanwhile
            return
        if start is None:
            start = self._live_cursor if self._dispatching is None else self._dispatching
        cursor = start
        sub = _Sub(conn, channel, scope, key, params, enqueued=cursor, sent=cursor)
        conn.subs[sub.ident] = sub
        self._index.setdefault(sub.ident, set()).add(sub)
        self._scope_counts[(channel, scope)] = self._scope_counts.get((channel, scope), 0) + 1
        data: dict[str, Any] = {"channel": channel, "params": params}
        if from_position is not None:
            data["fromPosition"] = from_position
            self._start_catch_up(sub)
        conn.push([_Item(_encoder.encode({"event": "subscribed", "data": data}))])

    async def _unsubscribe(self, conn: _Conn, channel: Channel, params: dict[str, str]) -> None:
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
            raise _BadRequest("not subscribed")
        self._remove(sub)
        conn.drop_events(sub)
        await conn.control("unsubscribed", {"channel": channel, "params": params})

    def _remove(self, sub: _Sub) -> None:
        sub.closed = True
        sub.conn.subs.pop(sub.ident, None)
        subs = self._index.get(sub.ident)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._index[sub.ident]
            self._scope_counts[(sub.channel, sub.scope)] -= 1
        if sub.task is not None:
            sub.task.cancel()
            sub.task = None

    # ---- the live feed ----------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        try:
            rec = record_from_msg(msg)
            if rec is None:
                log.warning("message on %s has no feed cursor headers; skipped", msg.subject)
                return
            if rec.cursor <= self._live_cursor:
                return  # a redelivery after the ordered consumer was recreated
        except Exception:
            log.exception("bad message on %s; skipped", msg.subject)
            return
        self._views.observe(rec, self._watches_runs_of)
        # A subscription "from now" made while this event is in flight starts after it.
        self._dispatching = rec.cursor
        try:
            await self._dispatch(rec)
        except Exception:
            # Whoever should have had this event gets it from the store instead.
            log.exception("dispatching position %d failed: live subscriptions catch up", rec.position)
            for sub in [s for subs in self._index.values() for s in subs]:
                if not sub.catching_up and not sub.closed:
                    self._start_catch_up(sub)
        finally:
            self._live_cursor = rec.cursor
            self._dispatching = None
        self.dispatched += 1

    def _watches_runs_of(self, owner: _Owner) -> bool:
        """Whether a subscription to the runs of this pipeline or organization exists."""
        return bool(
            (owner.pipeline_id is not None and self._index.get(("runs", "pipeline", owner.pipeline_id)))
            or self._index.get(("runs", "org", owner.org or ""))
        )

    async def _candidates(self, rec: RecordedEvent) -> tuple[RecordedEvent, set[_Sub]]:
        kind, ident = ev.aggregate_of(rec.stream_id)
        channel = _STREAM_KIND.get(kind)
        if channel is None:
            return rec, set()
        subs: set[_Sub] = set()
        if kind != "pipeline":
            subs |= self._index.get((channel, "run", ident), set())
        needs_owner = self._scope_counts.get((channel, "pipeline"), 0) > 0 or self._scope_counts.get(
            (channel, "org"), 0
        )
        owner = await self._views.owner(rec.stream_id) if needs_owner else None
        if owner is not None:
            rec = RecordedEvent(
                position=rec.position,
                tx_id=rec.tx_id,
                stream_id=rec.stream_id,
                stream_version=rec.stream_version,
                event_id=rec.event_id,
                event_type=rec.event_type,
                data=rec.data,
                org=owner.org,
                pipeline_id=owner.pipeline_id,
                run_id=None if kind == "pipeline" else ident,
                recorded_at=rec.recorded_at,
            )
            if owner.pipeline_id is not None:
                subs |= self._index.get((channel, "pipeline", owner.pipeline_id), set())
            subs |= self._index.get((channel, "org", owner.org or ""), set())
        return rec, subs

    async def _dispatch(self, rec: RecordedEvent) -> None:
        rec, subs = await self._candidates(rec)
        frames: tuple[bytes, ...] | None = None
        wire: bytes | None = None
        for sub in subs:
            if sub.closed or rec.cursor <= sub.enqueued:
                continue
            if frames is None and not sub.catching_up:
                # Built once, for every subscriber. Meanwhile a subscription may have closed or
                # fallen back to catching up: look at it again. (One made meanwhile starts after
                # this event; see `_dispatching`.)
                frames = await self._views.frames(rec, live=True)
                if sub.closed or rec.cursor <= sub.enqueued:
                    continue
            if sub.catching_up:
                if sub.buffer is not None:
                    sub.buffer.append(rec)
                    if len(sub.buffer) > self.buffer_limit:
                        sub.buffer = None  # still too slow: keep catching up from the store
                continue
            assert frames is not None
            conn = sub.conn
            if sub.partial is None:
                if wire is None:
                    wire = _wire(frames)  # once per event, for every subscriber
                written = conn.write_now(wire)
                if written:
                    sub.enqueued = sub.sent = rec.cursor
                    self.written_direct += 1
                    continue
                if written is False:
                    self._overflow(conn)
                    continue
            items = _items(sub, rec, frames)
            if conn.room_for(len(items)):
                conn.push(items)
                sub.enqueued = rec.cursor
            else:
                self._overflow(conn)

    def _overflow(self, conn: _Conn) -> None:
        """The client is too slow: drop its queued events; every subscription catches up."""
        conn.overflows += 1
        self.overflows += 1
        log.log(
            logging.INFO if conn.overflows == 1 else logging.DEBUG,
            "client queue full (%d frames, %d times): its subscriptions catch up from the store",
            len(conn.items),
            conn.overflows,
        )
        conn.drop_events()
        for sub in conn.subs.values():
            if sub.task is not None:
                sub.task.cancel()
                sub.task = None
            sub.enqueued = sub.sent
            self._start_catch_up(sub)

    # ---- catch-up from the store ------------------------------------------------------------

    def _start_catch_up(self, sub: _Sub) -> None:
        sub.catching_up = True
        sub.buffer = None
        sub.task = asyncio.create_task(self._catch_up(sub), name="gateway-catch-up")

    async def _enqueue_waiting(self, sub: _Sub, rec: RecordedEvent) -> None:
        """Queue an event's frames for a catching-up subscription, waiting for room."""
        frames = await self._views.frames(rec)
        items = _items(sub, rec, frames)
        await sub.conn.wait_room(len(items))
        if not sub.closed:
            sub.conn.push(items)
            sub.enqueued = rec.cursor

    async def _catch_up(self, sub: _Sub) -> None:
        cursor = sub.enqueued
        while not sub.closed:
            try:
                page = await self.store.read_feed(cursor, self.page_size, **sub.feed_filter())
                for rec in page:
                    if sub.matches(rec) and rec.cursor > sub.enqueued:
                        await self._enqueue_waiting(sub, rec)
                    cursor = rec.cursor
                if len(page) >= self.page_size:
                    continue
                if sub.buffer is None:
                    # Near the end: hold live events from now on, and read once more.
                    sub.buffer = []
                    continue
                while sub.buffer:
                    rec = sub.buffer.pop(0)
                    if rec.cursor > sub.enqueued:
                        await self._enqueue_waiting(sub, rec)
                if sub.buffer is None:  # dropped while flushing: back to the store
                    cursor = sub.enqueued
                    continue
                # Nothing awaited since the buffer was found empty: live from here, no gap.
                sub.catching_up = False
                sub.buffer = None
                sub.task = None
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("catch-up failed; retrying")
                sub.buffer = None
                cursor = sub.enqueued
                await asyncio.sleep(1.0)


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


__all__ = ["HEALTH_PATH", "WS_PATH", "Gateway", "record_from_msg"]
