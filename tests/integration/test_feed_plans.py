"""The followers' feed queries keep using the feed index once psycopg prepares them.

A statement run this often is prepared, and PostgreSQL may then use a generic plan, made without
the parameters' values. For `(tx_id, position) > ($1, $2)` it estimates that a third of the rows
match; with `LIMIT 1` and no order a sequential scan looks cheapest, yet the rows past a follower's
checkpoint are the newest ones, at the end of the table: every call read the whole events table
(found by the benchmark: latency grew with every run stored).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from infra.projector.checkpoint import BEHIND_HORIZON
from infra.store.migrate import migrate
from infra.store.postgres import _FOLLOW_FEED

pytestmark = [pytest.mark.integration]


def _nodes(plan: dict[str, Any]) -> list[str]:
    return [plan["Node Type"]] + [n for child in plan.get("Plans", []) for n in _nodes(child)]


async def test_the_behind_horizon_check_uses_the_feed_index_in_a_generic_plan(database_url: str) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # A session-private copy of the table, with its indexes, shadows the shared one.
        await conn.execute("CREATE TEMP TABLE events (LIKE public.events INCLUDING ALL)")
        await conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, data) "
            "SELECT 's' || g, 1, gen_random_uuid(), 't', '{}' FROM generate_series(1, 20000) g"
        )
        await conn.execute("ANALYZE events")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        cur = await conn.execute("SELECT max(tx_id)::text::bigint, max(position) FROM events")
        row = await cur.fetchone()
        assert row is not None
        query = BEHIND_HORIZON.replace("%s", "$1", 1).replace("%s", "$2", 1)
        await conn.execute(f"PREPARE behind(text, bigint) AS {query}")
        cur = await conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE behind('{row[0]}', {row[1]})")
        explained = await cur.fetchone()
        assert explained is not None
        plan = explained[0] if isinstance(explained[0], list) else json.loads(explained[0])
        nodes = _nodes(plan[0]["Plan"])
        assert "Seq Scan" not in nodes, nodes
        assert any(n.startswith("Index") for n in nodes), nodes


async def test_a_followers_read_of_the_feed_uses_the_feed_index_in_a_generic_plan(database_url: str) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TEMP TABLE events (LIKE public.events INCLUDING ALL)")
        await conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, data) "
            "SELECT 's' || g, 1, gen_random_uuid(), 't', '{}' FROM generate_series(1, 20000) g"
        )
        await conn.execute("ANALYZE events")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        cur = await conn.execute("SELECT max(tx_id)::text::bigint, max(position) FROM events")
        row = await cur.fetchone()
        assert row is not None
        query = _FOLLOW_FEED
        for i in range(1, 6):
            query = query.replace("%s", f"${i}", 1)
        await conn.execute(f"PREPARE follow(text, bigint, bigint, text, bigint) AS {query}")
        cur = await conn.execute(
            f"EXPLAIN (FORMAT JSON) EXECUTE follow('{row[0]}', {row[1]}, 500, '{row[0]}', {row[1]})"
        )
        explained = await cur.fetchone()
        assert explained is not None
        plan = explained[0] if isinstance(explained[0], list) else json.loads(explained[0])
        nodes = _nodes(plan[0]["Plan"])
        assert "Seq Scan" not in nodes, nodes
        assert any(n.startswith("Index") for n in nodes), nodes
