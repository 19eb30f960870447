"""The relay publishes the feed to JetStream in order, exactly once, across crashes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from domain.pipeline import PipelineCreated
from infra.broker import bus
from infra.broker.relay import Relay
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, FeedCursor, NewEvent, RecordedEvent

pytestmark = pytest.mark.integration


class Crash(Exception):
    pass


@pytest_asyncio.fixture(loop_scope="session")
async def store(database_url: str) -> AsyncIterator[PostgresEventStore]:
    await migrate(database_url)
    pool = await open_pool(database_url)
    yield PostgresEventStore(pool)
    await pool.close()


async def _append_many(store: PostgresEventStore, writers: int, each: int) -> None:
    async def writer(w: int) -> None:
        for i in range(each):
            pid = str(uuid.uuid4())
            event = PipelineCreated(
                pipeline_id=pid,
                name=f"relay-{w}-{i}-{pid[:6]}",
                description=None,
                stages=(),
                organization_id="relay-org",
                created_by="t",
                at=datetime.now(UTC),
            )
            await store.append(
                f"pipeline-{pid}", [NewEvent(str(uuid.uuid4()), event, org="relay-org", pipeline_id=pid)], 0
            )

    await asyncio.gather(*(writer(w) for w in range(writers)))


async def _whole_feed(store: PostgresEventStore) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    cursor = FEED_START
    while batch := await store.read_feed(cursor, 1000):
        out.extend(batch)
        cursor = batch[-1].cursor
    return out


class _DyingStore(PostgresEventStore):
    """The store, whose feed reads fail from the `dies_at`-th on: the relay dies there."""

    def __init__(self, store: PostgresEventStore, dies_at: int) -> None:
        super().__init__(store.pool)
        self.reads = 0
        self._dies_at = dies_at

    async def follow_feed(self, after: FeedCursor, limit: int = 500) -> tuple[list[RecordedEvent], bool]:
        self.reads += 1
        if self.reads >= self._dies_at:
            raise Crash()
        return await super().follow_feed(after, limit)


async def test_a_relay_that_dies_mid_feed_loses_and_repeats_nothing(
    store: PostgresEventStore, database_url: str, nats_url: str
) -> None:
    stream = f"RELAY_{uuid.uuid4().hex[:10]}"
    nc = await bus.connect(nats_url, "relay-test")
    try:
        await bus.ensure_events_stream(nc, stream)
        await _append_many(store, writers=6, each=20)

        # It dies reading its fourth batch: three went out, whatever its checkpoint says.
        first = Relay(_DyingStore(store, dies_at=4), database_url, nc, stream=stream, batch=7)
        await first.resync()
        with pytest.raises(Crash):
            while await first.pump_once():
                pass
        assert first.published == 21

        # more events arrive while no relay runs, then a new relay starts from the stream's tail
        await _append_many(store, writers=3, each=10)
        second = Relay(store, database_url, nc, stream=stream, batch=50)
        await second.resync()
        while await second.pump_once():
            pass

        feed = await _whole_feed(store)
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.state.messages == len(feed)
        for seq, rec in enumerate(feed, start=1):
            msg = await js.get_msg(stream, seq)
            headers = msg.headers or {}
            assert headers["Nats-Msg-Id"] == rec.event_id
            assert headers["ce-id"] == rec.event_id and headers["ce-specversion"] == "1.0"
            assert headers["ce-type"] == f"pipelines.{rec.event_type}" and headers["ce-subject"] == rec.stream_id
            assert headers["Pipelines-Position"] == str(rec.position)
            assert msg.subject == bus.event_subject(rec)
            if rec.org == "relay-org":
                assert msg.subject == f"pipelines.v1.relay-org.pipeline.{rec.stream_id[9:]}.pipeline_created"
            assert msg.data == rec.data
    finally:
        await nc.jetstream().delete_stream(stream)
        await nc.drain()


async def test_a_running_relay_publishes_concurrent_appends_in_feed_order(
    store: PostgresEventStore, database_url: str, nats_url: str
) -> None:
    stream = f"RELAY_{uuid.uuid4().hex[:10]}"
    nc = await bus.connect(nats_url, "relay-test")
    stop = asyncio.Event()
    try:
        await bus.ensure_events_stream(nc, stream)
        relay = Relay(store, database_url, nc, stream=stream, poll_interval=0.02, batch=25)
        task = asyncio.create_task(relay.run(stop))
        await _append_many(store, writers=8, each=15)
        feed = await _whole_feed(store)
        js = nc.jetstream()
        for _ in range(200):
            if (await js.stream_info(stream)).state.messages >= len(feed):
                break
            await asyncio.sleep(0.05)
        ids = [(await js.get_msg(stream, seq)).headers["Nats-Msg-Id"] for seq in range(1, len(feed) + 1)]  # type: ignore[index]
        assert ids == [r.event_id for r in feed]
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await nc.jetstream().delete_stream(stream)
        await nc.drain()


class _CountingStore(PostgresEventStore):
    """The store, counting the follower's feed reads."""

    def __init__(self, store: PostgresEventStore) -> None:
        super().__init__(store.pool)
        self.reads = 0

    async def follow_feed(self, after: FeedCursor, limit: int = 500) -> tuple[list[RecordedEvent], bool]:
        self.reads += 1
        return await super().follow_feed(after, limit)


async def _published(js: Any, stream: str, count: int, within: float = 10.0) -> bool:
    for _ in range(int(within / 0.01)):
        if (await js.stream_info(stream)).state.messages >= count:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_a_relay_publishes_events_held_behind_a_transaction_whose_writer_never_pokes(
    store: PostgresEventStore, database_url: str, nats_url: str
) -> None:
    """Poked for an event it cannot read yet (an older transaction holds the horizon), the relay
    keeps looking until that transaction ends, however long it stays open: the writer holding it
    need not poke (the projector's and the relay's own transactions never do), and the poll is far."""
    stream = f"RELAY_{uuid.uuid4().hex[:10]}"
    nc = await bus.connect(nats_url, "relay-test")
    stop = asyncio.Event()
    try:
        await bus.ensure_events_stream(nc, stream)
        relay = Relay(store, database_url, nc, stream=stream, poll_interval=60)
        task = asyncio.create_task(relay.run(stop))
        await _append_many(store, writers=1, each=1)
        await nc.publish(bus.APPENDED_SUBJECT, b"")
        js = nc.jetstream()
        assert await _published(js, stream, len(await _whole_feed(store)))

        published = (await js.stream_info(stream)).state.messages
        async with await psycopg.AsyncConnection.connect(database_url) as holder:
            await holder.execute("SELECT pg_current_xact_id()")  # an xid, held open: the horizon stops here
            await _append_many(store, writers=1, each=1)
            await nc.publish(bus.APPENDED_SUBJECT, b"")
            await asyncio.sleep(0.3)
            assert (await js.stream_info(stream)).state.messages == published
            await holder.commit()  # no poke follows
        assert await _published(js, stream, published + 1, within=2.0)
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await nc.jetstream().delete_stream(stream)
        await nc.drain()


async def test_a_caught_up_relay_reads_the_feed_once_per_wake_up(
    store: PostgresEventStore, database_url: str, nats_url: str
) -> None:
    """A short batch with nothing committed behind it is the feed's end: the relay waits for the
    next wake-up instead of reading again to find the feed empty."""
    stream = f"RELAY_{uuid.uuid4().hex[:10]}"
    nc = await bus.connect(nats_url, "relay-test")
    stop = asyncio.Event()
    try:
        await bus.ensure_events_stream(nc, stream)
        counting = _CountingStore(store)
        relay = Relay(counting, database_url, nc, stream=stream, poll_interval=60)
        task = asyncio.create_task(relay.run(stop))
        js = nc.jetstream()
        await _append_many(store, writers=1, each=1)
        await nc.publish(bus.APPENDED_SUBJECT, b"")
        assert await _published(js, stream, len(await _whole_feed(store)))
        await asyncio.sleep(0.2)
        before = counting.reads
        await _append_many(store, writers=1, each=1)
        await nc.publish(bus.APPENDED_SUBJECT, b"")
        assert await _published(js, stream, len(await _whole_feed(store)))
        await asyncio.sleep(0.2)
        assert counting.reads - before == 1
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await nc.jetstream().delete_stream(stream)
        await nc.drain()
