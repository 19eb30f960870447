"""Recreating every read model from the whole store, in one transaction."""

from __future__ import annotations

from infra.projector.apply import apply
from infra.projector.checkpoint import NAME, save_checkpoint
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START


async def rebuild(store: PostgresEventStore, batch: int) -> int:
    """Drop every read model and fold the whole store again; returns how many events were applied.
    Readers see the old rows until it commits."""
    total = 0
    async with store.pool.connection() as conn, conn.transaction():
        await conn.execute("LOCK TABLE checkpoints, rm_pipelines, rm_runs, rm_run_logs IN EXCLUSIVE MODE")
        await conn.execute("TRUNCATE rm_pipelines, rm_runs, rm_run_logs, rm_deployments")
        await conn.execute("DELETE FROM checkpoints WHERE name = %s", (NAME,))
        cursor = FEED_START
        while True:
            # The feed is read on other connections: this transaction's own xid holds the
            # horizon, so the rebuild sees exactly what committed before it began.
            events = await store.read_feed(cursor, batch)
            if not events:
                break
            await apply(conn, events)
            cursor = events[-1].cursor
            total += len(events)
        await save_checkpoint(conn, cursor)
    return total
