"""The relay: publishes the store's feed to JetStream, in order, once.

Where it stands comes from the stream itself: on start (and after any publish error) it reads
the stream's last message and continues after the feed cursor in that message's headers. A
relay killed between publishing and saving its checkpoint therefore neither loses nor repeats
an event, however long it was down (the `Nats-Msg-Id` duplicate window is only a second line of
defence). Each publish also expects the stream's last sequence, so a message that failed inside
a pipelined batch cannot be overtaken by the ones after it: the server refuses them and the
relay resynchronises.

Only one relay publishes at a time: leadership is a session-level advisory lock held on a
connection outside any transaction (a lock held inside a transaction would freeze the feed's
transaction horizon for every follower).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import psycopg
from nats.aio.client import Client as NATS
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from infra import trace
from infra.broker.bus import APPENDED_SUBJECT, ensure_events_stream, event_subject
from infra.broker.cursor import CURSOR, cursor_token
from infra.metrics import feed_reads, observe_lags, relay_lag
from infra.setaside import RELAY, is_poison, set_aside
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, FeedCursor, RecordedEvent

log = logging.getLogger("pipelines.relay")

RELAY_LOCK = 7_311_224_002
POSITION = "Pipelines-Position"
TX = "Pipelines-Tx"
_ACK_TIMEOUT = 5.0  # as nats-py's JetStream publish
_READS = feed_reads.labels(consumer=RELAY, result="events")
_EMPTY_READS = feed_reads.labels(consumer=RELAY, result="empty")


def headers_for(rec: RecordedEvent) -> dict[str, str]:
    aggregate, _, ident = rec.stream_id.partition("-")
    return {
        "Nats-Msg-Id": rec.event_id,
        "ce-specversion": "1.0",
        "ce-id": rec.event_id,
        "ce-type": f"pipelines.{rec.event_type}",
        "ce-source": f"/organizations/{rec.org or '_'}/{aggregate}s/{ident}",
        "ce-time": rec.recorded_at.isoformat(),
        "ce-subject": rec.stream_id,
        "ce-datacontenttype": "application/json",
        POSITION: str(rec.position),
        TX: str(rec.tx_id),
        # The resume token: unlike the position, it only goes up in stream order.
        CURSOR: cursor_token(rec.cursor),
        "Pipelines-Stream-Version": str(rec.stream_version),
    }


def body_for(rec: RecordedEvent, limit: int) -> bytes:
    """The event's JSON; an event too large for a NATS message goes out as a stub that says where
    to read it, so that one oversized event can never stall the stream behind it."""
    if len(rec.data) <= limit:
        return rec.data
    return json.dumps(
        {
            "type": rec.event_type,
            "truncated": True,
            "size": len(rec.data),
            "position": rec.position,
            "streamId": rec.stream_id,
            "streamVersion": rec.stream_version,
        }
    ).encode()


def retry_after(retries: int) -> float:
    """Seconds before the `retries`-th look again at committed events behind the horizon: 2 ms ten
    times (the transaction holding it back is usually another append, committing within
    milliseconds), then twice as long each time, up to 25 ms."""
    return min(0.002 * (1 << min(max(0, retries - 10), 4)), 0.025)


class Relay:
    def __init__(
        self,
        store: PostgresEventStore,
        database_url: str,
        nc: NATS,
        *,
        stream: str,
        stream_replicas: int = 1,
        poll_interval: float = 0.5,
        batch: int = 500,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.nc = nc
        self.stream = stream
        self.stream_replicas = stream_replicas
        self.poll_interval = poll_interval
        self.batch = batch
        self.cursor: FeedCursor = FEED_START
        self.last_seq = 0
        self.published = 0
        self._wake = asyncio.Event()
        # Whether the last read saw committed events it could not read yet (behind the horizon).
        self.pending = False
        self._js: JetStreamContext | None = None
        self._checkpoint_wanted: FeedCursor | None = None
        self._checkpointer: asyncio.Task[None] | None = None

    async def resync(self) -> None:
        """Learn where the relay stands from the stream's last message (see the module's docstring)."""
        js = self.nc.jetstream()
        info = await js.stream_info(self.stream)
        self.last_seq = info.state.last_seq
        self.cursor = FEED_START
        if self.last_seq > 0:
            try:
                msg = await js.get_msg(self.stream, self.last_seq)
            except NotFoundError:
                msg = None
            headers = (msg.headers or {}) if msg is not None else {}
            if POSITION in headers and TX in headers:
                self.cursor = (int(headers[TX]), int(headers[POSITION]))
        log.info("relay at stream seq %d, feed cursor %s", self.last_seq, self.cursor)

    async def run(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as lock_conn:
            while not stop.is_set():
                cur = await lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK,))
                row = await cur.fetchone()
                if row and row[0]:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            if stop.is_set():
                return
            # NATS may be briefly away (restarting): keep trying rather than exit.
            while not stop.is_set():
                try:
                    await ensure_events_stream(self.nc, self.stream, self.stream_replicas)
                    await self.resync()
                    break
                except Exception as exc:
                    log.warning("cannot reach the events stream yet: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
            sub = await self.nc.subscribe(APPENDED_SUBJECT, cb=self._poke)
            stopping = asyncio.create_task(self._wake_when(stop))  # a stop ends the wait at once
            try:
                retries = 0
                while not stop.is_set():
                    # Cleared before reading: a poke for a commit the read may miss wakes the next wait.
                    self._wake.clear()
                    try:
                        n = await self.pump_once()
                    except Exception as exc:
                        log.warning("publish failed, resynchronising: %s", exc)
                        await asyncio.sleep(0.2)
                        with contextlib.suppress(Exception):
                            await self.resync()
                        continue
                    if n >= self.batch:
                        continue  # a full batch: more may be readable at once
                    if self.pending:
                        # Committed events wait behind the horizon: an older transaction is still
                        # open. Its writer's poke (after its commit) wakes us, but not every writer
                        # pokes (the projector's transactions, the relay's checkpoint, leases): look
                        # again every 2 ms anyway, ten times, then backing off to 25 ms.
                        retries += 1
                        timeout = min(retry_after(retries), self.poll_interval)
                    else:
                        # Nothing more has committed: every later commit pokes (or the poll finds it).
                        retries = 0
                        timeout = self.poll_interval
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
            finally:
                stopping.cancel()
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                if self._checkpointer is not None:  # the last checkpoint is written before we go
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._checkpointer, 5)

    async def _poke(self, _msg: Any) -> None:
        trace.mark("poked")
        self._wake.set()

    async def _wake_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def pump_once(self) -> int:
        """Publish the next batch of the feed; returns how many events went out."""
        events, self.pending = await self.store.follow_feed(self.cursor, self.batch)
        if not events:
            _EMPTY_READS.inc()
            trace.mark("read nothing")
            return 0
        _READS.inc()
        trace.records("read", events)
        limit = max(1024, self.nc.max_payload - 4096)  # room for the headers
        messages = await self._messages(events, limit)
        acks = await self._publish_all(messages, self.last_seq)
        ok = 0
        for ack in acks:
            if isinstance(ack, BaseException):
                break
            ok += 1
        # Where the relay now stands: after the last event published, or after every event of the
        # batch when all went out (set-aside events at the end included).
        done = len(events) if ok == len(messages) else messages[ok][0]
        if ok:
            last_ack = acks[ok - 1]
            assert not isinstance(last_ack, BaseException)
            self.last_seq = last_ack.seq
            self.published += ok
            observe_lags(relay_lag, (rec.recorded_at for rec in events[:done]))
            trace.records("published", events[:done])
        if done:
            self.cursor = events[done - 1].cursor
        self._checkpoint_later()
        if ok < len(messages):
            err = next(a for a in acks if isinstance(a, BaseException))
            raise RuntimeError(f"{len(messages) - ok} of {len(messages)} publishes failed: {err}")
        return done

    async def _publish_all(
        self, messages: list[tuple[int, str, bytes, dict[str, str]]], base: int
    ) -> list[PubAck | BaseException]:
        """Send the batch's messages in order without waiting, then await their acks together
        (JetStream's async publish: no task or timer per message); each message's ack, or why it
        has none. The i-th expects the stream's last sequence to be `base + i`."""
        if self._js is None:  # one context: its reply subscription serves every batch
            self._js = self.nc.jetstream()
        futures: list[asyncio.Future[PubAck]] = []
        unsent: BaseException | None = None
        for i, (_, subject, body, headers) in enumerate(messages):
            try:
                futures.append(
                    await self._js.publish_async(
                        subject,
                        body,
                        stream=self.stream,
                        headers={**headers, "Nats-Expected-Last-Sequence": str(base + i)},
                    )
                )
            except Exception as exc:  # not sent; nor is anything after it
                unsent = exc
                break
        if futures:
            await asyncio.wait(futures, timeout=_ACK_TIMEOUT)
        acks: list[PubAck | BaseException] = []
        for future in futures:
            if not future.done():
                future.cancel()
                acks.append(TimeoutError(f"no ack within {_ACK_TIMEOUT:g} s"))
            else:
                acks.append(future.exception() or future.result())
        acks.extend(unsent or RuntimeError("not sent") for _ in range(len(messages) - len(futures)))
        return acks

    async def _messages(self, events: list[RecordedEvent], limit: int) -> list[tuple[int, str, bytes, dict[str, str]]]:
        """Each event's index in the batch, subject, body and headers; an event that cannot be made
        into a message is set aside (recorded and counted) so that the ones after it go out."""
        out = []
        for i, rec in enumerate(events):
            try:
                out.append((i, event_subject(rec), body_for(rec, limit), headers_for(rec)))
            except Exception as exc:
                if not is_poison(exc):
                    raise
                await set_aside(self.store.pool, RELAY, rec, exc)
        return out

    def _checkpoint_later(self) -> None:
        # Nothing reads the relay's checkpoint to resume (it resumes from the headers of the
        # stream's last message, see resync): it only shows how far the relay got. So it is
        # written off the publishing path, at most one write at a time, always the latest cursor.
        self._checkpoint_wanted = self.cursor  # as published now (a resync may move self.cursor)
        if self._checkpointer is None or self._checkpointer.done():
            self._checkpointer = asyncio.create_task(self._write_checkpoints())

    async def _write_checkpoints(self) -> None:
        while self._checkpoint_wanted is not None:
            cursor, self._checkpoint_wanted = self._checkpoint_wanted, None
            try:
                await self._checkpoint(cursor)
            except Exception as exc:
                log.warning("could not save the relay's checkpoint: %s", exc)
                return

    async def _checkpoint(self, cursor: FeedCursor) -> None:
        async with self.store.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO checkpoints (name, tx_id, position) VALUES ('relay', %s::text::xid8, %s) "
                "ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position",
                (str(cursor[0]), cursor[1]),
            )
