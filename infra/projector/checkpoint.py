"""The projector's checkpoint row: read, compare-and-set, and the look behind the feed's horizon
(`BEHIND_HORIZON`, in the transaction of each batch)."""

from __future__ import annotations

from typing import Any

import psycopg

from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, FeedCursor

NAME = "projector"


class CheckpointMoved(Exception):
    """The checkpoint is not where this batch started (a rebuild committed in between)."""


# ORDER BY, although any row would do: psycopg prepares a statement run this often, and
# PostgreSQL's generic plan for a bare `... > ($1, $2) LIMIT 1` is a sequential scan (it expects a
# third of the rows to match, and finds none: the rows past the checkpoint are the newest), a
# read of the whole events table every batch. The order makes the feed index the only sane plan.
BEHIND_HORIZON = "SELECT 1 FROM events WHERE (tx_id, position) > (%s::text::xid8, %s) ORDER BY tx_id, position LIMIT 1"


async def read_checkpoint(store: PostgresEventStore) -> FeedCursor:
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT tx_id::text::bigint, position FROM checkpoints WHERE name = %s", (NAME,))
        row = await cur.fetchone()
        return (row[0], row[1]) if row else FEED_START


async def move_checkpoint(conn: psycopg.AsyncConnection[Any], cursor: FeedCursor, *, expected: FeedCursor) -> None:
    """Compare-and-set the checkpoint from `expected` to `cursor`, failing the statement (and so the
    whole transaction, also in pipeline mode, where nothing waits for its result) when the
    checkpoint is elsewhere: the count of moved rows is 0 and the division by it raises."""
    if expected == FEED_START:
        move = (
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING 1"
        )
        params: tuple[Any, ...] = (NAME, str(cursor[0]), cursor[1])
    else:
        move = (
            "UPDATE checkpoints SET tx_id = %s::text::xid8, position = %s "
            "WHERE name = %s AND tx_id = %s::text::xid8 AND position = %s RETURNING 1"
        )
        params = (str(cursor[0]), cursor[1], NAME, str(expected[0]), expected[1])
    await conn.execute(f"WITH moved AS ({move}) SELECT 1 / (SELECT count(*)::int FROM moved)", params)


async def save_checkpoint(
    conn: psycopg.AsyncConnection[Any], cursor: FeedCursor, *, expected: FeedCursor | None = None
) -> None:
    """Move the checkpoint; with `expected`, only from there (compare and set)."""
    if expected is None:
        await conn.execute(
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position",
            (NAME, str(cursor[0]), cursor[1]),
        )
        return
    if expected == FEED_START:
        cur = await conn.execute(
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING 1",
            (NAME, str(cursor[0]), cursor[1]),
        )
    else:
        cur = await conn.execute(
            "UPDATE checkpoints SET tx_id = %s::text::xid8, position = %s "
            "WHERE name = %s AND tx_id = %s::text::xid8 AND position = %s RETURNING 1",
            (str(cursor[0]), cursor[1], NAME, str(expected[0]), expected[1]),
        )
    if await cur.fetchone() is None:
        raise CheckpointMoved()
