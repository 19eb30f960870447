"""Idempotency keys against real PostgreSQL: old keys are purged."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool

from infra.http.idempotency import IdempotencyKeys, request_hash
from services.bootstrap import open_store
from tests.integration.system import make_settings

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest_asyncio.fixture(loop_scope="session")
async def pool(database_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[AsyncConnectionPool]:
    pool, _ = await open_store(make_settings(database_url, nats_url, tmp_path))
    try:
        yield pool
    finally:
        await pool.close()


async def _keys(pool: AsyncConnectionPool, scope: str) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT key FROM idempotency_keys WHERE scope = %s", (scope,))
        return {row[0] for row in await cur.fetchall()}


async def test_keys_older_than_the_retention_are_purged_and_fresh_ones_stay(pool: AsyncConnectionPool) -> None:
    scope = f"test|{uuid.uuid4()}"
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body, created_at) "
            "VALUES (%s, 'old', 'h', 200, %s, now() - interval '25 hours')",
            (scope, b"x" * 1000),
        )
    keys = IdempotencyKeys(pool)
    assert await keys.begin(scope, "fresh", request_hash(b"{}")) is None
    await keys.finish(scope, "fresh", 201, b"{}")
    # Another caller's write purges what is past the retention, whatever its scope.
    assert await keys.begin(f"other|{uuid.uuid4()}", "k", request_hash(b"{}")) is None
    assert await _keys(pool, scope) == {"fresh"}
