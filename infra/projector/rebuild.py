"""Recreating every read model from the whole store, in one transaction."""

from __future__ import annotations

from typing import Any

import psycopg

from infra.projector.apply import apply
from infra.projector.checkpoint import NAME, save_checkpoint
from infra.setaside import PROJECTOR, forget, is_poison, record
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, RecordedEvent


async def rebuild(store: PostgresEventStore, batch: int) -> int:
    """Drop every read model and fold the whole store again; returns how many events were applied.
    Readers see the old rows until it commits."""
    total = 0
    async with store.pool.connection() as conn, conn.transaction():
        await conn.execute("LOCK TABLE checkpoints, rm_pipelines, rm_runs, rm_run_logs IN EXCLUSIVE MODE")
        await conn.execute("TRUNCATE rm_pipelines, rm_runs, rm_run_logs, rm_deployments")
        await conn.execute("DELETE FROM checkpoints WHERE name = %s", (NAME,))
        await forget(conn, PROJECTOR)
        cursor = FEED_START
        while True:
            # The feed is read on other connections: this transaction's own xid holds the
            # horizon, so the rebuild sees exactly what committed before it began.
            events = await store.read_feed(cursor, batch)
            if not events:
                break
            await _apply_setting_aside(conn, events)
            cursor = events[-1].cursor
            total += len(events)
        await save_checkpoint(conn, cursor)
    return total


async def _apply_setting_aside(conn: psycopg.AsyncConnection[Any], events: list[RecordedEvent]) -> None:
    """The batch under a savepoint; if an event of it cannot be projected, its halves, and theirs,
    down to the failing events, which are recorded as set aside (as the live projector does)."""
    try:
        async with conn.transaction():
            await apply(conn, events)
        return
    except Exception as exc:
        if not is_poison(exc):
            raise
        if len(events) == 1:
            await record(conn, PROJECTOR, events[0], exc)
            return
    mid = len(events) // 2
    await _apply_setting_aside(conn, events[:mid])
    await _apply_setting_aside(conn, events[mid:])
