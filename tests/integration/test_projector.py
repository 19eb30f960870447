"""The read models: a rebuild from the store yields the same rows as the live projector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from infra.projector import rebuild as rb
from infra.projector.consumer import Projector
from infra.store.postgres import PostgresEventStore
from infra.store.records import FeedCursor, RecordedEvent
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration


async def _rows(system: System) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    async with system.store.pool.connection() as conn:
        for table, key in (("rm_pipelines", "id"), ("rm_runs", "id"), ("rm_run_logs", "run_id, position")):
            cur = await conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            out[table] = [tuple(str(v) for v in row) for row in await cur.fetchall()]
    return out


async def test_rebuild_recreates_the_same_read_models(system: System) -> None:
    gate = {"id": "gate", "type": "approval", "config": {"message": "ok?"}}
    script = {"id": "s", "type": "script", "config": {"command": "echo one; echo two"}}
    p1 = await system.create_pipeline([script, gate])
    p2 = await system.create_pipeline([script])
    r1 = await system.trigger(p1["id"])
    r2 = await system.trigger(p2["id"])
    await system.wait_status(p1["id"], r1["id"], "waiting_approval")
    await system.wait_status(p2["id"], r2["id"], "succeeded")
    deleted = await system.create_pipeline([script])
    await system.client.delete(f"/api/v1/pipelines/{deleted['id']}", headers=system.headers("admin"))

    async def caught_up() -> bool:
        head = await system.store.head()
        return await system.projector.checkpoint() == head

    await eventually(caught_up, what="the projector to catch up")
    before = await _rows(system)
    assert any(p1["id"] in row[0] for row in before["rm_pipelines"])
    assert not any(deleted["id"] in row[0] for row in before["rm_pipelines"])
    assert len(before["rm_run_logs"]) >= 2

    applied = await system.projector.rebuild()
    assert applied > 0
    after = await _rows(system)
    assert after == before


class _HeldStore(PostgresEventStore):
    """The store, whose first feed read with events waits for `hold` before returning them."""

    def __init__(self, store: PostgresEventStore, hold: Callable[[list[RecordedEvent]], Awaitable[None]]) -> None:
        super().__init__(store.pool)
        self._hold: Callable[[list[RecordedEvent]], Awaitable[None]] | None = hold

    async def follow_feed(self, after: FeedCursor, limit: int = 500) -> tuple[list[RecordedEvent], bool]:
        events, pending = await super().follow_feed(after, limit)
        if events and self._hold is not None:
            hold, self._hold = self._hold, None
            await hold(events)
        return events, pending


async def test_racing_projectors_apply_every_event_exactly_once(system: System) -> None:
    """A second projector (small batches, its own state cache) catches up while the live one runs.
    Its first batch is held back until the live projector has committed those very events, so the
    two certainly race on the checkpoint's compare-and-set: the rival's stale batch is refused whole
    (in pipeline mode, where nothing waits for the compare-and-set's result), it reads again from
    the table, and the read models end up exactly as a rebuild makes them."""
    held: list[RecordedEvent] = []

    async def until_the_live_projector_committed(events: list[RecordedEvent]) -> None:
        held.extend(events)

        async def committed() -> bool:
            return await system.projector.checkpoint() >= events[-1].cursor

        await eventually(committed, what="the live projector to commit the held batch")

    rival = Projector(
        _HeldStore(system.store, until_the_live_projector_committed), system.settings.database_url, batch=3
    )
    stop = asyncio.Event()
    applied = 0

    async def race() -> None:
        nonlocal applied
        while not stop.is_set():
            applied += await rival.catch_up()
            await asyncio.sleep(0.001)

    task = asyncio.create_task(race())
    try:
        script = {"id": "s", "type": "script", "config": {"command": "echo a; echo b"}}
        runs = []
        for _ in range(3):
            p = await system.create_pipeline([script, {"id": "t", "type": "script", "config": {"command": "true"}}])
            runs += [(p["id"], (await system.trigger(p["id"]))["id"]) for _ in range(2)]
        for pipeline_id, run_id in runs:
            await system.wait_status(pipeline_id, run_id, "succeeded")

        async def both_caught_up() -> bool:
            head = await system.store.head()
            return await system.projector.checkpoint() == head and not task.done()

        await eventually(both_caught_up, what="the projectors to catch up")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # The race happened, and the rival lost it: its held batch was refused, not applied twice.
    assert held, "the rival never read a batch"
    assert rival.stale_batches >= 1
    assert task.exception() is None
    before = await _rows(system)
    assert sum(row[0] in {r for _, r in runs} for row in before["rm_runs"]) == len(runs)
    assert await system.projector.checkpoint() == await system.store.head()
    await system.projector.rebuild()
    assert await _rows(system) == before


async def test_a_rebuild_blocked_by_a_transaction_that_does_not_end_says_who_and_changes_nothing(
    system: System,
) -> None:
    """A transaction holding a read-model table (a process stopped mid-batch) makes the rebuild give
    up with the holder named, rather than wait without a word, and the read models stay as they were."""

    async def caught_up() -> bool:
        return await system.projector.checkpoint() == await system.store.head()

    await eventually(caught_up, what="the projector to catch up")
    before = await _rows(system)
    async with system.store.pool.connection() as holder:
        await holder.execute("SET application_name = 'stuck-batch'")
        async with holder.transaction():
            await holder.execute("LOCK TABLE rm_runs IN ROW EXCLUSIVE MODE")
            with pytest.raises(rb.RebuildBlocked) as blocked:
                await rb.rebuild(system.store, 1000, lock_wait_s=0.5)
    assert "stuck-batch" in str(blocked.value), blocked.value
    assert "nothing was changed" in str(blocked.value)
    assert await _rows(system) == before
