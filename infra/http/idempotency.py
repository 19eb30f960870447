"""`Idempotency-Key` on POST commands: the same key and body answers the first response; the
same key with another body is 409. Scoped to the caller, method and path; kept for the retention
(24 hours by default), after which writes purge them.

The first request inserts a pending row before it runs the command, so concurrent requests
with one key run the command once: the others wait for the first one's stored response. The
row's short lease is renewed while the command runs (`held`), so only a request whose process
died loses its key to a retry, however slow the command.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("pipelines.api")
TTL_HOURS = 24.0
# How often (at most) a process purges the keys past their retention: on a write, so that an idle
# server does no work, and rows never pile up beyond one retention plus this.
PURGE_EVERY_SECONDS = 300.0
# Ids of things a keyed command creates derive from the key (see `derived_id`).
_KEYED = uuid.UUID("0c7e2f9a-51d4-4c3b-8e0a-7f6b5d4c3a21")


def derived_id(scope: str, key: str) -> str:
    """The id a command sent with this Idempotency-Key gives what it creates: a retry that takes
    over a key whose first request died finds that thing already there instead of making another."""
    return str(uuid.uuid5(_KEYED, f"{scope}\n{key}"))


@dataclass(frozen=True)
class Stored:
    """A stored answer; `position` is the store position its command wrote (None when it wrote
    nothing, or was stored before positions were kept)."""

    status_code: int
    body: bytes
    position: int | None = None


class KeyReuse(Exception):
    """The key was used with another request body."""


class InFlight(Exception):
    """The first request with this key is still running."""


def request_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class IdempotencyKeys:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        wait_seconds: float = 30.0,
        lease_seconds: float = 10.0,
        retention_hours: float = TTL_HOURS,
    ) -> None:
        self._pool = pool
        self._wait = wait_seconds
        self._lease = lease_seconds
        self._retention = retention_hours * 3600.0  # seconds
        self._next_purge = float("-inf")

    async def purge(self) -> int:
        """Delete the keys (and their stored responses) older than the retention; how many."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => %s)",
                (self._retention,),
            )
            return cur.rowcount

    async def begin(self, scope: str, key: str, digest: str) -> Stored | None:
        """None: we own the key and must `finish` or `abandon` it. Else the stored response."""
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_purge:
            self._next_purge = loop.time() + PURGE_EVERY_SECONDS
            await self.purge()
        deadline = loop.time() + self._wait
        while True:
            async with self._pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM idempotency_keys WHERE scope = %s AND key = %s "
                    "AND created_at < now() - make_interval(secs => %s)",
                    (scope, key, self._retention),
                )
                cur = await conn.execute(
                    "INSERT INTO idempotency_keys (scope, key, request_hash, locked_until) "
                    "VALUES (%s, %s, %s, now() + make_interval(secs => %s)) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    (scope, key, digest, self._lease),
                )
                if await cur.fetchone() is not None:
                    return None
                cur = await conn.execute(
                    "SELECT request_hash, status_code, body, position FROM idempotency_keys"
                    " WHERE scope = %s AND key = %s",
                    (scope, key),
                )
                row = await cur.fetchone()
                if row is not None and row[0] == digest and row[1] is None:
                    # Still pending: if its lease ran out, the first request's process is gone.
                    cur = await conn.execute(
                        "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => %s) "
                        "WHERE scope = %s AND key = %s AND status_code IS NULL AND locked_until < now() "
                        "RETURNING 1",
                        (self._lease, scope, key),
                    )
                    if await cur.fetchone() is not None:
                        return None
            if row is None:
                continue  # expired and deleted between our statements: try to own it
            if row[0] != digest:
                raise KeyReuse("Idempotency-Key was already used with a different request body")
            if row[1] is not None:
                return Stored(status_code=row[1], body=bytes(row[2] or b""), position=row[3])
            if loop.time() > deadline:
                raise InFlight("a request with this Idempotency-Key is still in progress")
            await asyncio.sleep(0.02)

    @asynccontextmanager
    async def held(self, scope: str, key: str) -> AsyncIterator[None]:
        """Around the command of a key we own: renew its lease until the block ends."""
        heartbeat = asyncio.create_task(self._renew(scope, key))
        try:
            yield
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])

    async def _renew(self, scope: str, key: str) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(
                        "UPDATE idempotency_keys SET locked_until = now() + make_interval(secs => %s) "
                        "WHERE scope = %s AND key = %s AND status_code IS NULL",
                        (self._lease, scope, key),
                    )
            except Exception:  # the next beat tries again; the lease has two more beats left
                log.warning("cannot renew the lease of an Idempotency-Key", exc_info=True)

    async def finish(self, scope: str, key: str, status_code: int, body: bytes, position: int | None = None) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET status_code = %s, body = %s, position = %s WHERE scope = %s AND key = %s",
                (status_code, body, position, scope, key),
            )

    async def abandon(self, scope: str, key: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("DELETE FROM idempotency_keys WHERE scope = %s AND key = %s", (scope, key))
