"""Fixtures of the event store contract suite.

PostgreSQL comes from the project-wide session fixture `database_url` (tests/conftest.py: a
fresh, empty database for the session); this suite migrates it and truncates the event store
tables before each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from infra.store.memory import InMemoryEventStore
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore

TABLES = "events, streams, unique_keys, checkpoints, stage_leases"


@pytest.fixture(scope="session")
async def pg_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    await migrate(database_url)
    # Room for every writer of the concurrency tests to hold a connection at once.
    pool = await open_pool(database_url, max_size=24)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> Any:
    """A fresh, empty event store: in memory, or PostgreSQL with its tables truncated.

    Sync on purpose: it asks for the PostgreSQL fixtures lazily (`getfixturevalue`), so the
    in-memory half of the suite never starts a database.
    """
    if request.param == "memory":
        return InMemoryEventStore()
    pool: AsyncConnectionPool = request.getfixturevalue("pg_pool")
    url: str = request.getfixturevalue("database_url")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    return PostgresEventStore(pool)
