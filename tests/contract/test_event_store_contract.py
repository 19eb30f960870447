"""One contract for every EventStore: the in-memory adapter and PostgreSQL pass the same tests.

The `store` fixture (conftest.py) is parametrized over both adapters and hands each test an
empty store.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from domain import events as ev
from domain.run import RunPaused, RunStarted
from infra.store.memory import InMemoryEventStore
from infra.store.records import (
    FEED_START,
    Alongside,
    FeedCursor,
    LeaseHolder,
    NewEvent,
    RecordedEvent,
    UniqueKey,
    UniqueKeyTaken,
    UnitLease,
    WrongExpectedVersion,
)

T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)
FOLLOW_DEADLINE_S = 20.0
FOLLOW_GRACE_S = 2.0


def new(
    label: str = "x",
    *,
    run_id: str | None = None,
    pipeline_id: str | None = None,
    org: str | None = None,
) -> NewEvent:
    """A new event with a fresh id; `label` travels in the payload so tests can tell events apart."""
    return NewEvent(
        event_id=str(uuid.uuid4()),
        event=RunPaused(paused_by=label, at=T0),
        org=org,
        pipeline_id=pipeline_id,
        run_id=run_id,
    )


def ids(records: Sequence[RecordedEvent]) -> list[str]:
    return [r.event_id for r in records]


def labels(records: Sequence[RecordedEvent]) -> list[str]:
    out = []
    for r in records:
        e = r.event
        assert isinstance(e, RunPaused)
        out.append(e.paused_by)
    return out


async def read_all(store: Any, after: FeedCursor = FEED_START, **filters: Any) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    while True:
        page = await store.read_feed(after, 100, **filters)
        if not page:
            return out
        out += page
        after = page[-1].cursor


async def nothing_written(store: Any, stream_id: str, version: int, feed_ids: list[str]) -> None:
    records = await store.read_stream(stream_id)
    assert [r.stream_version for r in records] == list(range(1, version + 1))
    assert ids(await read_all(store)) == feed_ids


# ---- append and read a stream --------------------------------------------------------------


async def test_appended_events_read_back_in_order_with_their_versions(store: Any) -> None:
    first = [new("a", run_id="r1", pipeline_id="p1", org="o1") for _ in range(3)]
    result = await store.append("run-r1", first, 0)
    assert result.version == 3
    assert len(result.positions) == 3 and list(result.positions) == sorted(set(result.positions))

    more = [new("b", run_id="r1", pipeline_id="p1", org="o1") for _ in range(2)]
    result2 = await store.append("run-r1", more, 3)
    assert result2.version == 5
    assert min(result2.positions) > max(result.positions)

    records = await store.read_stream("run-r1")
    assert ids(records) == [e.event_id for e in first + more]
    assert [r.stream_version for r in records] == [1, 2, 3, 4, 5]
    assert [r.position for r in records] == [*result.positions, *result2.positions]
    assert all(r.stream_id == "run-r1" for r in records)
    assert all(r.event_type == "run_paused" for r in records)
    assert all((r.org, r.pipeline_id, r.run_id) == ("o1", "p1", "r1") for r in records)
    assert [r.event for r in records] == [e.event for e in first + more]
    assert all(r.recorded_at.tzinfo is not None for r in records)

    tail = await store.read_stream("run-r1", after_version=3)
    assert [r.stream_version for r in tail] == [4, 5]
    assert ids(tail) == [e.event_id for e in more]


async def test_reading_a_stream_that_does_not_exist_gives_nothing(store: Any) -> None:
    assert await store.read_stream("run-nope") == []


async def test_the_stored_payload_is_byte_for_byte_what_was_encoded(store: Any) -> None:
    event = RunPaused(paused_by="zoë", reason='tabs\tand "quotes" ✓ \U0001f680', at=T0)
    await store.append("run-r1", [NewEvent(event_id=str(uuid.uuid4()), event=event)], 0)
    (record,) = await store.read_stream("run-r1")
    assert record.data == ev.encode(event)
    assert record.event == event


async def test_the_events_of_one_append_share_a_transaction_and_follow_each_other(store: Any) -> None:
    result = await store.append("run-r1", [new() for _ in range(4)], 0)
    feed = await read_all(store)
    assert len({r.tx_id for r in feed}) == 1
    assert [r.position for r in feed] == list(result.positions)
    assert list(result.positions) == list(range(result.positions[0], result.positions[0] + 4))


async def test_each_event_keeps_its_own_metadata_within_one_append(store: Any) -> None:
    batch = [new("a", run_id="r1", pipeline_id="p1", org="o1"), new("b", run_id="r2", pipeline_id="p2", org="o2")]
    await store.append("misc-1", batch, 0)
    records = await store.read_stream("misc-1")
    assert [(r.org, r.pipeline_id, r.run_id) for r in records] == [("o1", "p1", "r1"), ("o2", "p2", "r2")]


# ---- optimistic concurrency ---------------------------------------------------------------


async def test_expected_version_0_on_an_existing_stream_raises_and_writes_nothing(store: Any) -> None:
    original = new("original")
    await store.append("run-r1", [original], 0)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("run-r1", [new("intruder")], 0)
    assert info.value.stream_id == "run-r1"
    assert info.value.expected == 0
    await nothing_written(store, "run-r1", 1, [original.event_id])


@pytest.mark.parametrize("stale", [1, 3, 7])
async def test_an_expected_version_other_than_the_current_one_raises_and_writes_nothing(store: Any, stale: int) -> None:
    a, b = new("a"), new("b")
    await store.append("run-r1", [a], 0)
    await store.append("run-r1", [b], 1)
    with pytest.raises(WrongExpectedVersion):
        await store.append("run-r1", [new("late"), new("late")], stale)
    await nothing_written(store, "run-r1", 2, [a.event_id, b.event_id])
    # The stream goes on from where it really is.
    assert (await store.append("run-r1", [new("c")], 2)).version == 3


async def test_an_expected_version_on_a_stream_that_does_not_exist_raises(store: Any) -> None:
    with pytest.raises(WrongExpectedVersion):
        await store.append("run-r1", [new()], 1)
    assert await store.read_stream("run-r1") == []
    assert await read_all(store) == []


async def test_no_expected_version_appends_to_a_new_or_an_existing_stream(store: Any) -> None:
    assert (await store.append("run-r1", [new("a")], None)).version == 1
    assert (await store.append("run-r1", [new("b"), new("c")], None)).version == 3
    records = await store.read_stream("run-r1")
    assert [r.stream_version for r in records] == [1, 2, 3]
    assert labels(records) == ["a", "b", "c"]


async def test_of_many_concurrent_appends_at_one_version_exactly_one_wins(store: Any) -> None:
    await store.append("run-r1", [new("first")], 0)
    contenders = [new(f"c{i}") for i in range(20)]
    results = await asyncio.gather(
        *(store.append("run-r1", [c], 1) for c in contenders),
        return_exceptions=True,
    )
    winners = [c for c, r in zip(contenders, results, strict=True) if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, WrongExpectedVersion) for r in losers), losers
    records = await store.read_stream("run-r1")
    assert [r.stream_version for r in records] == [1, 2]
    assert records[1].event_id == winners[0].event_id
    assert len(await read_all(store)) == 2


async def test_of_many_concurrent_creates_of_one_stream_exactly_one_wins(store: Any) -> None:
    contenders = [new(f"c{i}") for i in range(20)]
    results = await asyncio.gather(*(store.append("run-r1", [c, new()], 0) for c in contenders), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    assert all(isinstance(r, WrongExpectedVersion) for r in results if isinstance(r, BaseException))
    assert [r.stream_version for r in await store.read_stream("run-r1")] == [1, 2]
    assert len(await read_all(store)) == 2


async def test_an_event_id_already_stored_is_refused_and_nothing_is_written(store: Any) -> None:
    first = new("first")
    await store.append("run-r1", [first], 0)
    again = NewEvent(event_id=first.event_id, event=first.event)
    with pytest.raises(ValueError, match="event id"):
        await store.append("run-r2", [again], 0)
    with pytest.raises(ValueError, match="event id"):
        await store.append("run-r1", [new("other"), again], 1)
    with pytest.raises(ValueError, match="event id"):
        await store.append("run-r1", [again], None)
    await nothing_written(store, "run-r1", 1, [first.event_id])
    assert await store.read_stream("run-r2") == []
    assert (await store.append("run-r2", [new()], 0)).version == 1


async def test_racing_writers_on_shared_streams_lose_cleanly_and_a_follower_misses_nothing(store: Any) -> None:
    """Writers share streams two by two and append through `append` (no held transaction) at the
    version they last saw, retrying after a lost race; a live follower sees every winner once."""
    writers, appends_each = 8, 30
    committed: list[str] = []
    conflicts = 0
    done = asyncio.Event()

    async def writer(w: int) -> None:
        nonlocal conflicts
        stream = f"run-shared{w % (writers // 2)}"
        version: int | None = None
        for i in range(appends_each):
            batch = [new(f"w{w}.{i}.{j}") for j in range(1 + (i % 4 == 0))]
            while True:
                if version is None:
                    version = len(await store.read_stream(stream))
                try:
                    result = await store.append(stream, batch, version)
                except WrongExpectedVersion:
                    conflicts += 1
                    version = None
                    continue
                version = result.version
                committed.extend(e.event_id for e in batch)
                break
            await asyncio.sleep(0)

    delivered: list[RecordedEvent] = []

    async def follower() -> None:
        cursor = FEED_START
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_DEADLINE_S
        while True:
            finished = done.is_set()
            page = await store.read_feed(cursor, 50)
            for record in page:
                assert record.cursor > cursor, "the feed went backwards or repeated an event"
                cursor = record.cursor
            delivered.extend(page)
            if finished and not page:
                return
            assert loop.time() < deadline, f"follower stalled at {len(delivered)}/{len(committed)} events"
            if not page:
                await asyncio.sleep(0.001)

    follow = asyncio.create_task(follower())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await follow

    delivered_ids = ids(delivered)
    assert len(delivered_ids) == len(set(delivered_ids)), "an event was delivered twice"
    assert set(delivered_ids) == set(committed), "the follower skipped committed events"
    for k in range(writers // 2):
        records = await store.read_stream(f"run-shared{k}")
        assert [r.stream_version for r in records] == list(range(1, len(records) + 1))
        in_feed = [r.stream_version for r in delivered if r.stream_id == f"run-shared{k}"]
        assert in_feed == list(range(1, len(records) + 1))
    # Every append of a batch is whole: the events of one append are never split by a loser.
    assert len(committed) == writers * (appends_each + (appends_each + 3) // 4)


# ---- unique keys --------------------------------------------------------------------------


# ---- what an append writes alongside its own events -------------------------------------------


async def leases(store: Any) -> dict[tuple[str, str, int], str]:
    """The unit leases held, by (run, key, attempt): the executor holding each."""
    if isinstance(store, InMemoryEventStore):
        return dict(store.leases)
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT run_id, stage_id, attempt, executor_id FROM stage_leases")
        return {(r[0], r[1], r[2]): r[3] for r in await cur.fetchall()}


HOLDER = LeaseHolder(executor_id="ex-1", host="h1", ttl=30.0)


async def test_events_written_alongside_come_first_in_one_transaction_at_their_streams_versions(store: Any) -> None:
    await store.append("run-r1", [new("started")], 0)
    earlier = new("earlier line")
    await store.append("runlog-r1", [earlier], None)
    last_lines = (new("last line"), new("last line too"))
    done = new("done")
    result = await store.append("run-r1", [done], 1, alongside=Alongside(before=(("runlog-r1", last_lines),)))
    assert result.version == 2
    assert len(result.positions) == 3
    log = await store.read_stream("runlog-r1")
    assert ids(log) == [earlier.event_id, *(e.event_id for e in last_lines)]
    assert [r.stream_version for r in log] == [1, 2, 3]
    assert [r.stream_version for r in await store.read_stream("run-r1")] == [1, 2]
    feed = await read_all(store)
    tail = feed[-3:]
    assert ids(tail) == [*(e.event_id for e in last_lines), done.event_id]  # a reader of `done` has the log
    assert len({r.tx_id for r in tail}) == 1
    assert [r.position for r in tail] == sorted(result.positions)


async def test_a_stream_written_alongside_is_created_when_it_does_not_exist(store: Any) -> None:
    first = new("first line")
    await store.append("run-r1", [new("started")], 0, alongside=Alongside(before=(("runlog-r1", (first,)),)))
    (record,) = await store.read_stream("runlog-r1")
    assert (record.event_id, record.stream_version) == (first.event_id, 1)


async def test_an_append_that_loses_its_version_writes_nothing_alongside(store: Any) -> None:
    started = new("started")
    await store.append("run-r1", [started], 0, alongside=Alongside(take=(UnitLease("r1", "s1", 1),), holder=HOLDER))
    with pytest.raises(WrongExpectedVersion):
        await store.append(
            "run-r1",
            [new("stale")],
            0,
            alongside=Alongside(
                before=(("runlog-r1", (new("line"),)),),
                take=(UnitLease("r1", "s2", 1),),
                release=(UnitLease("r1", "s1", 1),),
                holder=LeaseHolder("ex-2", "h2", 30.0),
            ),
        )
    assert await store.read_stream("runlog-r1") == []
    assert ids(await read_all(store)) == [started.event_id]
    assert await leases(store) == {("r1", "s1", 1): "ex-1"}
    # The log stream was not created either: its first append is at version 1.
    assert (await store.append("runlog-r1", [new("line")], None)).version == 1


async def test_leases_are_taken_over_and_released_with_the_append_that_lands(store: Any) -> None:
    await store.append(
        "run-r1",
        [new("started")],
        0,
        alongside=Alongside(take=(UnitLease("r1", "a", 1), UnitLease("r1", "b", 1)), holder=HOLDER),
    )
    assert await leases(store) == {("r1", "a", 1): "ex-1", ("r1", "b", 1): "ex-1"}
    # Another executor's append starts c, takes over b (its writer runs it now) and ends a.
    await store.append(
        "run-r1",
        [new("next")],
        1,
        alongside=Alongside(
            take=(UnitLease("r1", "b", 1), UnitLease("r1", "c", 1)),
            release=(UnitLease("r1", "a", 1),),
            holder=LeaseHolder("ex-2", "h2", 30.0),
        ),
    )
    assert await leases(store) == {("r1", "b", 1): "ex-2", ("r1", "c", 1): "ex-2"}


async def test_a_stream_is_written_alongside_once_and_never_its_own_append(store: Any) -> None:
    with pytest.raises(ValueError):
        await store.append("run-r1", [new()], 0, alongside=Alongside(before=(("run-r1", (new(),)),)))
    with pytest.raises(ValueError):
        await store.append("run-r1", [new()], 0, alongside=Alongside(before=(("log", (new(),)), ("log", (new(),)))))
    assert await read_all(store) == []


NAME = UniqueKey(scope="pipeline-name:o1", key="deploy")


async def test_a_claimed_key_cannot_be_claimed_by_another_stream_and_nothing_is_written(store: Any) -> None:
    owner = new("owner")
    await store.append("pipeline-p1", [owner], 0, claim=[NAME])
    with pytest.raises(UniqueKeyTaken) as info:
        await store.append("pipeline-p2", [new("rival")], 0, claim=[NAME])
    assert (info.value.scope, info.value.key) == (NAME.scope, NAME.key)
    assert await store.read_stream("pipeline-p2") == []
    assert ids(await read_all(store)) == [owner.event_id]
    # The failed append left no stream behind: p2 can still be created under another name.
    await store.append("pipeline-p2", [new("rival")], 0, claim=[UniqueKey(NAME.scope, "other")])


async def test_a_taken_key_fails_an_append_to_an_existing_stream_without_moving_its_version(store: Any) -> None:
    await store.append("pipeline-p1", [new()], 0, claim=[NAME])
    await store.append("pipeline-p2", [new()], 0, claim=[UniqueKey(NAME.scope, "p2-name")])
    with pytest.raises(UniqueKeyTaken):
        await store.append("pipeline-p2", [new("rename")], 1, claim=[NAME])
    assert [r.stream_version for r in await store.read_stream("pipeline-p2")] == [1]
    assert (await store.append("pipeline-p2", [new()], 1)).version == 2


async def test_a_keyed_append_at_a_stale_version_raises_and_neither_writes_nor_claims(store: Any) -> None:
    """Keyed appends take the same one-statement path as the others, with the same errors."""
    await store.append("pipeline-p1", [new("created")], 0)
    await store.append("pipeline-p1", [new("updated")], 1)
    feed = ids(await read_all(store))
    with pytest.raises(WrongExpectedVersion):
        await store.append("pipeline-p1", [new("stale"), new("stale")], 1, claim=[NAME])
    await nothing_written(store, "pipeline-p1", 2, feed)
    await store.append("pipeline-p2", [new()], 0, claim=[NAME])  # the key was not taken


async def test_a_released_key_can_be_claimed_again(store: Any) -> None:
    await store.append("pipeline-p1", [new("created")], 0, claim=[NAME])
    await store.append("pipeline-p1", [new("deleted")], 1, release=[NAME])
    await store.append("pipeline-p2", [new("created")], 0, claim=[NAME])
    assert labels(await store.read_stream("pipeline-p2")) == ["created"]


async def test_a_rename_releases_the_old_key_and_claims_the_new_one_in_one_append(store: Any) -> None:
    new_name = UniqueKey(NAME.scope, "deploy-v2")
    await store.append("pipeline-p1", [new()], 0, claim=[NAME])
    await store.append("pipeline-p1", [new("renamed")], 1, claim=[new_name], release=[NAME])
    await store.append("pipeline-p2", [new()], 0, claim=[NAME])
    with pytest.raises(UniqueKeyTaken):
        await store.append("pipeline-p3", [new()], 0, claim=[new_name])


async def test_the_same_key_in_another_scope_is_a_different_key(store: Any) -> None:
    await store.append("pipeline-p1", [new()], 0, claim=[NAME])
    await store.append("pipeline-p2", [new()], 0, claim=[UniqueKey("pipeline-name:o2", NAME.key)])


async def test_of_many_concurrent_claims_of_one_key_exactly_one_wins(store: Any) -> None:
    results = await asyncio.gather(
        *(store.append(f"pipeline-p{i}", [new()], 0, claim=[NAME]) for i in range(12)),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1, results
    assert all(isinstance(r, UniqueKeyTaken) for r in results if isinstance(r, BaseException)), results
    assert len(await read_all(store)) == 1


# ---- the global feed ----------------------------------------------------------------------


async def test_an_empty_store_has_an_empty_feed(store: Any) -> None:
    assert await store.read_feed(FEED_START) == []


async def test_the_feed_pages_through_every_event_in_cursor_order(store: Any) -> None:
    appended = []
    for i in range(7):
        batch = [new(f"{i}.{j}") for j in range(i % 3 + 1)]
        await store.append(f"run-{i % 3}", batch, None)
        appended += batch
    page = await store.read_feed(FEED_START, 4)
    assert len(page) == 4
    feed = await read_all(store)
    assert ids(feed) == [e.event_id for e in appended]
    cursors = [r.cursor for r in feed]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    assert await store.read_feed(feed[-1].cursor) == []
    assert ids(await store.read_feed(feed[2].cursor, 3)) == ids(feed[3:6])


async def test_the_feed_filters_by_run_and_by_pipeline(store: Any) -> None:
    r1a = new("r1a", run_id="r1", pipeline_id="p1")
    p1 = new("p1", pipeline_id="p1")
    r2 = new("r2", run_id="r2", pipeline_id="p2")
    r1b = new("r1b", run_id="r1", pipeline_id="p1")
    await store.append("run-r1", [r1a], 0)
    await store.append("pipeline-p1", [p1], 0)
    await store.append("run-r2", [r2], 0)
    await store.append("run-r1", [r1b], 1)

    assert labels(await read_all(store, run_id="r1")) == ["r1a", "r1b"]
    assert labels(await read_all(store, run_id="r2")) == ["r2"]
    assert labels(await read_all(store, pipeline_id="p1")) == ["r1a", "p1", "r1b"]
    assert labels(await read_all(store, pipeline_id="p2")) == ["r2"]
    assert labels(await read_all(store, run_id="r1", pipeline_id="p2")) == []
    assert await read_all(store, run_id="nope") == []

    (first,) = await store.read_feed(FEED_START, 1, run_id="r1")
    assert labels(await store.read_feed(first.cursor, run_id="r1")) == ["r1b"]


async def test_cursor_of_gives_the_feed_cursor_of_a_position(store: Any) -> None:
    await store.append("run-r1", [new("a"), new("b")], 0)
    result = await store.append("run-r2", [new("c")], 0)
    feed = await read_all(store)
    for record in feed:
        assert await store.cursor_of(record.position) == record.cursor
    cursor = await store.cursor_of(result.positions[0])
    assert cursor == feed[-1].cursor
    assert await store.read_feed(cursor) == []
    assert labels(await store.read_feed(feed[0].cursor)) == ["b", "c"]


async def test_cursor_of_a_position_without_an_event_is_none(store: Any) -> None:
    assert await store.cursor_of(1) is None
    result = await store.append("run-r1", [new()], 0)
    assert await store.cursor_of(result.positions[-1] + 1000) is None


async def test_an_open_append_holding_a_lower_position_is_waited_for_not_skipped(store: Any) -> None:
    seed = new("seed")
    await store.append("run-s", [seed], 0)
    (first,) = await store.read_feed(FEED_START)
    cursor = first.cursor  # a follower that is fully caught up

    a, b = new("A"), new("B")
    async with store.begin_append("run-a", [a], 0) as held:
        result_b = await store.append("run-b", [b], 0)
        assert result_b.positions[0] > held.positions[0]
        # B has committed, but A (lower position, older transaction) is still open.
        assert await store.read_feed(cursor) == []
        assert await store.read_feed(FEED_START) == [first]
        if hasattr(store, "head"):
            assert await store.head() == cursor
    delivered = await store.read_feed(cursor)
    assert labels(delivered) == ["A", "B"]
    assert delivered[0].cursor < delivered[1].cursor
    assert delivered[0].position == held.positions[0]
    assert ids(await read_all(store)) == [seed.event_id, a.event_id, b.event_id]
    if hasattr(store, "head"):
        assert await store.head() == delivered[-1].cursor


async def test_streams_of_a_pipeline_are_the_committed_streams_it_opened_by_prefix_oldest_first(store: Any) -> None:
    await store.append("run-1", [new(pipeline_id="p1"), new(pipeline_id="p1")], 0)
    await store.append("runlog-1", [new(pipeline_id="p1")], 0)
    await store.append("run-other", [new(pipeline_id="p2")], 0)
    await store.append("run-1", [new(pipeline_id="p1")], 2)
    async with store.begin_append("run-held", [new(pipeline_id="p1")], 0):
        # Above the feed's horizon, but committed: a pipeline's streams are read from the store.
        await store.append("run-2", [new(pipeline_id="p1")], 0)
        assert await store.streams_of("p1", "run-") == ["run-1", "run-2"]
    assert await store.streams_of("p1", "run-") == ["run-1", "run-held", "run-2"]
    assert await store.streams_of("p1", "runlog-") == ["runlog-1"]
    assert await store.streams_of("p3", "run-") == []


async def test_an_append_that_fails_inside_its_block_writes_nothing_and_holds_nothing_back(store: Any) -> None:
    a, b = new("A"), new("B")
    with pytest.raises(RuntimeError, match="boom"):
        async with store.begin_append("run-a", [a], 0, claim=[NAME]):
            await store.append("run-b", [b], 0)
            raise RuntimeError("boom")
    assert await store.read_stream("run-a") == []
    assert ids(await read_all(store)) == [b.event_id]
    # The stream and the key are still free.
    await store.append("run-a", [new("A again")], 0, claim=[NAME])


async def test_a_live_follower_gets_every_committed_event_once_in_feed_order(store: Any) -> None:
    writers, appends_each = 8, 50
    committed: list[str] = []
    done = asyncio.Event()
    rng = random.Random(7)
    delays = [[rng.choice((0.0, 0.0, 0.0005, 0.002)) for _ in range(appends_each)] for _ in range(writers)]

    async def writer(w: int) -> None:
        version = 0
        for i in range(appends_each):
            batch = [new(f"w{w}.{i}.{j}") for j in range(1 + (i % 3 == 0))]
            # Hold some transactions open a little so that commits land out of position order.
            async with store.begin_append(f"run-w{w}", batch, version) as result:
                if delays[w][i]:
                    await asyncio.sleep(delays[w][i])
            version = result.version
            committed.extend(e.event_id for e in batch)
            await asyncio.sleep(0)

    delivered: list[RecordedEvent] = []

    async def follower() -> None:
        cursor = FEED_START
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_DEADLINE_S
        quiet_since: float | None = None
        while True:
            finished = done.is_set()
            page = await store.read_feed(cursor, 64)
            for record in page:
                assert record.cursor > cursor, "the feed went backwards or repeated an event"
                cursor = record.cursor
            delivered.extend(page)
            if finished and not page:
                if len(delivered) >= len(committed):
                    return
                # Writers are done but events are missing: give late commits a moment, then let
                # the assertions below say which events were skipped.
                quiet_since = quiet_since or loop.time()
                if loop.time() - quiet_since > FOLLOW_GRACE_S:
                    return
            else:
                quiet_since = None
            assert loop.time() < deadline, f"follower stalled at {len(delivered)}/{len(committed)} events"
            if not page:
                await asyncio.sleep(0.001)

    follow = asyncio.create_task(follower())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await follow

    delivered_ids = ids(delivered)
    assert len(delivered_ids) == len(set(delivered_ids)), "an event was delivered twice"
    skipped = set(committed) - set(delivered_ids)
    assert not skipped, f"the follower skipped {len(skipped)} of {len(committed)} committed events"
    assert set(delivered_ids) == set(committed)
    assert len(committed) == writers * (appends_each + (appends_each + 2) // 3)
    cursors = [r.cursor for r in delivered]
    assert cursors == sorted(cursors)
    # Within each stream the feed keeps stream order.
    for w in range(writers):
        versions = [r.stream_version for r in delivered if r.stream_id == f"run-w{w}"]
        assert versions == list(range(1, len(versions) + 1))
    # And a fresh reader from the start sees the same sequence.
    assert ids(await read_all(store)) == delivered_ids


@pytest.mark.parametrize("store", ["postgres"], indirect=True)  # head() is an extra of PostgreSQL
async def test_head_is_the_cursor_of_the_newest_committed_event(store: Any) -> None:
    assert await store.head() == FEED_START
    await store.append("run-r1", [new(), new()], 0)
    await store.append("run-r2", [NewEvent(event_id=str(uuid.uuid4()), event=RunStarted(at=T0))], 0)
    feed = await read_all(store)
    assert await store.head() == feed[-1].cursor
