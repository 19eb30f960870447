"""The fan-out: each live event to the subscriptions it is for, and catch-up from the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg

from domain import events as ev
from infra import trace
from infra.app.ports import EventStore
from infra.gateway.conn import Conn, Sub, items_of
from infra.gateway.feed import record_from_msg
from infra.gateway.frames import wire as wire_of
from infra.gateway.protocol import STREAM_KIND, Channel, Scope
from infra.gateway.views import Owner, Views
from infra.store.records import FEED_START, FeedCursor, RecordedEvent

log = logging.getLogger("pipelines.gateway")


class Fanout:
    """Every subscription of the process, indexed by what it is keyed by, and how each gets its events.

    A subscription is either live (the dispatcher puts its frames on the connection's queue) or
    catching up (a task reads the store's feed after the subscription's cursor). A catch-up that
    reaches the end of the feed starts buffering the live events meant for it, reads the feed once
    more, then flushes the buffer, dropping what it already sent, and goes live: no gap (anything
    published before buffering began is already below the feed's horizon, so the last read sees
    it) and no duplicate (everything at or before the last cursor sent is dropped).

    Each connection has a bounded queue. When the dispatcher finds it full, the queued event frames
    are dropped and every subscription of that connection falls back to catching up from the last
    frame actually handed to the socket. The dispatcher never waits for a client.

    The live fan-out encodes each event's WebSocket frames once (server frames are not masked, so
    the bytes on the wire are the same for every subscriber) and writes them straight to each
    connection's transport, without a task switch, a lock or an `await` per subscriber. That is
    what websockets' `broadcast()` does, minus its per-connection frame serialisation; the same
    guards apply (the connection is OPEN, no fragmented message is being sent, no extensions).
    A connection takes this path only when nothing of its own is queued or being sent (so frames
    never overtake each other) and while its transport buffer is under `write_buffer_limit`; a
    client whose buffer is over it is too slow: it falls back to catching up, as above. Memory per
    client stays bounded by that limit plus its queue.
    """

    def __init__(self, store: EventStore, views: Views, *, buffer_limit: int, page_size: int) -> None:
        self.store = store
        self.views = views
        self.buffer_limit = buffer_limit
        self.page_size = page_size
        # Counters, for tests and logs.
        self.overflows = 0
        self.dispatched = 0
        self.written_direct = 0  # events written straight to a subscriber's transport
        self._index: dict[tuple[Channel, Scope, str], set[Sub]] = {}
        self._scope_counts: dict[tuple[Channel, Scope], int] = {}
        # The feed cursor of the last live event dispatched, and of the one being dispatched.
        self.live_cursor: FeedCursor = FEED_START
        self._dispatching: FeedCursor | None = None
        # Told of every live event once its raw WebSocket subscribers have it (must not wait).
        self.on_live: Callable[[RecordedEvent], None] | None = None

    def now(self) -> FeedCursor:
        """Where a subscription "from now" starts: after the event in flight, if any."""
        return self.live_cursor if self._dispatching is None else self._dispatching

    def add(self, sub: Sub) -> None:
        sub.conn.subs[sub.ident] = sub
        self._index.setdefault(sub.ident, set()).add(sub)
        self._scope_counts[(sub.channel, sub.scope)] = self._scope_counts.get((sub.channel, sub.scope), 0) + 1

    def remove(self, sub: Sub) -> None:
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

    async def on_msg(self, msg: Msg) -> None:
        try:
            rec = record_from_msg(msg)
            if rec is None:
                log.warning("message on %s has no feed cursor headers; skipped", msg.subject)
                return
            if rec.cursor <= self.live_cursor:
                return  # a redelivery after the ordered consumer was recreated
        except Exception:
            log.exception("bad message on %s; skipped", msg.subject)
            return
        trace.records("received", (rec,))
        self.views.observe(rec, self.watches_runs_of)
        # A subscription "from now" made while this event is in flight starts after it.
        self._dispatching = rec.cursor
        try:
            await self._dispatch(rec)
        except Exception:
            # Whoever should have had this event gets it from the store instead.
            log.exception("dispatching position %d failed: live subscriptions catch up", rec.position)
            for sub in [s for subs in self._index.values() for s in subs]:
                if not sub.catching_up and not sub.closed:
                    self.start_catch_up(sub)
        finally:
            self.live_cursor = rec.cursor
            self._dispatching = None
            trace.records("pushed", (rec,))
        self.dispatched += 1
        if self.on_live is not None:
            try:
                self.on_live(rec)
            except Exception:
                log.exception("live listener failed on position %d", rec.position)

    def watches_runs_of(self, owner: Owner) -> bool:
        """Whether a subscription to the runs of this pipeline or organization exists."""
        return bool(
            (owner.pipeline_id is not None and self._index.get(("runs", "pipeline", owner.pipeline_id)))
            or self._index.get(("runs", "org", owner.org or ""))
        )

    async def _candidates(self, rec: RecordedEvent) -> tuple[RecordedEvent, set[Sub]]:
        kind, ident = ev.aggregate_of(rec.stream_id)
        channel = STREAM_KIND.get(kind)
        if channel is None:
            return rec, set()
        subs: set[Sub] = set()
        if kind != "pipeline":
            subs |= self._index.get((channel, "run", ident), set())
        needs_owner = self._scope_counts.get((channel, "pipeline"), 0) > 0 or self._scope_counts.get(
            (channel, "org"), 0
        )
        owner = await self.views.owner(rec.stream_id) if needs_owner else None
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
                frames = await self.views.frames(rec, live=True)
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
                    wire = wire_of(frames)  # once per event, for every subscriber
                written = conn.write_now(wire)
                if written:
                    sub.enqueued = sub.sent = rec.cursor
                    self.written_direct += 1
                    continue
                if written is False:
                    self._overflow(conn)
                    continue
            items = items_of(sub, rec, frames)
            if conn.room_for(len(items)):
                conn.push(items)
                sub.enqueued = rec.cursor
            else:
                self._overflow(conn)

    def _overflow(self, conn: Conn) -> None:
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
            self.start_catch_up(sub)

    def start_catch_up(self, sub: Sub) -> None:
        sub.catching_up = True
        sub.buffer = None
        sub.task = asyncio.create_task(self._catch_up(sub), name="gateway-catch-up")

    async def _enqueue_waiting(self, sub: Sub, rec: RecordedEvent) -> None:
        """Queue an event's frames for a catching-up subscription, waiting for room."""
        frames = await self.views.frames(rec)
        items = items_of(sub, rec, frames)
        await sub.conn.wait_room(len(items))
        if not sub.closed:
            sub.conn.push(items)
            sub.enqueued = rec.cursor

    async def _catch_up(self, sub: Sub) -> None:
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
