"""Stage leases (who runs what, kept alive by heartbeats) and durable run timers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import AsyncConnectionPool


@dataclass(frozen=True)
class Lease:
    run_id: str
    stage_id: str
    attempt: int
    executor_id: str
    host: str
    pgid: int | None
    expires_at: datetime


@dataclass(frozen=True)
class Timer:
    run_id: str
    kind: str
    key: str
    due_at: datetime


class LeaseStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def acquire(self, run_id: str, stage_id: str, attempt: int, executor_id: str, host: str, ttl: float) -> bool:
        """Take the lease if nobody holds it; whether we did. (The executor takes the leases of the
        units it starts in the transaction of the append that starts them: see leasing.py.)"""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO stage_leases (run_id, stage_id, attempt, executor_id, host, expires_at) "
                "VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (run_id, stage_id, attempt) DO NOTHING RETURNING 1",
                (run_id, stage_id, attempt, executor_id, host, ttl),
            )
            return await cur.fetchone() is not None

    async def set_pgid(self, run_id: str, stage_id: str, attempt: int, pgid: int) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE stage_leases SET pgid = %s WHERE run_id = %s AND stage_id = %s AND attempt = %s",
                (pgid, run_id, stage_id, attempt),
            )

    async def release(self, run_id: str, stage_id: str, attempt: int, executor_id: str | None = None) -> None:
        """Drop the lease; with `executor_id`, only if that executor holds it."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "DELETE FROM stage_leases WHERE run_id = %s AND stage_id = %s AND attempt = %s "
                "AND (%s::text IS NULL OR executor_id = %s::text)",
                (run_id, stage_id, attempt, executor_id, executor_id),
            )

    async def heartbeat(self, executor_id: str, ttl: float) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE stage_leases SET expires_at = now() + make_interval(secs => %s) WHERE executor_id = %s",
                (ttl, executor_id),
            )
            return cur.rowcount

    async def claim_expired(self, executor_id: str, hold: float, limit: int = 50) -> list[Lease]:
        """Take over leases whose executor stopped renewing them (held for `hold` seconds)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE stage_leases SET expires_at = now() + make_interval(secs => %s), executor_id = %s "
                "WHERE (run_id, stage_id, attempt) IN ("
                "  SELECT run_id, stage_id, attempt FROM stage_leases WHERE expires_at < now() "
                "  ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING run_id, stage_id, attempt, executor_id, host, pgid, expires_at",
                (hold, executor_id, limit),
            )
            return [Lease(*row) for row in await cur.fetchall()]

    # ---- timers ----------------------------------------------------------------------------

    async def schedule(self, run_id: str, kind: str, key: str, due_at: datetime) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO run_timers (run_id, kind, key, due_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (run_id, kind, key) DO UPDATE SET due_at = EXCLUDED.due_at",
                (run_id, kind, key, due_at),
            )

    async def claim_due(self, hold: float, limit: int = 100) -> list[Timer]:
        """Due timers, pushed `hold` seconds into the future so no one else takes them meanwhile."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE run_timers SET due_at = now() + make_interval(secs => %s) "
                "WHERE (run_id, kind, key) IN ("
                "  SELECT run_id, kind, key FROM run_timers WHERE due_at <= now() "
                "  ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING run_id, kind, key, due_at",
                (hold, limit),
            )
            return [Timer(*row) for row in await cur.fetchall()]

    async def done(self, timer: Timer) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                # Unless it was scheduled again meanwhile (a later retry of the same run).
                "DELETE FROM run_timers WHERE run_id = %s AND kind = %s AND key = %s AND due_at = %s",
                (timer.run_id, timer.kind, timer.key, timer.due_at),
            )
