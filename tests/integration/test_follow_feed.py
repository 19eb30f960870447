"""A follower's read of the feed also says whether committed events wait behind the horizon, so
that the relay and the projector know whether to look again soon or to wait for a wake-up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from domain.pipeline import PipelineCreated
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import FeedCursor, NewEvent
from tests.integration.test_relay import _whole_feed

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="session")
async def store(database_url: str) -> AsyncIterator[PostgresEventStore]:
    await migrate(database_url)
    pool = await open_pool(database_url)
    yield PostgresEventStore(pool)
    await pool.close()


def _created(label: str) -> tuple[str, list[NewEvent]]:
    pid = str(uuid.uuid4())
    event = PipelineCreated(
        pipeline_id=pid,
        name=f"{label}-{pid[:8]}",
        description=None,
        stages=(),
        organization_id="follow-org",
        created_by="t",
        at=datetime.now(UTC),
    )
    return f"pipeline-{pid}", [NewEvent(str(uuid.uuid4()), event, org="follow-org", pipeline_id=pid)]


async def _caught_up(store: PostgresEventStore) -> FeedCursor:
    feed = await _whole_feed(store)
    return feed[-1].cursor


async def test_a_caught_up_follower_is_told_that_nothing_waits(store: PostgresEventStore) -> None:
    await store.append(*_created("seed"), 0)
    cursor = await _caught_up(store)
    assert await store.follow_feed(cursor) == ([], False)


async def test_an_open_transaction_alone_is_not_something_waiting(store: PostgresEventStore) -> None:
    """Its events are not committed: its writer's wake-up will come after its commit."""
    await store.append(*_created("seed"), 0)
    cursor = await _caught_up(store)
    async with store.begin_append(*_created("open"), 0):
        assert await store.follow_feed(cursor) == ([], False)


async def test_committed_events_behind_an_open_transaction_are_reported_waiting_then_read_in_order(
    store: PostgresEventStore,
) -> None:
    await store.append(*_created("seed"), 0)
    cursor = await _caught_up(store)
    a, b = _created("A"), _created("B")
    async with store.begin_append(*a, 0):
        await store.append(*b, 0)
        events, pending = await store.follow_feed(cursor)
        assert (events, pending) == ([], True)
    events, pending = await store.follow_feed(cursor)
    assert [e.stream_id for e in events] == [a[0], b[0]]
    assert not pending


async def test_a_page_of_the_feed_is_its_first_events_in_feed_order(store: PostgresEventStore) -> None:
    await store.append(*_created("seed"), 0)
    cursor = await _caught_up(store)
    streams = [_created(f"page{i}") for i in range(5)]
    for s in streams:
        await store.append(*s, 0)
    events, pending = await store.follow_feed(cursor, 3)
    assert [e.stream_id for e in events] == [s for s, _ in streams[:3]]
    assert not pending
    assert events == (await store.read_feed(cursor, 3))
