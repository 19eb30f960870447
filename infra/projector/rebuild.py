"""Recreating every read model from the whole store, in one transaction."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from infra.projector.apply import apply
from infra.projector.checkpoint import NAME, save_checkpoint
from infra.setaside import PROJECTOR, forget, is_poison, record
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, RecordedEvent

# How long a rebuild waits for the read-model tables: a live projector's batch holds them for
# well under a second, so a longer wait means a transaction that is not ending (say, a process
# stopped mid-batch). Better to say so than to wait without a word.
LOCK_WAIT_S = 60


class RebuildBlocked(Exception):
    """The read-model tables stayed locked by another transaction for LOCK_WAIT_S."""


async def rebuild(store: PostgresEventStore, batch: int, lock_wait_s: float = LOCK_WAIT_S) -> int:
    """Drop every read model and fold the whole store again; returns how many events were applied.
    Readers see the old rows until it commits."""
    total = 0
    async with store.pool.connection() as conn, conn.transaction():
        wait = sql.Literal(f"{int(lock_wait_s * 1000)}ms")
        await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(wait))
        try:
            await conn.execute("LOCK TABLE checkpoints, rm_pipelines, rm_runs, rm_run_logs IN EXCLUSIVE MODE")
            await conn.execute("TRUNCATE rm_pipelines, rm_runs, rm_run_logs, rm_deployments")
        except psycopg.errors.LockNotAvailable as exc:
            holders = await _lock_holders(store)
            raise RebuildBlocked(
                f"the read-model tables stayed locked for {lock_wait_s:g} s by another transaction"
                f" ({holders}); nothing was changed"
            ) from exc
        await conn.execute("SET LOCAL lock_timeout = 0")
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


async def _lock_holders(store: PostgresEventStore) -> str:
    """Who holds a lock on the read-model tables: pid, application, state and the last statement."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT DISTINCT a.pid, a.application_name, a.state, left(a.query, 80) FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.granted AND a.pid <> pg_backend_pid() AND l.relation = ANY("
            "ARRAY['checkpoints', 'rm_pipelines', 'rm_runs', 'rm_run_logs', 'rm_deployments']::regclass[])"
        )
        rows = await cur.fetchall()
    if not rows:
        return "it has ended since"
    return "; ".join(f"pid {pid} {app or '-'} {state}: {query}" for pid, app, state, query in rows)
