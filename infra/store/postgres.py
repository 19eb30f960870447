"""The event store on PostgreSQL.

Why the feed reads below the transaction horizon: identity positions are handed out at insert
but become visible at commit, out of order. A follower that reads `position > last` skips for
good a lower position whose transaction commits later. Every row is stamped with its writer's
`pg_current_xact_id()`, and the feed reads only rows whose transaction is older than the oldest
transaction still running (`pg_snapshot_xmin`), ordered by (tx_id, position): everything below
the horizon has committed or rolled back, so nothing can appear behind the cursor later.

Why the stream-version write comes first: a transaction gets its xid at its first write. Taking
the stream's row lock first means a writer that queues behind another on the same stream has
not yet taken an xid, so it does not hold the horizon back while it waits.

Why an append is one statement: a transaction that spans round trips (`BEGIN`, the stream-version
write, the insert, `COMMIT`) keeps its xid open while the client thinks between them, which holds
the feed's horizon back for every follower and caps appends near a third of bare INSERT commits.
Every append is therefore one data-modifying statement (`_append_statement`, with the one mapping
of its errors): a CTE writes the stream's version first (the optimistic-concurrency check: no row
means another writer got there first) and the events are inserted from its result, so no event is
written unless the version moved, and both writes share one xid and commit together. The unique
index on (stream_id, stream_version) stays the real guard. Without unique keys it is sent alone in
autocommit (one round trip, prepared); an append that claims or releases unique keys runs the
same statement in a transaction, followed by the key writes (`append_in`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from domain import events as ev
from infra.store.records import (
    Alongside,
    AppendResult,
    FeedCursor,
    NewEvent,
    RecordedEvent,
    UniqueKey,
    UniqueKeyTaken,
    WrongExpectedVersion,
)

_COLUMNS = (
    "position, tx_id::text::bigint, stream_id, stream_version, event_id::text, event_type, "
    "org, pipeline_id, run_id, data::text, recorded_at"
)


def _record(row: tuple[Any, ...]) -> RecordedEvent:
    return RecordedEvent(
        position=row[0],
        tx_id=row[1],
        stream_id=row[2],
        stream_version=row[3],
        event_id=row[4],
        event_type=row[5],
        org=row[6],
        pipeline_id=row[7],
        run_id=row[8],
        data=row[9].encode(),
        recorded_at=row[10],
    )


class PostgresEventStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._cursors: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], psycopg.AsyncCursor[Any]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
        alongside: Alongside | None = None,
    ) -> AppendResult:
        if claim or release:
            async with self._pool.connection() as conn, conn.transaction():
                return await self.append_in(
                    conn, stream_id, events, expected_version, claim=claim, release=release, alongside=alongside
                )
        # getconn/putconn rather than `connection()`: the same checks on return (a connection left
        # mid-statement or in a transaction is reset or discarded) without a commit call per append.
        conn = await self._pool.getconn()
        try:
            # One cursor per pooled connection, reused: appends are the hottest path there is.
            cur = self._cursors.get(conn)
            if cur is None:
                cur = self._cursors[conn] = conn.cursor()
            if conn.autocommit:
                return await _append_statement(cur, stream_id, events, expected_version, alongside)
            async with conn.transaction():  # a pool without autocommit: still one statement
                return await _append_statement(cur, stream_id, events, expected_version, alongside)
        finally:
            await self._pool.putconn(conn)

    @contextlib.asynccontextmanager
    async def begin_append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
        alongside: Alongside | None = None,
    ) -> AsyncIterator[AppendResult]:
        """Append in a transaction that commits when the block exits (tests hold it open)."""
        async with self._pool.connection() as conn, conn.transaction():
            yield await self.append_in(
                conn, stream_id, events, expected_version, claim=claim, release=release, alongside=alongside
            )

    async def append_in(
        self,
        conn: psycopg.AsyncConnection[Any],
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
        alongside: Alongside | None = None,
    ) -> AppendResult:
        """Append inside the caller's transaction: the same one statement as any append, then the
        unique keys it claims and releases."""
        async with conn.cursor() as cur:
            result = await _append_statement(cur, stream_id, events, expected_version, alongside)
        for k in release:
            await conn.execute("DELETE FROM unique_keys WHERE scope = %s AND key = %s", (k.scope, k.key))
        for k in claim:
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO unique_keys (scope, key, owner) VALUES (%s, %s, %s)",
                        (k.scope, k.key, stream_id),
                    )
            except psycopg.errors.UniqueViolation as exc:
                raise UniqueKeyTaken(k.scope, k.key) from exc
        return result

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(
                sql.SQL(
                    "SELECT {} FROM events WHERE stream_id = %s AND stream_version > %s ORDER BY stream_version"
                ).format(sql.SQL(_COLUMNS)),
                (stream_id, after_version),
            )
            return [_record(r) for r in await cur.fetchall()]

    async def read_feed(
        self,
        after: FeedCursor,
        limit: int = 500,
        *,
        run_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> list[RecordedEvent]:
        # One statement, so the horizon and the rows come from one snapshot.
        where = [
            sql.SQL("(tx_id, position) > (%s::text::xid8, %s)"),
            sql.SQL("tx_id < pg_snapshot_xmin(pg_current_snapshot())"),
        ]
        params: list[Any] = [str(after[0]), after[1]]
        if run_id is not None:
            where.append(sql.SQL("run_id = %s"))
            params.append(run_id)
        if pipeline_id is not None:
            where.append(sql.SQL("pipeline_id = %s"))
            params.append(pipeline_id)
        params.append(limit)
        query = sql.SQL("SELECT {} FROM events WHERE {} ORDER BY tx_id, position LIMIT %s").format(
            sql.SQL(_COLUMNS), sql.SQL(" AND ").join(where)
        )
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(query, params)
            return [_record(r) for r in await cur.fetchall()]

    async def follow_feed(self, after: FeedCursor, limit: int = 500) -> tuple[list[RecordedEvent], bool]:
        """A follower's read of the feed: the next events (as `read_feed`), and whether committed
        events already wait behind the horizon after them, so that the follower knows, from the
        same snapshot and round trip, whether to look again soon (an older transaction still
        holds the horizon) or to sleep until the next wake-up (nothing more has committed)."""
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(_FOLLOW_FEED, (str(after[0]), after[1], limit, str(after[0]), after[1]))
            rows = await cur.fetchall()
        # Tell the rows apart by their flag, not by their place: UNION ALL promises no order.
        events = sorted((_record(r[1:]) for r in rows if r[0]), key=lambda e: e.cursor)
        return events, any(not r[0] for r in rows)

    async def cursor_of(self, position: int) -> FeedCursor | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT tx_id::text::bigint, position FROM events WHERE position = %s", (position,)
            )
            row = await cur.fetchone()
            return (row[0], row[1]) if row else None

    async def streams_of(self, pipeline_id: str, prefix: str) -> list[str]:
        # `stream_version = 1` spelled out, so that the partial index events_pipeline_streams serves it.
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT stream_id FROM events WHERE pipeline_id = %s AND stream_version = 1 "
                "AND starts_with(stream_id, %s) ORDER BY position",
                (pipeline_id, prefix),
            )
            return [r[0] for r in await cur.fetchall()]

    async def head(self) -> FeedCursor:
        """The cursor of the newest committed event below the horizon (the feed's end today)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT tx_id::text::bigint, position FROM events "
                "WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
                "ORDER BY tx_id DESC, position DESC LIMIT 1"
            )
            row = await cur.fetchone()
            return (row[0], row[1]) if row else (0, 0)


# The feed below the horizon, and a row of nulls (its flag false) when a committed event waits at
# or above it, in one statement: one snapshot. Rows at or above the horizon that are visible here
# have committed. Both parts ordered on the feed index, which a generic plan then keeps using (see
# infra/projector/checkpoint.py).
_FOLLOW_FEED = (
    f"(SELECT true, {_COLUMNS} FROM events WHERE (tx_id, position) > (%s::text::xid8, %s) "
    "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY tx_id, position LIMIT %s) "
    f"UNION ALL (SELECT false{', NULL' * _COLUMNS.count(', ')}, NULL FROM events "
    "WHERE (tx_id, position) > (%s::text::xid8, %s) AND tx_id >= pg_snapshot_xmin(pg_current_snapshot()) "
    "ORDER BY tx_id, position LIMIT 1)"
)


# The stream-version write of `_append_statement`, by expected version: 0 (the stream must
# not exist: a second creator fails on the primary key), None (any: an upsert that takes the row
# lock), n (compare and set: no row when the stream is elsewhere).
_STREAM_CREATE = "INSERT INTO streams (stream_id, version) VALUES (%(s)s, %(n)s) RETURNING version"
_STREAM_ANY = (
    "INSERT INTO streams (stream_id, version) VALUES (%(s)s, %(n)s) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = streams.version + EXCLUDED.version RETURNING version"
)
_STREAM_AT = (
    "UPDATE streams SET version = version + %(n)s WHERE stream_id = %(s)s AND version = %(e)s RETURNING version"
)


def _append_sql(stream_write: str) -> str:
    return (
        f"WITH s AS ({stream_write}) "
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, org, pipeline_id, run_id, data) "
        "SELECT %(s)s, s.version - %(n)s + u.k, u.i::uuid, u.t, u.o, u.p, u.r, u.d::json "
        "FROM s, unnest(%(i)b::text[], %(t)b::text[], %(o)b::text[], %(p)b::text[], %(r)b::text[], %(d)b::text[]) "
        "WITH ORDINALITY AS u(i, t, o, p, r, d, k) "
        "ORDER BY u.k "
        "RETURNING position, stream_version"
    )


def _append_one_sql(stream_write: str) -> str:
    """The same statement for the common append of one event, without arrays (cheaper to encode
    and to plan): a variant of the query text, not a second path."""
    return (
        f"WITH s AS ({stream_write}) "
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, org, pipeline_id, run_id, data) "
        "SELECT %(s)s, s.version, %(i)s::uuid, %(t)s, %(o)s, %(p)s, %(r)s, %(d)s::json FROM s "
        "RETURNING position, stream_version"
    )


# By expected version (0, None, n) and whether one event or several.
_APPEND_SQL: dict[tuple[str, bool], str] = {
    (kind, one): (_append_one_sql if one else _append_sql)(write)
    for kind, write in (("create", _STREAM_CREATE), ("any", _STREAM_ANY), ("at", _STREAM_AT))
    for one in (True, False)
}


@functools.cache
def _append_alongside_sql(kind: str, before: int, take: bool, release: bool) -> str:
    """The append with what it writes alongside (records.Alongside), still one statement: every
    write below reads `s`, the stream-version write, so none happens unless the version moved
    (the optimistic-concurrency check holds for all of it). The events of every stream are
    inserted by one INSERT in feed order (the streams written alongside first), each stream's
    versions numbered from its own stream-version write. Shapes (by kind, number of streams
    alongside, leases taken, leases released) are few: each is prepared once per connection."""
    ctes = [f"s AS ({_STREAM_AT if kind == 'at' else _STREAM_ANY if kind == 'any' else _STREAM_CREATE})"]
    selects = []
    for b in range(before):
        ctes.append(
            f"b{b} AS (INSERT INTO streams (stream_id, version) SELECT %(b{b}s)s, %(b{b}n)s FROM s "
            "ON CONFLICT (stream_id) DO UPDATE SET version = streams.version + EXCLUDED.version RETURNING version)"
        )
    if take:
        ctes.append(
            "lt AS (INSERT INTO stage_leases (run_id, stage_id, attempt, executor_id, host, expires_at) "
            "SELECT u.r, u.k, u.a, %(lh)s, %(lhost)s, now() + make_interval(secs => %(lttl)s) "
            "FROM s, unnest(%(ltr)s::text[], %(ltk)s::text[], %(lta)s::int[]) AS u(r, k, a) "
            "ON CONFLICT (run_id, stage_id, attempt) DO UPDATE SET executor_id = EXCLUDED.executor_id, "
            "host = EXCLUDED.host, pgid = NULL, expires_at = EXCLUDED.expires_at)"
        )
    if release:
        ctes.append(
            "lr AS (DELETE FROM stage_leases l USING s, unnest(%(lrr)s::text[], %(lrk)s::text[], %(lra)s::int[]) "
            "AS u(r, k, a) WHERE l.run_id = u.r AND l.stage_id = u.k AND l.attempt = u.a)"
        )
    for g, (w, prefix) in enumerate([*((f"b{b}", f"b{b}") for b in range(before)), ("s", "")]):
        selects.append(
            f"SELECT {g} AS g, u.k, %({prefix}s)s::text AS sid, {w}.version - %({prefix}n)s + u.k AS v, "
            "u.i, u.t, u.o, u.p, u.r, u.d "
            f"FROM {w}, unnest(%({prefix}i)b::text[], %({prefix}t)b::text[], %({prefix}o)b::text[], "
            f"%({prefix}p)b::text[], %({prefix}r)b::text[], %({prefix}d)b::text[]) "
            "WITH ORDINALITY AS u(i, t, o, p, r, d, k)"
        )
    return (
        f"WITH {', '.join(ctes)} "
        "INSERT INTO events (stream_id, stream_version, event_id, event_type, org, pipeline_id, run_id, data) "
        f"SELECT x.sid, x.v, x.i::uuid, x.t, x.o, x.p, x.r, x.d::json FROM ({' UNION ALL '.join(selects)}) AS x "
        "ORDER BY x.g, x.k "
        "RETURNING position, stream_id, stream_version"
    )


def _events_params(prefix: str, stream_id: str, events: Sequence[NewEvent]) -> dict[str, Any]:
    return {
        f"{prefix}s": stream_id,
        f"{prefix}n": len(events),
        f"{prefix}i": [e.event_id for e in events],
        f"{prefix}t": [ev.event_type(e.event) for e in events],
        f"{prefix}o": [e.org for e in events],
        f"{prefix}p": [e.pipeline_id for e in events],
        f"{prefix}r": [e.run_id for e in events],
        f"{prefix}d": [ev.encode(e.event).decode() for e in events],
    }


async def _append_statement(
    cur: psycopg.AsyncCursor[Any],
    stream_id: str,
    events: Sequence[NewEvent],
    expected_version: int | None,
    alongside: Alongside | None = None,
) -> AppendResult:
    """The append in one statement (see the module's docstring), and the one mapping of its errors."""
    n = len(events)
    if n == 0:
        raise ValueError("nothing to append")
    kind = "create" if expected_version == 0 else "any" if expected_version is None else "at"
    if alongside is not None and not alongside.empty:
        return await _append_alongside(cur, stream_id, events, expected_version, kind, alongside)
    query = _APPEND_SQL[(kind, n == 1)]
    params: dict[str, Any]
    if n == 1:
        (e,) = events
        params = {
            "s": stream_id,
            "n": 1,
            "e": expected_version,
            "i": e.event_id,
            "t": ev.event_type(e.event),
            "o": e.org,
            "p": e.pipeline_id,
            "r": e.run_id,
            "d": ev.encode(e.event).decode(),
        }
    else:
        params = {
            "s": stream_id,
            "n": n,
            "e": expected_version,
            "i": [e.event_id for e in events],
            "t": [ev.event_type(e.event) for e in events],
            "o": [e.org for e in events],
            "p": [e.pipeline_id for e in events],
            "r": [e.run_id for e in events],
            "d": [ev.encode(e.event).decode() for e in events],
        }
    rows = await _execute(cur, query, params, stream_id, expected_version)
    rows.sort(key=lambda r: int(r[1]))
    return AppendResult(version=int(rows[-1][1]), positions=tuple(int(r[0]) for r in rows))


async def _append_alongside(
    cur: psycopg.AsyncCursor[Any],
    stream_id: str,
    events: Sequence[NewEvent],
    expected_version: int | None,
    kind: str,
    alongside: Alongside,
) -> AppendResult:
    others = [sid for sid, _ in alongside.before]
    if stream_id in others or len(set(others)) != len(others):
        raise ValueError("a stream written alongside is written once, and is not the append's own")
    params: dict[str, Any] = {"e": expected_version, **_events_params("", stream_id, events)}
    for b, (sid, evs) in enumerate(alongside.before):
        params |= _events_params(f"b{b}", sid, evs)
    if alongside.take:
        holder = alongside.holder
        assert holder is not None  # checked by Alongside
        params |= {
            "lh": holder.executor_id,
            "lhost": holder.host,
            "lttl": holder.ttl,
            "ltr": [lease.run_id for lease in alongside.take],
            "ltk": [lease.key for lease in alongside.take],
            "lta": [lease.attempt for lease in alongside.take],
        }
    if alongside.release:
        params |= {
            "lrr": [lease.run_id for lease in alongside.release],
            "lrk": [lease.key for lease in alongside.release],
            "lra": [lease.attempt for lease in alongside.release],
        }
    query = _append_alongside_sql(kind, len(alongside.before), bool(alongside.take), bool(alongside.release))
    rows = await _execute(cur, query, params, stream_id, expected_version)
    own = sorted(int(r[2]) for r in rows if r[1] == stream_id)
    return AppendResult(version=own[-1], positions=tuple(sorted(int(r[0]) for r in rows)))


async def _execute(
    cur: psycopg.AsyncCursor[Any], query: str, params: dict[str, Any], stream_id: str, expected_version: int | None
) -> list[Any]:
    try:
        # Prepared from the first call: the same few statements run on every connection all day.
        await cur.execute(query, params, prepare=True)
        rows = await cur.fetchall()
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name == "events_event_id_key":
            raise ValueError("an event with this event id is already stored") from exc
        # streams_pkey (the stream exists) or the (stream_id, stream_version) guard.
        raise WrongExpectedVersion(stream_id, expected_version) from exc
    if not rows:
        # The stream-version write matched no row: the stream is not at the expected version.
        raise WrongExpectedVersion(stream_id, expected_version)
    return rows
